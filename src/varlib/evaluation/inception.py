"""Feature extractors for FID, Inception Score and precision/recall.

The reference extractor is torch-fidelity's ``FeatureExtractorInceptionV3``: a PyTorch port of the TensorFlow
Inception graph (``inception-2015-12-05``) that OpenAI's ADM evaluator uses, including its resizing to 299x299.
It gives 2048-d ``pool_3`` features and the 1008-class logits *without* the fc bias (``logits_unbiased``), which
is what the ADM evaluator feeds to its softmax for the Inception Score.

Nothing is downloaded here. The weights file must already be on disk (see ``build_inception_extractor``).

Any other network can be plugged in instead, as long as it follows ``FeatureExtractor``: called on uint8
images (B,3,H,W) it returns ``(features_BD, logits_BK)`` as float tensors. Tests use a tiny random conv net.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from varlib.images import check_uint8_images

INCEPTION_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
# torch-fidelity stores the same converted weights under this name in the torch hub cache.
TORCH_FIDELITY_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URLS = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_WEIGHTS_FILENAME,
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + TORCH_FIDELITY_WEIGHTS_FILENAME,
)


class FeatureExtractor(Protocol):
    """What ``GenerativeMetrics`` needs from a feature network.

    Input: ``images_BCHW`` uint8 in [0, 255], shape (B, 3, H, W), any H and W (the extractor resizes itself).
    Output: ``(features_BD, logits_BK)``, float tensors on the input's device:
      * ``features_BD``: the embedding used for FID and precision/recall (D = 2048 for Inception);
      * ``logits_BK``: class logits used for the Inception Score (K = 1008 for Inception).
    The module is used in eval mode under ``torch.no_grad``.
    """

    def __call__(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class InceptionV3Features(nn.Module):
    """The ADM/TF Inception-v3 as a ``FeatureExtractor``: uint8 (B,3,H,W) -> ((B,2048), (B,1008)).

    Wraps torch-fidelity's port; the logits omit the fc bias, matching the ADM evaluator's Inception Score.
    Build it with ``build_inception_extractor``.
    """

    def __init__(self, weights_path: Path) -> None:
        super().__init__()
        # torch-fidelity unpickles the file with weights_only=False. Loading it first with weights_only=True
        # proves that the file holds nothing but tensors, so that second load cannot run code.
        try:
            torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(
                f"{weights_path} is not a loadable tensor-only state_dict ({type(error).__name__}: {error}); "
                f"expected the Inception weights {INCEPTION_WEIGHTS_FILENAME}"
            ) from error
        # torch-fidelity imports torchvision (seconds), so import it only when the real network is wanted.
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        try:
            self.network = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights_path)
            )
        except RuntimeError as error:  # load_state_dict: missing/unexpected keys or wrong shapes
            raise ValueError(f"{weights_path} does not hold Inception-v3 (2015-12-05) weights: {error}") from error
        self.weights_path = weights_path

    @torch.no_grad()
    def forward(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (B,3,H,W) -> (pool features (B,2048), bias-free logits (B,1008)), float32."""
        check_uint8_images(images_BCHW)
        features_BD, logits_BK = self.network(images_BCHW)
        return features_BD, logits_BK


def inception_weights_candidates(weights_path: str | Path | None = None) -> list[Path]:
    """The paths searched, in order: ``weights_path`` if given, else the torch hub ``checkpoints`` folder
    (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/hub/checkpoints``) under either file name."""
    if weights_path is not None:
        return [Path(weights_path).expanduser()]
    hub_checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    return [hub_checkpoints / INCEPTION_WEIGHTS_FILENAME, hub_checkpoints / TORCH_FIDELITY_WEIGHTS_FILENAME]


def find_inception_weights(weights_path: str | Path | None = None) -> Path:
    """Return the first existing candidate from ``inception_weights_candidates``.

    Raises FileNotFoundError naming the file, every location looked at, and how to get it.
    """
    candidates = inception_weights_candidates(weights_path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = "\n".join(f"  - {path}" for path in candidates)
    urls = "\n".join(f"  {url}" for url in INCEPTION_WEIGHTS_URLS)
    raise FileNotFoundError(
        f"Inception weights {INCEPTION_WEIGHTS_FILENAME} not found. Looked at:\n{looked}\n"
        f"Nothing is downloaded at run time. Download the file once (either URL, same weights):\n{urls}\n"
        f"and put it in {Path(torch.hub.get_dir()) / 'checkpoints'} or pass its path as weights_path."
    )


def build_inception_extractor(weights_path: str | Path | None = None) -> InceptionV3Features:
    """Build the ADM-compatible Inception-v3 extractor from local weights (never downloads).

    Args:
        weights_path: the ``.pth`` file; if None, the torch hub checkpoints folder is searched.
    Returns:
        an ``InceptionV3Features`` in eval mode, mapping uint8 (B,3,H,W) to ((B,2048), (B,1008)).
    Raises:
        FileNotFoundError: the weights are not at any looked-up location (the message says where to get them).
        ValueError: the file exists but is not a tensor-only state_dict.
    """
    return InceptionV3Features(find_inception_weights(weights_path)).eval()
