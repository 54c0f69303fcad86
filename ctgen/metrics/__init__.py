"""Evaluation metrics as pure functions on arrays; feature networks are passed in as callables.

FID on 2D slices (axial and 2.5D), FVD-style Fréchet distance on 3D features (with the sample-size
guard and a CI over volumes: ``distribution``), CLIP score, report retrieval with chance level and
image similarity, abnormality AUROC per label and train-on-synthetic summaries, HU checks, a paired
permutation test to compare two runs, and ``summary``: the record every reported number is.
"""

from ctgen.metrics.clip_score import clip_score, cosine, image_similarity
from ctgen.metrics.distribution import FeatureRows, frechet_value, frechet_values
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
from ctgen.metrics.retrieval import distinct_texts, retrieval_ranks, top_k_accuracy
from ctgen.metrics.slices import PLANES, fid_2d, fid_from_features, slice_features, slice_indices, slice_stack, take_slice
from ctgen.metrics.summary import MetricValue, bootstrap_ci, bootstrap_ci_two, mean_with_ci, stems_hash

__all__ = [
    "FeatureRows", "MetricValue", "bootstrap_ci", "bootstrap_ci_two", "distinct_texts", "frechet_value", "frechet_values",
    "mean_with_ci", "retrieval_ranks", "stems_hash", "take_slice", "top_k_accuracy",
    "MACRO", "PLANES", "TISSUES", "auroc", "auroc_per_label", "clip_score", "cosine", "fid_2d",
    "fid_from_features", "fit_gaussian", "flag_out_of_range", "frechet_3d", "frechet_distance",
    "frechet_distance_from_stats", "frechet_distance_scipy", "hu_histogram", "image_similarity",
    "paired_permutation_test", "real_ranges", "run_extractor", "slice_features", "slice_indices",
    "slice_stack", "tissue_stats", "tstr_summary", "volume_features",
]
