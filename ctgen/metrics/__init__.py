"""Evaluation metrics as pure functions on arrays; feature networks are passed in as callables.

FID on 2D slices (axial and 2.5D), FVD-style Fréchet distance on 3D features, CLIP score and
image similarity, abnormality AUROC per label and train-on-synthetic summaries, HU checks, and a
paired permutation test to compare two runs.
"""

from ctgen.metrics.clip_score import clip_score, cosine, image_similarity
from ctgen.metrics.faithfulness import MACRO, auroc, auroc_per_label, tstr_summary
from ctgen.metrics.features import run_extractor, volume_features
from ctgen.metrics.frechet import (
    fit_gaussian,
    frechet_3d,
    frechet_distance,
    frechet_distance_from_stats,
    frechet_distance_scipy,
)
from ctgen.metrics.hu import TISSUES, flag_out_of_range, hu_histogram, real_ranges, tissue_stats
from ctgen.metrics.permutation import paired_permutation_test
from ctgen.metrics.slices import PLANES, fid_2d, fid_from_features, slice_features, slice_indices, slice_stack

__all__ = [
    "MACRO", "PLANES", "TISSUES", "auroc", "auroc_per_label", "clip_score", "cosine", "fid_2d",
    "fid_from_features", "fit_gaussian", "flag_out_of_range", "frechet_3d", "frechet_distance",
    "frechet_distance_from_stats", "frechet_distance_scipy", "hu_histogram", "image_similarity",
    "paired_permutation_test", "real_ranges", "run_extractor", "slice_features", "slice_indices",
    "slice_stack", "tissue_stats", "tstr_summary", "volume_features",
]
