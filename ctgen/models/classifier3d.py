"""Classifier3D: a CT-Net-style multi-label classifier of the 18 CT-RATE abnormalities.

The evaluation uses it twice: its per-label probabilities on generated volumes against the labels
of the prompts that produced them (abnormality faithfulness, AUROC per label), and its pooled
features as a second 3D feature space for Frechet distances. It is the shared 3D volume encoder
(``ctgen.models.volume_encoder``) plus one linear head, trained with binary cross-entropy on logits;
rare labels can be up-weighted with ``pos_weight`` (BCE's weight on positive examples, usually
negatives / positives per label, computed from the training labels by ``ctgen.jobs.train``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ctgen.models.base import ModelOutput, PretrainedMixin
from ctgen.models.volume_encoder import VolumeEncoder, VolumeEncoderConfig, encoder_fields


@dataclasses.dataclass(frozen=True)
class ClassifierConfig(VolumeEncoderConfig):
    """Encoder fields (inherited) plus the head; CT-Net-like defaults (presets: config.yaml)."""

    num_labels: int = 18  # CT-RATE's abnormality labels, in ctprep.ctrate.LABELS order
    pos_weight: tuple[float, ...] = ()  # BCE weight of positives per label (negatives/positives); () = all 1
    head_dropout: float = 0.2  # dropout before the linear head (CT-Net-style regularisation)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")
        if self.pos_weight and (len(self.pos_weight) != self.num_labels or min(self.pos_weight) <= 0):
            raise ValueError(f"pos_weight needs {self.num_labels} positive values, got {self.pos_weight}")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"head_dropout must lie in [0, 1), got {self.head_dropout}")


@dataclass
class ClassifierOutput(ModelOutput):
    """``loss`` (mean BCE over labels and volumes) and what the logs track."""

    accuracy: torch.Tensor  # fraction of (volume, label) decisions right at probability 0.5
    positive_rate: torch.Tensor  # fraction of (volume, label) predicted positive (vs. the labels' rate)
    label_rate: torch.Tensor  # fraction of (volume, label) that are positive in the batch


class Classifier3D(nn.Module, PretrainedMixin):
    """``video (B, 1, D, H, W)`` -> 18 abnormality logits; ``forward`` is the BCE training step."""

    config_class = ClassifierConfig

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        self.encoder = VolumeEncoder(encoder_fields(config))
        self.drop = nn.Dropout(config.head_dropout)
        self.head = nn.Linear(self.encoder.feature_dim, config.num_labels)
        pos_weight = torch.tensor(config.pos_weight or (1.0,) * config.num_labels, dtype=torch.float32)
        self.register_buffer("pos_weight", pos_weight, persistent=False)  # (labels,), rebuilt from the config

    def features(self, video: torch.Tensor) -> torch.Tensor:
        """``video (B, 1, D, H, W)`` -> pooled features (B, F), for Frechet distances."""
        return self.encoder(video)

    def logits(self, video: torch.Tensor) -> torch.Tensor:
        """``video (B, 1, D, H, W)`` -> logits (B, labels)."""
        return self.head(self.drop(self.encoder(video)))

    def predict(self, video: torch.Tensor) -> torch.Tensor:
        """``video (B, 1, D, H, W)`` -> probabilities (B, labels), float32."""
        return torch.sigmoid(self.logits(video).float())

    def forward(self, video: torch.Tensor, labels: torch.Tensor, step: int = 0) -> ClassifierOutput:
        """Mean BCE-with-logits over the known labels of the batch: ``labels`` (B, labels) in {0, 1}
        (soft labels allowed), NaN where the dataset does not know the label (left out, never a 0)."""
        if labels.shape != (video.shape[0], self.config.num_labels):
            raise ValueError(f"labels must be (B, {self.config.num_labels}), got {tuple(labels.shape)}")
        logits = self.logits(video).float()  # (B, labels)
        known = ~torch.isnan(labels)  # (B, labels)
        target = torch.nan_to_num(labels.float(), nan=0.0)
        terms = F.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight.to(logits),
                                                   reduction="none")  # (B, labels)
        n_known = known.sum().clamp(min=1)
        loss = (terms * known).sum() / n_known  # the mean over known labels (all known: the usual mean)
        with torch.no_grad():
            predicted = (logits > 0).float()
            accuracy = ((predicted == (target > 0.5).float()) & known).sum() / n_known
            label_rate = (target * known).sum() / n_known
        return ClassifierOutput(loss=loss, accuracy=accuracy, positive_rate=predicted.mean(), label_rate=label_rate)
