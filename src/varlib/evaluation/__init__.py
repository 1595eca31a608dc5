"""Evaluation: FID / IS / precision-recall, ADM sample files, reconstruction quality, codebook usage, scaling-law fits."""

from varlib.evaluation.adm_npz import (
    AdmNpzWriter,
    check_uint8_nhwc,
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
from varlib.evaluation.scaling import (
    SCALING_RECORD_FILENAME,
    FrontierFit,
    PowerLawFit,
    ScalingRecord,
    fit_compute_frontier,
    fit_power_law,
    load_runs,
    pareto_frontier,
    plot_scaling_vs_compute,
    plot_scaling_vs_params,
    training_flops,
    write_scaling_record,
)
from varlib.images import signed_float_to_uint8, unit_float_to_uint8  # re-exported: the metrics take uint8

__all__ = [
    "AdmNpzWriter",
    "CodebookUsage",
    "EmojiClassifier",
    "FeatureExtractor",
    "FrontierFit",
    "GenerationMetricsCallback",
    "GenerativeMetrics",
    "INCEPTION_WEIGHTS_FILENAME",
    "InceptionV3Features",
    "MeanPerceptualDistance",
    "PowerLawFit",
    "ReferenceStatistics",
    "ReconstructionMetrics",
    "SCALING_RECORD_FILENAME",
    "ScalingRecord",
    "build_inception_extractor",
    "calibration_points",
    "check_uint8_nhwc",
    "feature_statistics",
    "emoji_metric",
    "emoji_scores",
    "fid_from_features",
    "find_inception_weights",
    "fit_compute_frontier",
    "fit_power_law",
    "frechet_distance",
    "gather_in_batch_order",
    "inception_score",
    "knn_radii",
    "labelled_images",
    "load_adm_npz",
    "load_reference",
    "load_emoji_classifier",
    "load_runs",
    "pareto_frontier",
    "plot_scaling_vs_compute",
    "plot_scaling_vs_params",
    "precision_recall",
    "psnr",
    "shuffle_permutation",
    "signed_float_to_uint8",
    "to_uint8_nhwc",
    "training_flops",
    "unit_float_to_uint8",
    "write_adm_npz",
    "write_reference",
    "write_scaling_record",
]
