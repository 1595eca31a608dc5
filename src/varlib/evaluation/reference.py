"""Reference statistics for FID / precision-recall, in the ADM reference batch ``.npz`` format.

One file made once from real images (an image folder, WebDataset shards or an array) holds:

* ``mu`` (D,) and ``sigma`` (D,D): mean and unbiased covariance of the extractor's features over *all* images
  (float64), what FID needs;
* ``arr_0`` (N,H,W,3) uint8: a uniform random sample of at most ``keep_images`` of those images (reservoir
  sampling, seeded), what precision/recall needs (their features are extracted when the file is used).

OpenAI's ADM reference batches (e.g. ``VIRTUAL_imagenet256_labeled.npz``) have the same keys, so either kind
of file can be the reference of ``GenerationMetricsCallback``; statistics are only comparable when made by the
same extractor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from varlib.configs import datamodule_config, instantiate_config
from varlib.data.base import check_int_at_least, images_from_batch
from varlib.evaluation.adm_npz import ADM_ARRAY_KEY
from varlib.images import check_uint8_images, signed_float_to_uint8
from varlib.inference import resolve_device

logger = logging.getLogger(__name__)


@dataclass
class ReferenceStatistics:
    """Feature mean (D,), covariance (D,D), and real images (N,H,W,3) uint8 or None."""

    mu: np.ndarray
    sigma: np.ndarray
    images_NHWC: np.ndarray | None


class _StreamingMoments:
    """Mean and unbiased covariance of rows added batch by batch, in float64 (shifted by the first batch's
    mean, so large feature offsets do not cancel catastrophically)."""

    def __init__(self) -> None:
        self.count = 0
        self.shift_D: np.ndarray | None = None
        self.sum_D: np.ndarray | None = None
        self.outer_DD: np.ndarray | None = None

    def add(self, rows_ND: np.ndarray) -> None:
        rows_ND = np.asarray(rows_ND, dtype=np.float64)
        if self.shift_D is None:
            self.shift_D = rows_ND.mean(axis=0)
            self.sum_D = np.zeros_like(self.shift_D)
            self.outer_DD = np.zeros((rows_ND.shape[1], rows_ND.shape[1]))
        centred_ND = rows_ND - self.shift_D
        self.sum_D += centred_ND.sum(axis=0)
        self.outer_DD += centred_ND.T @ centred_ND
        self.count += rows_ND.shape[0]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f"reference statistics need at least 2 images, got {self.count}")
        mean_D = self.sum_D / self.count
        covariance_DD = (self.outer_DD - self.count * np.outer(mean_D, mean_D)) / (self.count - 1)
        return mean_D + self.shift_D, covariance_DD


@torch.no_grad()
def write_reference(
    path: str | Path,
    extractor: nn.Module,
    image_batches: Iterable[torch.Tensor],
    device: torch.device | str = "cpu",
    keep_images: int = 10_000,
    seed: int = 0,
) -> ReferenceStatistics:
    """Extracts features of every uint8 batch (B,3,H,W), writes ``mu``, ``sigma`` and ``arr_0`` to ``path``.

    ``keep_images`` real images (a uniform sample of all of them) are stored for precision/recall; 0 stores
    none. Returns what was written.
    """
    if keep_images < 0:
        raise ValueError(f"keep_images must be >= 0, got {keep_images}")
    extractor = extractor.to(device).eval()
    moments, kept, seen = _StreamingMoments(), [], 0
    generator = np.random.default_rng(seed)
    for images_BCHW in image_batches:
        if images_BCHW.dtype != torch.uint8 or images_BCHW.ndim != 4 or images_BCHW.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B,3,H,W), got {images_BCHW.dtype} {tuple(images_BCHW.shape)}")
        features_BD = extractor(images_BCHW.to(device))[0]
        moments.add(features_BD.double().cpu().numpy())
        for image_HWC in images_BCHW.permute(0, 2, 3, 1).cpu().numpy():
            # reservoir sampling: image number `seen` replaces a kept one with probability keep / (seen + 1)
            if len(kept) < keep_images:
                kept.append(image_HWC)
            elif keep_images and (slot := generator.integers(seen + 1)) < keep_images:
                kept[slot] = image_HWC
            seen += 1
    mu, sigma = moments.result()
    images_NHWC = np.stack(kept) if kept else None
    arrays = {"mu": mu, "sigma": sigma} | ({ADM_ARRAY_KEY: images_NHWC} if images_NHWC is not None else {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:  # a file object: numpy does not append .npz to the name
        np.savez(file, **arrays)
    return ReferenceStatistics(mu, sigma, images_NHWC)


def load_reference(path: str | Path) -> ReferenceStatistics:
    """Reads a reference file (``write_reference`` or an ADM reference batch): ``mu``, ``sigma``, optional
    ``arr_0``. Raises FileNotFoundError or ValueError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics: expected an .npz file at {path}, got nothing there "
                                "(make one with varlib-reference)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as error:  # zipfile/numpy raise several types for unreadable files
        raise ValueError(f"{path}: expected an .npz reference file, got an unreadable file "
                         f"({type(error).__name__}: {error})") from error
    missing = {"mu", "sigma"} - arrays.keys()
    if missing:
        raise ValueError(f"{path}: expected arrays mu and sigma (feature statistics), missing {sorted(missing)}; "
                         f"found {sorted(arrays)}")
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: expected mu (D,) and sigma (D,D), got {mu.shape} and {sigma.shape}")
    images_NHWC = arrays.get(ADM_ARRAY_KEY)
    if images_NHWC is not None:
        check_uint8_images(images_NHWC, channels_last=True)
    return ReferenceStatistics(mu, sigma, images_NHWC)


def write_data_reference(cfg: DictConfig) -> ReferenceStatistics:
    """``varlib-reference``: writes ``cfg.out`` from the validation images of a ``reference`` config's ``cfg.data``
    (``conf/reference.yaml``) and returns what was written."""
    check_int_at_least("keep_images", cfg.keep_images, 0)
    datamodule = instantiate_config(datamodule_config(cfg.data))
    datamodule.setup("validate")
    extractor = instantiate_config(cfg.inception)
    batches = (signed_float_to_uint8(images_from_batch(batch)) for batch in datamodule.val_dataloader()
               if batch is not None)  # None: every sample of the batch was unreadable
    if cfg.max_batches is not None:
        batches = islice(batches, cfg.max_batches)
    written = write_reference(cfg.out, extractor, batches, resolve_device(cfg.device), cfg.keep_images, cfg.seed)
    logger.info("wrote %s: %d-d statistics, %d images kept", cfg.out, written.mu.shape[0],
                0 if written.images_NHWC is None else written.images_NHWC.shape[0])
    return written
