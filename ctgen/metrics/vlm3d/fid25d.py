"""2.5D FID: Fréchet distances of 2D slice features along the three planes of 1 mm RAS volumes, and their mean.

Source: forithmus/VLM3D-Dockers, ``ct_challenges/ctgen_evaluation/compute_fid_2-5d_ct.py`` (a copy of
MONAI's MAISI script) as ``evaluation.py`` calls it for 2026: ``--model_name squeezenet1_1
--num_images 100 --target_shape 512x512x512 --enable_padding True --enable_center_cropping True
--enable_resampling_spacing 1.0x1.0x1.0`` (no centre-slice ratio: every slice):

* each file list is sorted and cut to its first 100 names (the real and the generated list separately;
  we pair by stem and take the first 100 pairs by the same order, ``<stem>.nii.gz``);
* geometry: :func:`ctgen.metrics.vlm3d.geometry.fid_volume`;
* slices: the (1, 1, X, Y, Z) volume is repeated to 3 channels and the channels reversed (BGR); "XY" are the
  Z slices (X rows, Y columns), "YZ" the X slices, "ZX" the Y slices (X rows, Z columns; the leaderboard
  calls it ``FID_2p5D_XZ``). All 512 slices of each plane, padding slices included;
* intensities (``radimagenet_intensity_normalisation`` with ``norm2d=False``): min-max over the whole
  stack of one plane's kept slices (all slices: the same as over the volume) to [0, 1], then channel c
  minus (0.406, 0.456, 0.485)[c]; no division by a standard deviation;
* features: the network's output, averaged over space if it is a map (SqueezeNet gives 1000 scores; the
  RadImageNet ResNet-50 of the papers a 2048-channel map); one FID per plane over all slices of all volumes
  (MONAI's ``FIDMetric``: N - 1 covariances), and their mean.

Memory: one volume (512^3 float32, 512 MB) and one batch of slices at a time; the slice features are kept
(100 volumes x 512 slices x F floats per plane and set: 205 MB at F = 1000). The CI is a bootstrap over
volumes (a volume's slices resampled together; a CT-RATE patient's volumes together), shifted by its bias
(:func:`ctgen.metrics.distribution.shifted_ci`), computed from per-volume centred Gram matrices (V x F x F
float32 per set, one plane at a time: 400 MB at 100 volumes and F = 1000, 1.7 GB at F = 2048).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ctgen.metrics.frechet import frechet_distance, frechet_distance_from_stats
from ctgen.metrics.distribution import shifted_ci
from ctgen.metrics.summary import MetricValue, join_flags, report_groups, stems_hash
from ctgen.metrics.vlm3d.contract import Pair, load_volume
from ctgen.metrics.vlm3d.geometry import FID_SHAPE, FID_SPACING, fid_volume, oblique
from ctgen.metrics.vlm3d.protocol import CHALLENGE, Extractor, features, metric_name, profile
from ctprep.logs import progress
from ctprep.stats import group_members, resample

log = logging.getLogger(__name__)

PLANES = ("xy", "yz", "zx")  # slices along Z, X, Y of the RAS volume
OFFICIAL = {"xy": "FID_2p5D_XY", "yz": "FID_2p5D_YZ", "zx": "FID_2p5D_XZ", "avg": "FID_2p5D_Avg"}
CHANNEL_MEAN = (0.406, 0.456, 0.485)  # subtract_mean(), applied after the RGB -> BGR flip
NUM_IMAGES = 100  # --num_images
SLICE_BATCH = 32  # _chunked_forward_avg's chunk: memory only, no effect on the values
EPS = 1e-10  # the min-max normalisation's denominator offset


@dataclass(frozen=True)
class Fid25dSettings:
    """The protocol's parameters; defaults are the VLM3D 2026 call."""

    spacing: tuple[float, float, float] = FID_SPACING  # mm, RAS
    shape: tuple[int, int, int] = FID_SHAPE  # pad/crop target
    num_images: int = NUM_IMAGES  # first N volumes (sorted)
    center_slices_ratio: float | None = None  # keep only the central share of each plane's slices (None: all)
    slice_batch: int = SLICE_BATCH  # slices per forward pass
    n_bootstrap: int = 200  # resamples of the CI (each recomputes three F x F Fréchet distances)


