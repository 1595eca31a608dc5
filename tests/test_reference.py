"""varlib.evaluation.reference: reference statistics files."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.extractors import TinyExtractor, random_uint8_images

from varlib.evaluation import (
    feature_statistics,
    load_reference,
    write_reference,
)


def test_reference_statistics_equal_one_shot_statistics_and_keep_a_uniform_sample(tmp_path):
    images = random_uint8_images(50, seed=3)
    written = write_reference(tmp_path / "ref.npz", TinyExtractor(), images.split(8), keep_images=20, seed=1)
    mu, sigma = feature_statistics(TinyExtractor().eval()(images)[0].detach())
    loaded = load_reference(tmp_path / "ref.npz")
    np.testing.assert_allclose(loaded.mu, mu, rtol=0, atol=1e-10)
    np.testing.assert_allclose(loaded.sigma, sigma, rtol=0, atol=1e-10)
    assert loaded.images_NHWC.shape == (20, 16, 16, 3) and np.array_equal(loaded.images_NHWC, written.images_NHWC)
    all_rows = {image.tobytes() for image in images.permute(0, 2, 3, 1).numpy()}
    kept_rows = {image.tobytes() for image in loaded.images_NHWC}
    assert len(kept_rows) == 20 and kept_rows <= all_rows
    first_twenty = {image.tobytes() for image in images[:20].permute(0, 2, 3, 1).numpy()}
    assert kept_rows != first_twenty  # a sample of all 50, not the first ones


def test_reference_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        load_reference(tmp_path / "absent.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz.*unreadable"):
        load_reference(tmp_path / "bad.npz")
    np.savez(tmp_path / "images_only.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="missing \\['mu', 'sigma'\\]"):
        load_reference(tmp_path / "images_only.npz")
