"""Zero-shot editing: masks per scale and the model-level API."""

import pytest
import torch

from varlib.models.editing import box_keep_mask, keep_masks_per_scale, token_grid_mask


def test_box_masks_follow_the_official_convention():
    inpaint = box_keep_mask(16, (0.1, 0.1, 0.8, 0.8))
    assert inpaint[0, 0] == 1 and inpaint[5, 5] == 0 and inpaint[2:13, 2:13].sum() == 0
    assert int(inpaint.sum()) == 256 - 11 * 11
    assert torch.equal(box_keep_mask(16, (0.1, 0.1, 0.8, 0.8), inpainting=False), 1 - inpaint)
    with pytest.raises(ValueError, match="0 <= y0 < y1 <= 1"):
        box_keep_mask(16, (0.5, 0.1, 0.2, 0.8))


def test_per_scale_masks_keep_the_coarsest_scale():
    masks = keep_masks_per_scale(torch.zeros(16, 16), (1, 2, 4, 16))
    assert masks[0].all() and not masks[1].any() and not masks[3].any()
    assert [tuple(m.shape) for m in masks] == [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 16, 16)]


def test_pixel_masks_are_averaged_to_the_token_grid():
    pixel = torch.zeros(64, 64)
    pixel[:, :40] = 1  # keep the left 40 pixel columns: token columns 0-9 fully, column 10 half
    grid = token_grid_mask(pixel, 16)
    assert grid.shape == (1, 16, 16) and grid[0, 0, 9] == 1 and grid[0, 0, 10] == 0
    with pytest.raises(ValueError, match="multiple of the token grid"):
        token_grid_mask(torch.ones(20, 20), 16)
    with pytest.raises(ValueError, match=r"mask values must lie in \[0, 1\]"):
        token_grid_mask(torch.full((16, 16), 2.0), 16)


def test_edit_keeps_the_unmasked_region_and_matches_the_sampler(tiny_models):
    vae, var, b = tiny_models
    run = b["sampling"]["inpaint_greedy_null_cfg3"]
    side = b["config"]["image_size"]
    img = var.edit(b["images"], run["edit_mask"], var.num_classes, cfg=3.0, top_k=1, top_p=0.0, seed=0)
    ref = run["img_01"]
    if ref.shape[-1] != side:
        img = torch.nn.functional.avg_pool2d(img, 4)
    torch.testing.assert_close(img, ref, atol=1e-4, rtol=0)
    # keeping everything reproduces the plain reconstruction
    full = var.edit(b["images"], torch.ones(side, side), [1, 2], top_k=1, seed=0)
    torch.testing.assert_close(full, vae.decode_tokens(vae.encode_tokens(b["images"])).add(1).mul(0.5), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="does not match the 2 images"):
        var.edit(b["images"], torch.ones(3, side, side), 1)
