"""Sample files for OpenAI's ADM evaluation suite (guided-diffusion ``evaluations/evaluator.py``).

The evaluator reads a ``.npz`` whose ``arr_0`` is a uint8 array (N, H, W, 3) in [0, 255]. Its Inception Score
splits the samples into consecutive chunks, so the order matters: class-sorted samples score about 62
instead of 298 for the same model (openai/guided-diffusion#165). Everything written here is therefore
shuffled with a seeded permutation.

``write_adm_npz`` writes an array you already hold. ``AdmNpzWriter`` collects batches into one preallocated
uint8 buffer (a temporary memory-mapped file by default: 50,000 images at 256px are 9.8 GB) and streams the
shuffled rows into the archive chunk by chunk, so no second full copy is made.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path
from types import TracebackType

import numpy as np
import torch
from tqdm.auto import tqdm

from varlib.images import check_uint8_images, unit_float_to_uint8

ADM_ARRAY_KEY = "arr_0"
_ROWS_PER_WRITE = 256


def to_uint8_nhwc(images_BCHW: torch.Tensor) -> np.ndarray:
    """Torch images (B,3,H,W), float in [0, 1] (clamped) or uint8, -> numpy uint8 (B,H,W,3)."""
    if images_BCHW.ndim != 4 or images_BCHW.shape[1] != 3:
        raise ValueError(f"expected images of shape (B,3,H,W), got {tuple(images_BCHW.shape)}")
    if images_BCHW.is_floating_point():
        images_BCHW = unit_float_to_uint8(images_BCHW)
    elif images_BCHW.dtype != torch.uint8:
        raise ValueError(f"expected float images in [0,1] or uint8 images, got dtype {images_BCHW.dtype}")
    return images_BCHW.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def shuffle_permutation(num_images: int, seed: int) -> np.ndarray:
    """The seeded permutation (N,) applied to samples before writing: row i of the file is input row perm[i]."""
    return np.random.default_rng(seed).permutation(num_images)


def _npz_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def _write_rows_npz(path: Path, images_NHWC: np.ndarray, row_order: np.ndarray) -> None:
    """Write ``images_NHWC[row_order]`` as ``arr_0.npy`` inside an uncompressed zip (an ``.npz``), in chunks."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(row_order), *images_NHWC.shape[1:])}
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open(ADM_ARRAY_KEY + ".npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            starts = range(0, len(row_order), _ROWS_PER_WRITE)
            for start in tqdm(starts, desc=f"writing {path.name}", leave=False, disable=len(starts) < 20):
                # Sorting the chunk's indices makes reads from a memmap sequential; the rows are then reordered.
                chunk_order = row_order[start : start + _ROWS_PER_WRITE]
                sorted_positions = np.argsort(chunk_order)
                rows = np.empty((len(chunk_order), *images_NHWC.shape[1:]), dtype=np.uint8)
                rows[sorted_positions] = images_NHWC[chunk_order[sorted_positions]]
                member.write(rows.tobytes())


def write_adm_npz(path: str | Path, images_uint8_NHWC: np.ndarray, seed: int = 0) -> Path:
    """Write images (N,H,W,3) uint8, shuffled by ``shuffle_permutation(N, seed)``, as ``arr_0`` of an ``.npz``.

    ``.npz`` is appended to ``path`` if missing. Returns the written path.
    """
    check_uint8_images(images_uint8_NHWC, channels_last=True)
    if images_uint8_NHWC.shape[0] == 0:
        raise ValueError("expected at least one image, got N=0")
    path = _npz_path(path)
    _write_rows_npz(path, images_uint8_NHWC, shuffle_permutation(images_uint8_NHWC.shape[0], seed))
    return path


def load_adm_npz(path: str | Path) -> np.ndarray:
    """Read ``arr_0`` back and check it is uint8 (N,H,W,3)."""
    with np.load(path) as archive:
        if ADM_ARRAY_KEY not in archive:
            raise ValueError(f"{path}: expected key {ADM_ARRAY_KEY!r}, got {sorted(archive.keys())}")
        images_NHWC = archive[ADM_ARRAY_KEY]
    check_uint8_images(images_NHWC, channels_last=True)
    return images_NHWC


class AdmNpzWriter:
    """Collect ``num_images`` images of size (height, width) batch by batch, then write one shuffled ADM ``.npz``.

    Args:
        path: output file (``.npz`` appended if missing).
        num_images: how many images will be added in total (the buffer is preallocated).
        height, width: image size.
        seed: seed of the shuffle (``shuffle_permutation``).
        use_memmap: back the buffer by a temporary file next to ``path`` (deleted on close) instead of RAM.

    Use as a context manager: on normal exit ``close()`` writes the file; after an exception the buffer is
    dropped and nothing is written::

        with AdmNpzWriter("samples.npz", 50_000, 256, 256) as writer:
            for labels_B in batches:
                writer.add(var.generate(labels_B, seed=seed))  # float [0,1] (B,3,H,W) or uint8 NHWC
    """

    def __init__(
        self, path: str | Path, num_images: int, height: int, width: int, seed: int = 0, use_memmap: bool = True
    ) -> None:
        if num_images < 1 or height < 1 or width < 1:
            raise ValueError(f"expected num_images, height, width >= 1, got {num_images}, {height}, {width}")
        self.path = _npz_path(path)
        self.seed = seed
        self.num_added = 0
        self._scratch = None
        shape = (num_images, height, width, 3)
        if use_memmap:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._scratch = tempfile.NamedTemporaryFile(
                prefix=f".{self.path.stem}-", suffix=".u8", dir=self.path.parent
            )
            self.buffer: np.ndarray | None = np.memmap(self._scratch, dtype=np.uint8, mode="w+", shape=shape)
        else:
            self.buffer = np.empty(shape, dtype=np.uint8)

    @property
    def num_images(self) -> int:
        if self.buffer is None:
            raise ValueError("the writer is closed")
        return self.buffer.shape[0]

    def add(self, images: np.ndarray | torch.Tensor) -> None:
        """Append a batch: numpy uint8 (B,H,W,3), or torch (B,3,H,W) float in [0,1] or uint8."""
        if self.buffer is None:
            raise ValueError("the writer is closed")
        images_NHWC = to_uint8_nhwc(images) if isinstance(images, torch.Tensor) else images
        check_uint8_images(images_NHWC, channels_last=True)
        if images_NHWC.shape[1:] != self.buffer.shape[1:]:
            raise ValueError(f"expected images of size {self.buffer.shape[1:]}, got {images_NHWC.shape[1:]}")
        end = self.num_added + images_NHWC.shape[0]
        if end > self.num_images:
            raise ValueError(
                f"expected at most {self.num_images} images in total, got {end} ({images_NHWC.shape[0]} in this batch)"
            )
        self.buffer[self.num_added : end] = images_NHWC
        self.num_added = end

    def close(self, allow_partial: bool = False) -> Path:
        """Shuffle and write the images added so far; returns the path.

        Raises ValueError if fewer than ``num_images`` were added, unless ``allow_partial``.
        """
        if self.num_added < self.num_images and not allow_partial:
            raise ValueError(
                f"expected {self.num_images} images, got {self.num_added}; pass allow_partial=True to write them"
            )
        if self.num_added == 0:
            raise ValueError("no images were added")
        images_NHWC = self.buffer[: self.num_added]
        _write_rows_npz(self.path, images_NHWC, shuffle_permutation(self.num_added, self.seed))
        self.discard()
        return self.path

    def discard(self) -> None:
        """Drop the buffer (and its temporary file) without writing."""
        self.buffer = None
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None

    def __enter__(self) -> AdmNpzWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            if exc_type is None:
                self.close()
        finally:
            self.discard()
