"""varlib.evaluation.adm_npz: ADM sample files, one-shot and streamed."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from varlib.evaluation import (
    AdmNpzWriter,
    load_adm_npz,
    shuffle_permutation,
    write_adm_npz,
)


def numbered_images(num: int, size: int = 4) -> np.ndarray:
    """(N,size,size,3) uint8 where image i is filled with i, so rows can be identified after shuffling."""
    return np.broadcast_to(np.arange(num, dtype=np.uint8)[:, None, None, None], (num, size, size, 3)).copy()


def test_write_adm_npz_round_trip_is_a_seeded_shuffle(tmp_path):
    images = numbered_images(12)
    path = write_adm_npz(tmp_path / "samples", images, seed=3)
    assert path.name == "samples.npz"
    loaded = load_adm_npz(path)
    assert loaded.dtype == np.uint8 and loaded.shape == (12, 4, 4, 3)
    order = loaded[:, 0, 0, 0].astype(int)
    assert sorted(order) == list(range(12)) and list(order) != list(range(12))
    np.testing.assert_array_equal(loaded, images[shuffle_permutation(12, 3)])
    np.testing.assert_array_equal(load_adm_npz(write_adm_npz(tmp_path / "again.npz", images, seed=3)), loaded)
    other = load_adm_npz(write_adm_npz(tmp_path / "other.npz", images, seed=4))
    assert list(other[:, 0, 0, 0]) != list(order)
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as member:
        # the ADM evaluator streams the array and only understands format versions 1.0 and 2.0
        assert np.lib.format.read_magic(member) == (1, 0)


def test_write_adm_npz_rejects_bad_arrays(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_adm_npz(tmp_path / "a.npz", numbered_images(3).astype(np.float32))
    with pytest.raises(ValueError, match=r"\(N,H,W,3\)"):
        write_adm_npz(tmp_path / "a.npz", numbered_images(3).transpose(0, 3, 1, 2))
    assert not (tmp_path / "a.npz").exists()


@pytest.mark.parametrize("use_memmap", [True, False])
def test_streaming_writer_equals_one_shot_write(tmp_path, use_memmap):
    images = numbered_images(30, size=6)
    with AdmNpzWriter(tmp_path / "stream.npz", 30, 6, 6, seed=1, use_memmap=use_memmap) as writer:
        writer.add(images[:7])
        as_tensor_01 = torch.from_numpy(images[7:20]).permute(0, 3, 1, 2).float() / 255.0
        writer.add(as_tensor_01)
        writer.add(torch.from_numpy(images[20:]).permute(0, 3, 1, 2))
    expected = load_adm_npz(write_adm_npz(tmp_path / "direct.npz", images, seed=1))
    np.testing.assert_array_equal(load_adm_npz(tmp_path / "stream.npz"), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct.npz", "stream.npz"]  # scratch file removed


def test_streaming_writer_errors_and_no_file_after_exception(tmp_path):
    writer = AdmNpzWriter(tmp_path / "s.npz", 5, 4, 4)
    with pytest.raises(ValueError, match=r"size \(4, 4, 3\)"):
        writer.add(numbered_images(2, size=5))
    writer.add(numbered_images(3))
    with pytest.raises(ValueError, match="at most 5"):
        writer.add(numbered_images(3))
    with pytest.raises(ValueError, match="expected 5 images, got 3"):
        writer.close()
    assert writer.close(allow_partial=True) == tmp_path / "s.npz"
    assert load_adm_npz(tmp_path / "s.npz").shape == (3, 4, 4, 3)

    with pytest.raises(RuntimeError, match="generation failed"):
        with AdmNpzWriter(tmp_path / "t.npz", 5, 4, 4) as failing:
            failing.add(numbered_images(2))
            raise RuntimeError("generation failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]