def plane_slices(volume: torch.Tensor, plane: str, center_slices_ratio: float | None = None) -> torch.Tensor:
    """(X, Y, Z) -> (S, h, w) slices of one plane (views): xy (Z, X, Y), yz (X, Y, Z), zx (Y, X, Z)."""
    stack = {"xy": volume.permute(2, 0, 1), "yz": volume, "zx": volume.permute(1, 0, 2)}[plane]
    if center_slices_ratio is not None:
        n = stack.shape[0]
        stack = stack[int((1.0 - center_slices_ratio) / 2.0 * n): int((1.0 + center_slices_ratio) / 2.0 * n)]
    return stack


def normalise(slices: torch.Tensor, vmin: torch.Tensor, vmax: torch.Tensor) -> torch.Tensor:
    """(B, h, w) HU -> (B, 3, h, w): min-max over the volume to [0, 1], minus the channel means (float32)."""
    x = (slices.float() - vmin) / (vmax - vmin + EPS)
    return torch.stack([x - m for m in CHANNEL_MEAN], dim=1)


def volume_plane_features(volume: torch.Tensor, extractor: Extractor, settings: Fid25dSettings,
                          device=None) -> dict[str, np.ndarray]:
    """{plane: (S, F) float32} for one (X, Y, Z) HU volume."""
    out = {}
    for plane in PLANES:
        stack = plane_slices(volume, plane, settings.center_slices_ratio)
        # get_features_2p5d normalises the stack of kept slices: with a centre-slice ratio its min-max is
        # that of the kept slices (of this plane), not the volume's
        vmin, vmax = stack.min(), stack.max()
        feats = [features(extractor, normalise(stack[s:s + settings.slice_batch], vmin, vmax), device)
                 for s in range(0, stack.shape[0], settings.slice_batch)]
        out[plane] = torch.cat(feats).float().numpy()
    return out


