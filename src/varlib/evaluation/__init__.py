"""Evaluation: FID / IS / precision-recall, ADM sample files, reconstruction quality, codebook usage.

The scaling-law records, fits and plots are :mod:`varlib.evaluation.scaling`, imported on its own so that training
(which imports this package) pulls in neither the fits nor matplotlib."""

from varlib.evaluation.adm_npz import (
    AdmNpzWriter,
    load_adm_npz,
    shuffle_permutation,
    to_uint8_nhwc,
    write_adm_npz,
)
from varlib.evaluation.codebook_usage import CodebookUsage
from varlib.evaluation.emoji_classifier import (
    EmojiClassifier,
    calibration_points,
    emoji_metric,
    emoji_scores,
    labelled_images,
    load_emoji_classifier,
)
from varlib.evaluation.generation_callback import (
    GenerationMetricsCallback,
    gather_in_batch_order,
)
from varlib.evaluation.generative_metrics import (
    GenerativeMetrics,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_score,
    knn_radii,
    precision_recall,
)
from varlib.evaluation.image_quality import MeanPerceptualDistance, ReconstructionMetrics, psnr
from varlib.evaluation.inception import (
    INCEPTION_WEIGHTS_FILENAME,
    FeatureExtractor,
    InceptionV3Features,
    build_inception_extractor,
    find_inception_weights,
)
from varlib.evaluation.reference import ReferenceStatistics, load_reference, write_reference
from varlib.images import signed_float_to_uint8, unit_float_to_uint8  # re-exported: the metrics take uint8

__all__ = [
    "AdmNpzWriter",
    "CodebookUsage",
    "EmojiClassifier",
    "FeatureExtractor",
    "GenerationMetricsCallback",
    "GenerativeMetrics",
    "INCEPTION_WEIGHTS_FILENAME",
    "InceptionV3Features",
    "MeanPerceptualDistance",
    "ReferenceStatistics",
    "ReconstructionMetrics",
    "build_inception_extractor",
    "calibration_points",
    "feature_statistics",
    "emoji_metric",
    "emoji_scores",
    "fid_from_features",
    "find_inception_weights",
    "frechet_distance",
    "gather_in_batch_order",
    "inception_score",
    "knn_radii",
    "labelled_images",
    "load_adm_npz",
    "load_reference",
    "load_emoji_classifier",
    "precision_recall",
    "psnr",
    "shuffle_permutation",
    "signed_float_to_uint8",
    "to_uint8_nhwc",
    "unit_float_to_uint8",
    "write_adm_npz",
    "write_reference",
]
