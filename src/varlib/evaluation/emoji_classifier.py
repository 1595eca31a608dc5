"""A small emoji-category classifier that varlib ships, the offline measuring stick for emoji models.

Inception weights cannot be downloaded everywhere, and Inception never saw emoji. This CNN is trained on the
bundled emoji train split (``scripts/train_emoji_classifier.py``) at 32 px, the demo's resolution; its weights
(``weights/emoji_classifier.safetensors``) and calibration figures (``weights/emoji_classifier.json``) ship
with the package. It follows ``FeatureExtractor`` (uint8 (B,3,H,W) -> (features (B,64), logits (B,9))), so
``GenerativeMetrics`` and ``varlib-evaluate`` (``inception._target_=varlib.evaluation.load_emoji_classifier``)
use it like Inception.

The emoji protocol (``emoji_scores``): a set of images with their intended classes, 50 per class, is scored by
  * ``class_accuracy``: balanced class accuracy (mean over classes of the share classified as intended);
  * ``feature_distance``: Fréchet distance between its features and those of the reference set, the held-out
    real images drawn class-balanced (``balanced_draw``), 50 per class.
``calibration_points`` measures the same two figures for held-out real images, real images blurred to 8x8 and
back, and uniform noise, so a model's figures can be read against them; ``emoji_metric`` wraps all of it as
one sample metric (the demo's scoring and the ablation's default ``--metric``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from varlib.evaluation.generative_metrics import fid_from_features
from varlib.images import check_uint8_images

WEIGHTS_DIR = Path(__file__).parent / "weights"
EMOJI_CLASSIFIER_WEIGHTS = WEIGHTS_DIR / "emoji_classifier.safetensors"
EMOJI_CLASSIFIER_CALIBRATION = WEIGHTS_DIR / "emoji_classifier.json"
CLASSIFIER_RESOLUTION = 32
FEATURE_DIM = 64
BLUR_RESOLUTION = 8


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 conv + BatchNorm + ReLU layers, then a 2x2 max-pool (halves H and W)."""
    layers = []
    for channels in (in_channels, out_channels):
        layers += [nn.Conv2d(channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.MaxPool2d(2))


class EmojiClassifier(nn.Module):
    """uint8 images (B,3,H,W), any H and W (resized to 32x32) -> (features (B,64), logits (B,num_classes)).

    Three conv blocks (32 -> 16 -> 8 -> 4 px, widths 16/32/64), global average pooling, a 64-d ReLU embedding
    (the features) and a linear classifier. About 77k parameters.
    """

    def __init__(self, num_classes: int = 9, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        self.num_classes = num_classes
        blocks, channels = [], 3
        for width in widths:
            blocks.append(conv_block(channels, width))
            channels = width
        self.trunk = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embedding = nn.Sequential(nn.Linear(channels, FEATURE_DIM), nn.ReLU(inplace=True))
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def forward_unit(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images (B,3,H,W) in [0,1] -> (features (B,64), logits (B,K)); differentiable (training)."""
        if images_BCHW.shape[-2:] != (CLASSIFIER_RESOLUTION, CLASSIFIER_RESOLUTION):
            images_BCHW = F.interpolate(images_BCHW, size=(CLASSIFIER_RESOLUTION, CLASSIFIER_RESOLUTION),
                                        mode="bilinear", antialias=True, align_corners=False)
        features_BD = self.embedding(self.trunk(images_BCHW * 2.0 - 1.0))
        return features_BD, self.head(features_BD)

    @torch.no_grad()
    def forward(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``FeatureExtractor`` call: uint8 (B,3,H,W) -> (features (B,64), logits (B,K)), float32."""
        check_uint8_images(images_BCHW)
        return self.forward_unit(images_BCHW.float() / 255.0)

    @torch.no_grad()
    def classify(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images (B,3,H,W) in [0,1] -> (features (B,64), class probabilities (B,K))."""
        if images_BCHW.ndim != 4 or images_BCHW.shape[1] != 3 or not images_BCHW.is_floating_point():
            raise ValueError(f"expected float images (B,3,H,W) in [0,1], got {images_BCHW.dtype} "
                             f"{tuple(images_BCHW.shape)}")
        features_BD, logits_BK = self.forward_unit(images_BCHW.clamp(0, 1))
        return features_BD, logits_BK.softmax(dim=1)


def load_emoji_classifier(weights_path: str | Path | None = None) -> EmojiClassifier:
    """The shipped emoji classifier (or the one at ``weights_path``, a safetensors file), in eval mode.

    Raises FileNotFoundError when the file is absent and ValueError when it does not hold this network.
    """
    path = EMOJI_CLASSIFIER_WEIGHTS if weights_path is None else Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"emoji classifier weights: expected a safetensors file at {path}, got nothing "
                                "there (train one with scripts/train_emoji_classifier.py)")
    try:
        state = load_file(path)
    except Exception as error:
        raise ValueError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error})") from error
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 9
    classifier = EmojiClassifier(num_classes)
    try:
        classifier.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{path} does not hold EmojiClassifier weights: {error}") from error
    return classifier.eval()


def balanced_draw(labels_N: torch.Tensor, num_classes: int, per_class: int, seed: int) -> torch.Tensor:
    """Indices (num_classes * per_class,) drawing ``per_class`` items of every class, class by class: a random
    permutation of the class's items, repeated when it has fewer than ``per_class`` (so every item appears)."""
    generator = torch.Generator().manual_seed(seed)
    draws = []
    for label in range(num_classes):
        members = torch.nonzero(labels_N == label).flatten()
        if members.numel() == 0:
            raise ValueError(f"class {label} has no images to draw from")
        repeats = -(-per_class // members.numel())
        order = torch.cat([members[torch.randperm(members.numel(), generator=generator)] for _ in range(repeats)])
        draws.append(order[:per_class])
    return torch.cat(draws)


def blur(images_BCHW: torch.Tensor, resolution: int = BLUR_RESOLUTION) -> torch.Tensor:
    """Float images (B,3,H,W) in [0,1] down to ``resolution`` (antialiased) and back up (bilinear)."""
    small = F.interpolate(images_BCHW, size=(resolution, resolution), mode="bilinear", antialias=True,
                          align_corners=False)
    return F.interpolate(small, size=images_BCHW.shape[-2:], mode="bilinear", align_corners=False).clamp(0, 1)


@torch.no_grad()
def emoji_scores(classifier: EmojiClassifier, images_BCHW: torch.Tensor, labels_B: torch.Tensor,
                 reference_features_ND: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    """``class_accuracy`` and ``feature_distance`` of float images (B,3,H,W) in [0,1] meant as ``labels_B``
    (see the module docstring), against reference features (N,64)."""
    features, predictions = [], []
    for chunk in images_BCHW.split(batch_size):
        features_BD, probs_BK = classifier.classify(chunk)
        features.append(features_BD)
        predictions.append(probs_BK.argmax(dim=1))
    predicted_B = torch.cat(predictions)
    per_class = [(predicted_B[labels_B == c] == c).float().mean() for c in labels_B.unique()]
    return {"class_accuracy": float(torch.stack(per_class).mean()),
            "feature_distance": fid_from_features(reference_features_ND, torch.cat(features))}


def images_of(dataset, indices: torch.Tensor) -> torch.Tensor:
    """Float images (B,3,H,W) in [0,1] of dataset items (image in [-1,1], label) at ``indices``."""
    return torch.stack([dataset[int(i)][0] for i in indices]).add(1).div(2)


def dataset_labels(dataset) -> torch.Tensor:
    """Labels (N,) of a ``CachedImageDataset`` without decoding its images."""
    return dataset.labels_N[torch.as_tensor(dataset.indices)]


def labelled_images(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item of a ``CachedImageDataset``: float images (N,3,H,W) in [0,1] and labels (N,), in order."""
    labels_N = dataset_labels(dataset)
    return images_of(dataset, torch.arange(len(labels_N))), labels_N


@torch.no_grad()
def calibration_points(classifier: EmojiClassifier, images_NCHW: torch.Tensor, labels_N: torch.Tensor,
                       per_class: int = 50, seed: int = 0) -> tuple[torch.Tensor, dict[str, dict[str, float]]]:
    """From the held-out set (float images (N,3,H,W) in [0,1], labels (N,)): the reference features
    (K*per_class, 64) of draw ``seed`` and the scores of three calibration sets of the same size: ``real``
    (another draw, ``seed + 1``), ``blurred_8x8`` (that draw blurred to 8x8 and back) and ``noise`` (uniform
    noise); K is the classifier's number of classes."""
    if images_NCHW.shape[0] != labels_N.shape[0]:
        raise ValueError(f"expected one label per held-out image, got {images_NCHW.shape[0]} images and "
                         f"{labels_N.shape[0]} labels")
    reference = balanced_draw(labels_N, classifier.num_classes, per_class, seed)
    reference_features = torch.cat([classifier.classify(chunk)[0] for chunk in images_NCHW[reference].split(256)])
    draw = balanced_draw(labels_N, classifier.num_classes, per_class, seed + 1)
    real_BCHW, draw_labels = images_NCHW[draw], labels_N[draw]
    noise_BCHW = torch.rand(real_BCHW.shape, generator=torch.Generator().manual_seed(seed))
    points = {name: emoji_scores(classifier, images, draw_labels, reference_features)
              for name, images in (("real", real_BCHW), ("blurred_8x8", blur(real_BCHW)), ("noise", noise_BCHW))}
    return reference_features, points


def emoji_metric(reference_images_NCHW: torch.Tensor, reference_labels_N: torch.Tensor, per_class: int = 50,
                 seed: int = 0, classifier: EmojiClassifier | None = None):
    """The emoji protocol as a sample metric: ``metric(images (B,3,H,W) in [0,1], labels (B,)) -> dict``.

    The reference features and calibration points come from the held-out set given here (``per_class`` per
    class, draw ``seed``; the shipped classifier unless one is given). The dict holds ``class_accuracy``,
    ``feature_distance``, ``per_class``, the ``calibration`` points and ``halfway_progress``; the demo and the
    ablation (whose default ``--metric`` this is) both report it.
    """
    classifier = load_emoji_classifier() if classifier is None else classifier
    reference_features, points = calibration_points(classifier, reference_images_NCHW, reference_labels_N,
                                                    per_class, seed)

    def metric(images_BCHW: torch.Tensor, labels_B: torch.Tensor) -> dict:
        scores = emoji_scores(classifier, images_BCHW, labels_B, reference_features)
        return {**scores, "per_class": per_class, "calibration": points,
                "halfway_progress": halfway_progress(scores, points)}

    return metric


def halfway_progress(scores: dict[str, float], points: dict[str, dict[str, float]]) -> dict[str, float]:
    """Where ``scores`` lie from the 8x8-blurred point (0) to the real point (1), per figure (>= 0.5 is
    at least halfway); NaN where the two points coincide."""
    progress = {}
    for key in ("class_accuracy", "feature_distance"):
        span = points["real"][key] - points["blurred_8x8"][key]
        progress[key] = (scores[key] - points["blurred_8x8"][key]) / span if span != 0 else float("nan")
    return progress
