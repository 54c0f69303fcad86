"""How the evaluation scores: config.yaml's ``evaluation`` keys as a frozen dataclass (no torch: the workflow reads it).

``ctgen evaluate --settings`` takes the same keys; the workflow hands the rule exactly the scoring keys
(:func:`scoring_settings`), so an edit of a workflow-only key (the guidance scales, TSTR's sizes,
resources) does not rerun the scoring.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctprep.ctrate import LABELS
from ctprep.errors import UserError
from ctprep.settings import check_fields

#: keys of config.yaml's `evaluation` section that other readers own: the workflow's, and vlm3d (ctgen vlm3d-score)
WORKFLOW_KEYS = ("split", "tstr", "tstr_reports", "tstr_steps", "guidance_scales", "guidance_repeats", "resources",
                 "slicenet", "vlm3d")


@dataclass(frozen=True)
class EvalConfig:
    """How volumes are scored (config.yaml: ``evaluation``; ``ctgen evaluate --settings``)."""

    slices_per_volume: int | None = 16  # slices per volume and plane for the 2D FID (evenly spread); None: all
    inception_weights: str | None = None  # local InceptionV3 weights (pytorch-fid .pth): a second 2D FID space
    hu_tolerance: float = 20.0  # HU beyond the real volumes' range before a tissue median is flagged
    bootstrap: int = 1000  # bootstrap resamples of the CIs (over volumes)
    bootstrap_frechet: int = 200  # resamples of the Fréchet distances' CIs (each costs O(rows x dim^2))
    auroc_min_positives: int = 5  # a per-label AUROC needs at least this many positive reports
    auroc_min_negatives: int = 5  # ... and this many negative ones
    faithfulness_labels: tuple[str, ...] | None = None  # the labels faithfulness is scored on; None: all 18
    retrieval_k: tuple[int, ...] = (1, 5)  # top-k text retrieval accuracies reported
    batch_size: int = 2  # ground-truth volumes per batch through the networks (and their predictions)
    seed: int = 0  # seed of the bootstrap resamples

    def __post_init__(self) -> None:
        object.__setattr__(self, "retrieval_k", tuple(self.retrieval_k))
        if self.faithfulness_labels is not None:
            object.__setattr__(self, "faithfulness_labels", tuple(self.faithfulness_labels))
            unknown = sorted(set(self.faithfulness_labels) - set(LABELS))
            if unknown:
                raise UserError(f"evaluation.faithfulness_labels: not CT-RATE labels: {unknown}")
        if (self.batch_size < 1 or self.bootstrap < 10 or self.bootstrap_frechet < 10 or not self.retrieval_k
                or min(self.retrieval_k) < 1 or min(self.auroc_min_positives, self.auroc_min_negatives) < 1):
            raise UserError("evaluation: batch_size >= 1, bootstrap and bootstrap_frechet >= 10, retrieval_k one or more "
                            "values >= 1, auroc_min_positives and auroc_min_negatives >= 1 (an AUROC needs both classes)")

    @classmethod
    def from_dict(cls, d: dict | None) -> EvalConfig:
        """From config.yaml's `evaluation` section (its workflow keys ignored); unknown keys are an error."""
        d = {k: v for k, v in (d or {}).items() if k not in WORKFLOW_KEYS}
        try:
            return cls(**check_fields(cls, d, "evaluation"))
        except UserError:
            raise
        except ValueError as err:
            raise UserError(str(err)) from None

    @property
    def labels(self) -> tuple[str, ...]:
        return self.faithfulness_labels or LABELS




def scoring_settings(evaluation: dict) -> dict:
    """The scoring keys of config.yaml's ``evaluation`` section (what :class:`EvalConfig` reads)."""
    return {k: v for k, v in evaluation.items() if k not in WORKFLOW_KEYS}


#: scoring keys whose lists are sets: the scores do not depend on the order, only the order of the rows does
ORDER_FREE = ("faithfulness_labels", "retrieval_k")


def in_canonical_order(settings: dict) -> dict:
    """``settings`` with the lists of :data:`ORDER_FREE` in one order: ``faithfulness_labels`` in CT-RATE's label
    order (that of all 18 when it is null), ``retrieval_k`` ascending. Each label's AUROC, each top-k accuracy and
    their CIs do not depend on the order (every bootstrap draws with the same seed), nor does the macro AUROC (up to
    the rounding of a sum); the order of the rows and per-volume columns does. The workflow scores with this form, so
    a reordered list in config.yaml scores nothing again and every job reads the lists in the same order."""
    out = dict(settings)
    if out.get("faithfulness_labels"):
        rank = {name: i for i, name in enumerate(LABELS)}  # an unknown label last (EvalConfig names it)
        out["faithfulness_labels"] = sorted(out["faithfulness_labels"], key=lambda n: (rank.get(n, len(rank)), str(n)))
    if out.get("retrieval_k"):
        try:
            out["retrieval_k"] = sorted(out["retrieval_k"])
        except TypeError:  # not numbers: EvalConfig and the schema name them
            pass
    return out
