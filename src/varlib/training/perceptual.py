"""LPIPS perceptual loss (VGG16 trunk) for tokenizer training, built without any network access.

The ``lpips`` package ships its small linear heads but takes its VGG16 trunk from torchvision, which would
download ``vgg16-397923af.pth`` into the torch hub cache. Here the trunk is read from that cache (or from an
explicit file); when the file is missing we raise instead of downloading.
"""

from __future__ import annotations

import bisect
import pickle
import warnings
from pathlib import Path

import lpips
import torch
from torch import Tensor, nn

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILENAME}"
LPIPS_VGG_HEADS_PATH = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"

# lpips cuts torchvision's vgg16().features at these indices into net.slice1..slice5; each layer keeps its
# original index as its name inside the slice, e.g. features.5.weight -> slice2.5.weight.
_LPIPS_SLICE_STARTS = (0, 4, 9, 16, 23)
# The trunk max-pools four times before its last slice.
MIN_IMAGE_SIDE = 16


def default_vgg16_weights_path() -> Path:
    """Where torchvision caches the ImageNet VGG16 weights: ``torch.hub.get_dir()/checkpoints/vgg16-397923af.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME


def _lpips_trunk_key(features_key: str) -> str:
    """Map ``<index>.<param>`` of torchvision's ``vgg16().features`` to lpips' ``slice<k>.<index>.<param>``."""
    index, param = features_key.split(".", 1)
    slice_number = bisect.bisect_right(_LPIPS_SLICE_STARTS, int(index))
    return f"slice{slice_number}.{index}.{param}"


def _read_vgg16_trunk_state(path: Path) -> dict[str, Tensor]:
    """Read a torchvision VGG16 state dict and return its ``features.*`` tensors under lpips' trunk keys."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
        raise ValueError(f"could not read VGG16 weights from {path}: {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"expected a VGG16 state dict in {path}, got {type(state).__name__}")
    prefix = "features."
    return {_lpips_trunk_key(k[len(prefix):]): v for k, v in state.items() if k.startswith(prefix)}


class PerceptualLoss(nn.Module):
    """LPIPS distance with a VGG16 trunk and the v0.1 linear heads; frozen and always in eval mode.

    Args:
        vgg_weights_path: torchvision's ``vgg16-397923af.pth``; defaults to ``default_vgg16_weights_path()``
            (so it follows ``$TORCH_HOME``).
        allow_random_backbone: when that file is missing, build a randomly initialised trunk and warn instead
            of raising ``FileNotFoundError``. Only for smoke tests: the loss is then not perceptual.

    Attributes:
        pretrained_backbone: whether the trunk holds the ImageNet weights.
    """

    def __init__(self, vgg_weights_path: str | Path | None = None, allow_random_backbone: bool = False) -> None:
        super().__init__()
        path = Path(vgg_weights_path) if vgg_weights_path is not None else default_vgg16_weights_path()
        if path.is_file():
            trunk_state = _read_vgg16_trunk_state(path)
        elif allow_random_backbone:
            trunk_state = None
        else:
            raise FileNotFoundError(
                f"LPIPS needs torchvision's ImageNet VGG16 weights at {path}, which does not exist. Download "
                f"{VGG16_URL} and save it as {path} (or under $TORCH_HOME/hub/checkpoints/), or pass "
                f"vgg_weights_path=<file>. allow_random_backbone=True skips this for smoke tests only."
            )

        with warnings.catch_warnings():
            # lpips calls torchvision with its deprecated `pretrained=` argument.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.")
            self.lpips = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)

        self.pretrained_backbone = trunk_state is not None
        if trunk_state is None:
            warnings.warn(
                f"VGG16 weights not found at {path}: using a randomly initialised LPIPS trunk, "
                "so the perceptual loss is not meaningful.",
                UserWarning,
                stacklevel=2,
            )
        else:
            try:
                self.lpips.net.load_state_dict(trunk_state)
            except RuntimeError as err:
                raise ValueError(f"{path} does not hold torchvision's vgg16() weights: {err}") from err

        heads_state = torch.load(LPIPS_VGG_HEADS_PATH, map_location="cpu", weights_only=True)
        for index, head in enumerate(self.lpips.lins):
            prefix = f"lin{index}."
            head.load_state_dict({k[len(prefix):]: v for k, v in heads_state.items() if k.startswith(prefix)})

        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Stay in eval mode whatever the caller asks: this is a fixed metric (its heads contain dropout)."""
        return super().train(False)

    def forward(self, x_BCHW: Tensor, y_BCHW: Tensor, reduction: str = "mean") -> Tensor:
        """LPIPS distance between two image batches.

        Args:
            x_BCHW, y_BCHW: (B, 3, H, W) images in [-1, 1], same shape, H and W >= 16.
            reduction: ``"mean"`` -> scalar, the batch mean; ``"none"`` -> (B,) per-sample distances.

        Gradients flow to the inputs; the network itself has no trainable parameters.
        """
        if x_BCHW.shape != y_BCHW.shape:
            raise ValueError(f"inputs must have the same shape, got {tuple(x_BCHW.shape)} and {tuple(y_BCHW.shape)}")
        if x_BCHW.ndim != 4 or x_BCHW.shape[1] != 3 or min(x_BCHW.shape[-2:]) < MIN_IMAGE_SIDE:
            raise ValueError(
                f"expected images of shape (B, 3, H, W) with H, W >= {MIN_IMAGE_SIDE}, got {tuple(x_BCHW.shape)}"
            )
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        distance_B = self.lpips(x_BCHW, y_BCHW).flatten()
        return distance_B.mean() if reduction == "mean" else distance_B