class GroupedGaussian:
    """Per-volume sufficient statistics of one feature set, for bootstrap resamples of whole volumes.

    Centred at the pooled mean ``c``: count n_v, sum s_v = sum(x - c) (float64) and Gram G_v = (x - c)^T (x - c)
    (float32, V x F x F). A resample with volume counts w has N = sum w n_v, mean c + S/N and covariance
    (sum w G_v - S S^T / N) / (N - 1), S = sum w s_v.
    """

    def __init__(self, groups: Sequence[np.ndarray], device=None):
        self.center = np.concatenate(groups).astype(np.float64).mean(axis=0)
        c = torch.as_tensor(self.center, device=device)
        self.n = torch.tensor([len(g) for g in groups], dtype=torch.float64, device=device)
        xs = [torch.as_tensor(g, device=device).double() - c for g in groups]
        self.s = torch.stack([x.sum(0) for x in xs])  # (V, F)
        self.gram = torch.stack([(x.T @ x).float() for x in xs])  # (V, F, F): O(V F^2) memory
        self.c = c

    def stats(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = counts.to(self.n)
        n = (w * self.n).sum()
        s = w @ self.s
        g = torch.einsum("v,vij->ij", w.float(), self.gram).double()
        return self.c + s / n, (g - torch.outer(s, s) / n) / (n - 1)


def select(pairs: Sequence[Pair], num_images: int) -> list[Pair]:
    """The first ``num_images`` pairs by ``<stem>.nii.gz`` (the evaluation sorts its converted file lists)."""
    return sorted(pairs, key=lambda p: f"{p.stem}.nii.gz")[:num_images]


def fid_25d(pairs: Sequence[Pair], extractor: Extractor, settings: Fid25dSettings = Fid25dSettings(),
            prefix: str = CHALLENGE, base_name: str = "fid_2p5d", device=None) -> list[MetricValue]:
    """[xy, yz, zx, avg] records of the 2.5D FID over the first ``num_images`` pairs.

    ``extractor.fn`` takes (B, 3, h, w) slices normalised as above and returns (B, F) or (B, F, h', w').
    """
    chosen = select(pairs, settings.num_images)
    if len(chosen) < 2:
        raise ValueError(f"2.5D FID needs at least 2 volume pairs, got {len(chosen)}")
    gen = {p: [] for p in PLANES}
    real = {p: [] for p in PLANES}
    n_oblique = 0
    with progress(total=2 * len(chosen), desc=base_name, unit="vol") as bar:
        for pair in chosen:
            for path, out in ((pair.generated, gen), (pair.real, real)):
                loaded = load_volume(path)
                n_oblique += oblique(loaded.affine)
                vol = fid_volume(loaded, settings.spacing, settings.shape)
                del loaded
                for plane, f in volume_plane_features(vol, extractor, settings, device).items():
                    out[plane].append(f)
                del vol
                bar.update(1)
    name = lambda part: metric_name(f"{base_name}.{part}", extractor)  # noqa: E731
    prof = profile(prefix, "fid25d", extractor)
    kw = dict(profile=prof, stems=stems_hash(p.stem for p in chosen))
    flag = None
    if len(chosen) < NUM_IMAGES:  # the protocol's 100, whatever num_images asked for
        flag = f"scored on {len(chosen)} volumes; the protocol takes the first {NUM_IMAGES}"
    if settings.num_images != NUM_IMAGES:  # more than 100 is another number too, though no fewer volumes
        flag = join_flags(flag, f"num_images {settings.num_images}, not the challenge's {NUM_IMAGES}")
    default = Fid25dSettings()
    if (tuple(settings.spacing), tuple(settings.shape), settings.center_slices_ratio) != \
            (default.spacing, default.shape, default.center_slices_ratio):
        flag = "; ".join(filter(None, [flag, f"grid {tuple(settings.shape)} at {tuple(settings.spacing)} mm"
                                             f"{'' if settings.center_slices_ratio is None else ', centre slices'}, "
                                             "not the challenge's"]))
    if n_oblique:  # fid_volume's grid is MONAI's for axis-aligned voxels only
        flag = join_flags(flag, f"{n_oblique} of {2 * len(chosen)} volumes oblique: resampled on their voxel axes, "
                                "where MONAI may shift the grid (centre alignment)")
    # one set of resamples for the three planes and their mean, of whole patients where one has several volumes
    # (CT-RATE reconstructions share anatomy: mean_with_ci's units); each CI is the percentile interval shifted
    # by the bootstrap's bias (resamples duplicate volumes, so their FIDs sit above the estimate, often all of them:
    # ctgen.metrics.distribution)
    units, clusters = report_groups([p.stem for p in chosen], len(chosen))
    members = None if units is None else group_members(units)
    rng = np.random.default_rng(0)
    counts = [torch.bincount(torch.as_tensor(resample(rng, len(chosen), members)), minlength=len(chosen))
              for _ in range(settings.n_bootstrap)]
    official = prefix == CHALLENGE and not extractor.proxy  # a proxy's number is never a leaderboard key
    records, boot = [], {}
    for plane in PLANES:
        value = frechet_distance(np.concatenate(real[plane]), np.concatenate(gen[plane]))
        g, r = GroupedGaussian(gen[plane], device), GroupedGaussian(real[plane], device)
        boot[plane] = [frechet_distance_from_stats(*g.stats(c), *r.stats(c)) for c in counts]
        ci, shifted = shifted_ci(boot[plane], value, settings.n_bootstrap)
        extra = {"official_key": OFFICIAL[plane] if official else None, "slices": int(
            sum(len(f) for f in gen[plane])), "feature_dim": int(gen[plane][0].shape[1]), "n_oblique": n_oblique,
            **clusters, **shifted}
        records.append(MetricValue(name(plane), value, len(chosen), ci, flag=flag, extra=extra, **kw))
        del g, r
    avg = float(np.mean([rec.value for rec in records]))
    ci, shifted = shifted_ci(list(np.mean([boot[p] for p in PLANES], axis=0)), avg, settings.n_bootstrap)
    records.append(MetricValue(name("avg"), avg, len(chosen), ci, flag=flag, extra={
        "official_key": OFFICIAL["avg"] if official else None, "n_oblique": n_oblique, **clusters, **shifted}, **kw))
    for rec in records:
        log.info("%s %.4g over %d volumes (%s)", rec.name, rec.value, rec.n, prof)
    return records
