"""The inference command-line tools (varlib-sample, -edit, -evaluate, -tokenize) on tiny random models.

Configs are composed from the repository's conf/ with Hydra's compose API and passed to each tool's
``run``; a few runs go through ``python -m varlib.cli.<tool>`` to check the real entry point and exit codes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

import varlib
from varlib.cli.entry import run_or_exit
from varlib.data.tokenizing import tokenize_dataset
from varlib.evaluation.sampling_eval import evaluate_samples
from varlib.generate_files import edit_to_file, sample_to_files
from varlib.generation import parse_label, parse_labels
from varlib.configs import compose_config
from varlib.data import ImageTransform
from varlib.data.token_cache import TokenCacheDataModule, TokenDataset, read_index
from varlib.evaluation import (
    fid_from_features,
    inception_score,
    load_adm_npz,
    precision_recall,
    shuffle_permutation,
    signed_float_to_uint8,
    to_uint8_nhwc,
    write_adm_npz,
)
from varlib.images import image_grid
from varlib.inference import edit_keep_mask, inference_precision, resolve_precision
from varlib.models.editing import box_keep_mask
from varlib.models.sampling import SamplingConfig, sample_per_class

DATA = Path(__file__).parent / "data"
SIDE = 32  # tiny model resolution: last patch number 16 x downsample 2
NUM_CLASSES = 3


class TinyExtractor(nn.Module):
    """A stand-in ``FeatureExtractor``: uint8 (B,3,H,W) -> (features (B,16), logits (B,5)) from a small conv net.

    Takes ``weights_path`` like ``build_inception_extractor`` and loads that state dict when given.
    """

    def __init__(self, weights_path: str | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.head = nn.Linear(16, 5)
        if weights_path is not None:
            self.load_state_dict(torch.load(weights_path, weights_only=True))

    def forward(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.conv(images_BCHW.float() / 127.5 - 1).relu()
        features_BD = torch.cat([maps.mean((2, 3)), maps.std((2, 3))], dim=1)
        return features_BD, self.head(features_BD)


EXTRACTOR_TARGET = f"{TinyExtractor.__module__}.{TinyExtractor.__qualname__}"


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def smooth_image(height: int, width: int, seed: int) -> Image.Image:
    """A smooth random RGB image (bilinear blow-up of a 4x4 colour grid)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=generator)
    pixels = nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return Image.fromarray(to_uint8_nhwc(pixels)[0])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(var, path of its varlib file): a random 32px VAR over 5 scales with 3 classes."""
    torch.manual_seed(0)
    vae = varlib.MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, patch_nums=(1, 2, 4, 8, 16), ch_mult=(1, 1),
                                 num_res_blocks=1, using_sa=False, using_mid_sa=False)
    var = varlib.VAR(vae, varlib.VARConfig(depth=2, num_classes=NUM_CLASSES, width=64, num_heads=2))
    path = tmp_path_factory.mktemp("model") / "tiny_var.safetensors"
    varlib.save_var(var, path)
    return varlib.load(path), path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """root/{train,val}/{a,b}/*.png of varied sizes, plus one corrupt train file."""
    root = tmp_path_factory.mktemp("folder")
    for split, count in (("train", 3), ("val", 2)):
        for label, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                image = smooth_image(36 + 4 * index, 40, seed=100 * label + 10 * index + len(split))
                image.save(folder / f"{index}.png")
    (root / "train" / "a" / "9_corrupt.png").write_bytes(b"not a png")
    return root


# -- varlib-sample ------------------------------------------------------------------------------------


def test_sample_grid_rows_per_class_files_and_per_batch_seeds(tiny, tmp_path):
    var, path = tiny
    overrides = [f"checkpoint={path}", "labels=null", "per_class=2", "batch_size=4", "seed=5", "top_k=20", "device=cpu"]
    result = sample_to_files(compose_config("sample", overrides + [f"out_dir={tmp_path / 'a'}"]))

    assert result.labels == [0, 0, 1, 1, 2, 2]
    assert [p.name for p in result.image_paths] == [f"{i:05d}_class{c}.png" for i, c in enumerate(result.labels)]
    images = [read_png(p) for p in result.image_paths]
    assert all(image.shape == (SIDE, SIDE, 3) for image in images)
    # Class c is sampled with seed 5 + 1000 c (one batch of 2 each), top_k from the command, the rest the model's.
    expected = np.concatenate([to_uint8_nhwc(var.generate([c, c], top_k=20, seed=5 + 1000 * c))
                               for c in range(NUM_CLASSES)])
    np.testing.assert_array_equal(np.stack(images), expected)

    grid = read_png(result.grid_path)
    pad, cell = 2, SIDE + 2
    assert grid.shape == (NUM_CLASSES * cell + pad, 2 * cell + pad, 3)  # one row per class, per_class columns
    for index, image in enumerate(images):
        row, column = divmod(index, 2)
        top, left = pad + row * cell, pad + column * cell
        np.testing.assert_array_equal(grid[top:top + SIDE, left:left + SIDE], image)

    again = sample_to_files(compose_config("sample", overrides + [f"out_dir={tmp_path / 'b'}"]))
    for first, second in zip(result.image_paths + [result.grid_path], again.image_paths + [again.grid_path]):
        assert first.read_bytes() == second.read_bytes()


def test_sample_without_sampling_keys_uses_the_model_files_settings(tiny, tmp_path, monkeypatch):
    """No cfg/top_k/top_p on the command line: the file's own ``sampling``, the images of ``sample_per_class``."""
    var, _ = tiny
    own = SamplingConfig(cfg=3.0, top_k=4, top_p=0.6)
    assert own != SamplingConfig()
    monkeypatch.setattr(var, "sampling", own)
    path = tmp_path / "own_sampling.safetensors"
    varlib.save_var(var, path)
    loaded = varlib.load(path)
    assert loaded.sampling == own
    result = sample_to_files(compose_config("sample", [f"checkpoint={path}", "per_class=3", "batch_size=2", "seed=7",
                                                  "device=cpu", f"out_dir={tmp_path / 'cli'}"]))
    cli_NHWC = np.stack([read_png(p) for p in result.image_paths])
    np.testing.assert_array_equal(cli_NHWC, to_uint8_nhwc(sample_per_class(loaded, 3, seed=7, batch_size=2)))
    # ... which are not the images of SamplingConfig's defaults (what a config value would have forced)
    defaults_NHWC = to_uint8_nhwc(sample_per_class(loaded, 3, seed=7, batch_size=2, cfg=1.5, top_k=900, top_p=0.96))
    assert (cli_NHWC != defaults_NHWC).any()


@pytest.mark.slow  # starts a Python process (imports take seconds)
def test_sample_command_line_overrides_match_in_process_run(tiny, tmp_path):
    _, path = tiny
    overrides = [f"checkpoint={path}", "labels=[0,1,3]", "seed=3", "cfg=2.0", "top_k=10", "device=cpu"]
    command = [sys.executable, "-m", "varlib.cli.sample", *overrides, f"out_dir={tmp_path / 'cli'}",
               f"hydra.run.dir={tmp_path / 'hydra'}"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-2000:]

    in_process = sample_to_files(compose_config("sample", overrides + [f"out_dir={tmp_path / 'api'}"]))
    names = ["00000_class0.png", "00001_class1.png", "00002_class3.png", "grid.png"]  # 3 = unconditional
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == names
    for name in names:
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "api" / name).read_bytes()
    assert read_png(in_process.grid_path).shape == (SIDE + 4, 3 * (SIDE + 2) + 2, 3)  # one row of 3


@pytest.mark.slow  # starts a Python process (imports take seconds)
def test_bad_label_exits_with_status_2_and_names_the_range(tiny, tmp_path):
    _, path = tiny
    command = [sys.executable, "-m", "varlib.cli.sample", f"checkpoint={path}", "labels=[0,5]", "device=cpu",
               f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 2
    assert f"integer in [0, {NUM_CLASSES}]" in output and "got 5" in output
    assert "Traceback" not in output
    assert not list(tmp_path.glob("*.png"))


def test_official_checkpoints_sample_like_the_official_code(tmp_path):
    bundle = torch.load(DATA / "official_tiny4.pt", weights_only=True)
    torch.save(bundle["vqvae_state_dict"], tmp_path / "vae.pth")
    torch.save(bundle["var_state_dict"], tmp_path / "var.pth")
    run = bundle["sampling"]["sample_seed0_cfg1p5_k50_p0p9"]
    kwargs = run["kwargs"]
    config = compose_config("sample", [
        f"official.vae={tmp_path / 'vae.pth'}", f"official.var={tmp_path / 'var.pth'}", "official.patch_nums=[1,2,3,4]",
        f"labels={list(kwargs['label_B'])}", f"cfg={kwargs['cfg']}", f"top_k={kwargs['top_k']}",
        f"top_p={kwargs['top_p']}", f"seed={kwargs['g_seed']}", "batch_size=2", "device=cpu",
        f"out_dir={tmp_path / 'out'}"])
    result = sample_to_files(config)
    got = np.stack([read_png(p) for p in result.image_paths]).astype(int)
    want = to_uint8_nhwc(run["img_01"]).astype(int)
    assert np.abs(got - want).max() <= 1  # PNG rounding of the official [0,1] images


def test_model_source_errors_exit_2(tiny, tmp_path, caplog):
    _, path = tiny
    cases = [
        ([f"checkpoint={tmp_path / 'missing.safetensors'}"], "missing.safetensors"),
        ([f"checkpoint={path}", f"official.vae={path}"], "expected exactly one model source"),
        ([], "expected exactly one model source"),
    ]
    for overrides, message in cases:
        caplog.clear()
        with pytest.raises(SystemExit) as exit_info:
            run_or_exit(sample_to_files, compose_config("sample", overrides + ["device=cpu", f"out_dir={tmp_path}"]))
        assert exit_info.value.code == 2
        assert message in caplog.text


def test_label_parsing_and_grid_layout():
    assert parse_labels(None, 3, 2) == [0, 0, 1, 1, 2, 2]
    assert parse_labels(2, 3, 1) == [2]
    assert parse_label(None, 3) == 3
    for bad in (4, -1, True, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 3\]"):
            parse_label(bad, 3)
    with pytest.raises(ValueError, match="at least one"):
        parse_labels([], 3, 1)
    grid = image_grid(torch.arange(5.0).view(5, 1, 1, 1).expand(5, 3, 2, 2), columns=2, padding=1, fill=-1)
    assert grid.shape == (3, 3 * 3 + 1, 2 * 3 + 1)
    assert grid[0, 4, 4].item() == 3.0 and grid[0, 7, 1].item() == 4.0  # cells are 3 px: image 3 at (1, 1)
    assert grid[0, 7, 4].item() == -1.0 and grid[0, 3, 3].item() == -1.0  # the empty cell (2, 1) and padding


# -- varlib-edit --------------------------------------------------------------------------------------


BOX = (0.375, 0.375, 0.625, 0.625)  # pixels 12:20 of 32


@pytest.fixture
def photo(tmp_path) -> Path:
    """An 80x72 image: the transform resizes it to 40x36 (factor 2) and crops 32x32 at (left 4, top 2)."""
    path = tmp_path / "photo.png"
    smooth_image(72, 80, seed=7).save(path)
    return path


def edit_config(model_path: Path, image: Path, out: Path, *extra: str):
    return compose_config("edit", [f"checkpoint={model_path}", f"image={image}", f"out={out}", "label=1", "seed=0",
                                   "device=cpu", *extra])


def test_edit_box_matches_the_api_and_keeps_the_outside(tiny, photo, tmp_path):
    var, path = tiny
    result = edit_to_file(edit_config(path, photo, tmp_path / "edited.png", f"box={list(BOX)}", "mode=inpaint"))
    edited = read_png(result.path)
    assert edited.shape == (SIDE, SIDE, 3)

    image_13HW = ImageTransform(SIDE, train=False)(Image.open(photo).convert("RGB")).unsqueeze(0)
    keep_HW = box_keep_mask(SIDE, BOX, inpainting=True)
    torch.testing.assert_close(result.keep_mask, keep_HW)
    expected = var.edit(image_13HW, keep_HW, [1], seed=0)  # the model's own sampling settings
    np.testing.assert_array_equal(edited, to_uint8_nhwc(expected)[0])

    # The kept tokens are the input's own: away from the box the edit stays near the reconstruction,
    # much nearer than a free sample does, and the box itself changes more than the outside.
    reconstruction = to_uint8_nhwc(var.vae.decode_tokens(var.vae.encode_tokens(image_13HW)).add(1).div(2))[0]
    free_sample = to_uint8_nhwc(var.generate([1], seed=0))[0]
    error_edit = np.abs(edited.astype(float) - reconstruction).mean(-1) / 255
    error_free = np.abs(free_sample.astype(float) - reconstruction).mean(-1) / 255
    box = ~keep_HW.bool().numpy()
    far = np.ones((SIDE, SIDE), dtype=bool)
    far[6:26, 6:26] = False  # at least 3 tokens (6 px) from the box
    assert error_edit[far].mean() < 0.5 * error_free[far].mean()
    assert error_edit[box].mean() > 1.5 * error_edit[~box].mean()


def test_edit_mask_image_white_regenerates_and_follows_the_crop(tiny, photo, tmp_path):
    _, path = tiny
    from_box = edit_to_file(edit_config(path, photo, tmp_path / "box.png", f"box={list(BOX)}"))
    # Full-size mask: white rows 28:44 and columns 32:48 land on 12:20 after the 2x resize and crop (2, 4).
    full = np.zeros((72, 80), dtype=np.uint8)
    full[28:44, 32:48] = 255
    Image.fromarray(full).save(tmp_path / "mask_full.png")
    small = np.zeros((SIDE, SIDE), dtype=np.uint8)
    small[12:20, 12:20] = 255
    Image.fromarray(small).convert("RGB").save(tmp_path / "mask_model.png")
    for mask in ("mask_full.png", "mask_model.png"):
        result = edit_to_file(edit_config(path, photo, tmp_path / f"from_{mask}", f"mask={tmp_path / mask}"))
        torch.testing.assert_close(result.keep_mask, from_box.keep_mask)
        assert result.path.read_bytes() == from_box.path.read_bytes()
    outpaint_keep = edit_keep_mask(ImageTransform(SIDE, train=False), "outpaint", box=list(BOX))
    torch.testing.assert_close(outpaint_keep, 1 - from_box.keep_mask)


def test_edit_bad_inputs_exit_2_with_expected_and_got(tiny, photo, tmp_path, caplog):
    _, path = tiny
    Image.new("L", (20, 20)).save(tmp_path / "small_mask.png")
    Image.new("L", (80, 72)).save(tmp_path / "black_mask.png")
    cases = [
        ([f"mask={tmp_path / 'small_mask.png'}"],
         "(20, 20) must equal the image size (80, 72) or the model resolution (32, 32)"),
        ([f"mask={tmp_path / 'black_mask.png'}"], "covers no token"),
        ([f"mask={tmp_path / 'nowhere.png'}"], "nowhere.png"),
        (["box=[0.5,0.5,0.25,1.0]"], "0 <= y0 < y1 <= 1"),
        (["box=[0.1,0.1,0.5]"], "got [0.1, 0.1, 0.5]"),
        ([f"box={list(BOX)}", "mode=sideways"], "got 'sideways'"),
        ([f"box={list(BOX)}", "label=7"], "got 7"),
        ([], "exactly one region"),
    ]
    for overrides, message in cases:
        caplog.clear()
        with pytest.raises(SystemExit) as exit_info:
            run_or_exit(edit_to_file, edit_config(path, photo, tmp_path / "never.png", *overrides))
        assert exit_info.value.code == 2, overrides
        assert message in caplog.text, (overrides, caplog.text)
    missing_image = edit_config(path, tmp_path / "no_photo.jpg", tmp_path / "never.png", f"box={list(BOX)}")
    with pytest.raises(SystemExit):
        run_or_exit(edit_to_file, missing_image)
    assert "no_photo.jpg" in caplog.text
    assert not (tmp_path / "never.png").exists()


# -- varlib-evaluate ----------------------------------------------------------------------------------


@pytest.fixture
def extractor_weights(tmp_path) -> tuple[TinyExtractor, Path]:
    torch.manual_seed(1)
    extractor = TinyExtractor().eval()
    path = tmp_path / "tiny_extractor.pth"
    torch.save(extractor.state_dict(), path)
    return extractor, path


def test_evaluate_writes_shuffled_npz_and_metrics_from_the_plugged_extractor(tiny, extractor_weights, tmp_path):
    var, path = tiny
    extractor, weights = extractor_weights
    reference_NHWC = np.random.default_rng(0).integers(0, 256, (10, SIDE, SIDE, 3), dtype=np.uint8)
    write_adm_npz(tmp_path / "reference.npz", reference_NHWC)
    config = compose_config("evaluate", [
        f"checkpoint={path}", "num_per_class=4", "batch_size=5", "seed=2", "num_is_splits=2", "device=cpu",
        f"out_dir={tmp_path / 'eval'}", f"reference_npz={tmp_path / 'reference.npz'}",
        f"inception._target_={EXTRACTOR_TARGET}", f"inception.weights_path={weights}"])
    result = evaluate_samples(config)

    samples_NHWC = load_adm_npz(result.npz_path)
    assert samples_NHWC.shape == (NUM_CLASSES * 4, SIDE, SIDE, 3) and result.num_images == 12
    labels = [c for c in range(NUM_CLASSES) for _ in range(4)]
    options = dict(cfg=1.5, top_k=32, top_p=0.96)
    class_order = np.concatenate([to_uint8_nhwc(var.generate(labels[s:s + 5], seed=2 + i, **options))
                                  for i, s in enumerate(range(0, 12, 5))])
    permutation = shuffle_permutation(12, seed=2)
    assert not np.array_equal(permutation, np.arange(12))
    np.testing.assert_array_equal(samples_NHWC, class_order[permutation])

    with torch.no_grad():
        fake_features, fake_logits = extractor(torch.from_numpy(samples_NHWC).permute(0, 3, 1, 2))
        real_features, _ = extractor(torch.from_numpy(reference_NHWC).permute(0, 3, 1, 2))
    is_mean, is_std = inception_score(fake_logits, 2)
    precision, recall = precision_recall(real_features, fake_features, 3)
    expected = {"is_mean": is_mean, "is_std": is_std, "fid": fid_from_features(real_features, fake_features),
                "precision": precision, "recall": recall}
    assert result.metrics.keys() == expected.keys()
    for name, value in expected.items():
        assert np.isfinite(result.metrics[name])
        assert result.metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    record = json.loads(result.metrics_path.read_text())
    assert record["metrics"] == result.metrics
    assert record["num_images"] == 12 and record["num_reference_images"] == 10 and "metrics_skipped" not in record
    assert (record["cfg"], record["top_k"], record["top_p"]) == (1.5, 900, 0.96)  # the model's, not clipped


def test_evaluate_reference_images_from_a_data_config(tiny, extractor_weights, image_folder, tmp_path):
    _, path = tiny
    _, weights = extractor_weights
    config = compose_config("evaluate", [
        f"checkpoint={path}", "num_per_class=2", "batch_size=6", "num_is_splits=2", "device=cpu",
        f"out_dir={tmp_path}", "data@reference_data=imagefolder", f"reference_data.root={image_folder}",
        "reference_data.num_workers=0", "reference_data.batch_size=3",
        f"inception._target_={EXTRACTOR_TARGET}", f"inception.weights_path={weights}"])
    result = evaluate_samples(config)
    assert result.num_reference_images == 4  # the val split: 2 classes x 2 images

    # the same figures computed directly: the val images centre-cropped to the model's side, the written samples
    transform = ImageTransform(SIDE, train=False)
    real_BCHW = torch.stack([transform(Image.open(p).convert("RGB")) for p in sorted(image_folder.glob("val/*/*.png"))])
    samples_BCHW = torch.from_numpy(load_adm_npz(result.npz_path)).permute(0, 3, 1, 2)
    extractor = TinyExtractor(str(weights)).eval()
    with torch.no_grad():
        real_features, _ = extractor(signed_float_to_uint8(real_BCHW))
        fake_features, fake_logits = extractor(samples_BCHW)
    is_mean, is_std = inception_score(fake_logits, 2)
    precision, recall = precision_recall(real_features, fake_features, 3)
    expected = {"is_mean": is_mean, "is_std": is_std, "fid": fid_from_features(real_features, fake_features),
                "precision": precision, "recall": recall}
    assert result.metrics.keys() == expected.keys()
    for name, value in expected.items():
        assert result.metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_evaluate_without_inception_weights_still_writes_the_npz(tiny, tmp_path):
    _, path = tiny
    config = compose_config("evaluate", [
        f"checkpoint={path}", "num_per_class=1", "device=cpu", f"out_dir={tmp_path}",
        f"inception.weights_path={tmp_path / 'absent.pth'}"])
    result = evaluate_samples(config)
    assert load_adm_npz(result.npz_path).shape == (NUM_CLASSES, SIDE, SIDE, 3)
    assert result.metrics == {}
    record = json.loads(result.metrics_path.read_text())
    assert "pt_inception-2015-12-05-6726825d.pth" in record["metrics_skipped"]
    assert str(tmp_path / "absent.pth") in record["metrics_skipped"]


def test_evaluate_rejects_too_few_images_for_the_inception_score(tiny, extractor_weights, tmp_path, caplog):
    _, path = tiny
    _, weights = extractor_weights
    config = compose_config("evaluate", [
        f"checkpoint={path}", "num_per_class=2", "device=cpu", f"out_dir={tmp_path}",
        f"inception._target_={EXTRACTOR_TARGET}", f"inception.weights_path={weights}"])  # 6 images < 10 splits
    with pytest.raises(SystemExit) as exit_info:
        run_or_exit(evaluate_samples, config)
    assert exit_info.value.code == 2
    assert "num_is_splits=10" in caplog.text and "= 6" in caplog.text
    assert not (tmp_path / "samples.npz").exists()


# -- varlib-tokenize ----------------------------------------------------------------------------------


def all_rows(dataset: TokenDataset, flipped: bool = False) -> torch.Tensor:
    """Every stored token row (N, L) of a cache split, in order."""
    return torch.stack([dataset.row(i, flipped=flipped) for i in range(len(dataset))])


def sorted_split_images(root: Path, split: str) -> list[tuple[Image.Image, int]]:
    """The decodable images of a class-folder split in ImageFolderDataModule order, with labels."""
    items = []
    for label, folder in enumerate(sorted((root / split).iterdir())):
        for file in sorted(folder.iterdir()):
            if not file.name.endswith("corrupt.png"):
                items.append((Image.open(file).convert("RGB"), label))
    return items


def test_tokenize_image_folder_writes_a_deterministic_readable_cache(tiny, image_folder, tmp_path):
    var, path = tiny
    out_dir = tmp_path / "cache"
    config = compose_config("tokenize", [
        f"tokenizer={path}", "data=imagefolder", f"data.root={image_folder}", "data.num_workers=0",
        "data.batch_size=4", "with_flip=true", "shard_size=2", "device=cpu", f"out_dir={out_dir}"])
    result = tokenize_dataset(config)
    assert result.counts == {"train": 6, "val": 4}  # the corrupt file is skipped

    cache = TokenCacheDataModule(str(out_dir), batch_size=2)
    cache.setup("fit")
    assert (cache.num_classes, cache.vocab_size, cache.patch_nums) == (2, 32, (1, 2, 4, 8, 16))
    index = json.loads((out_dir / "index.json").read_text())
    assert len(index["splits"]["train"]) == 4  # 7 files (one corrupt) in shards of 2
    assert index["skipped"] == {"train": 1, "val": 0} and result.skipped == {"train": 1, "val": 0}
    transform = ImageTransform(SIDE, train=False)
    for split, dataset in (("train", cache.train_set), ("val", cache.val_set)):
        items = sorted_split_images(image_folder, split)
        images = torch.stack([transform(image) for image, _ in items])
        np.testing.assert_array_equal(dataset.labels.numpy(), [label for _, label in items])
        torch.testing.assert_close(all_rows(dataset).long(), torch.cat(var.vae.encode_tokens(images), dim=1))
        flipped = torch.cat([load_file(str(out_dir / name))["tokens_flip"] for name in index["splits"][split]])
        torch.testing.assert_close(flipped.long(), torch.cat(var.vae.encode_tokens(images.flip(-1)), dim=1))
        torch.testing.assert_close(all_rows(dataset, flipped=True), flipped)


def test_tokenize_processes_share_the_shards_through_rank_and_world_size(tiny, image_folder, tmp_path, monkeypatch):
    _, path = tiny
    out_dir = tmp_path / "cache"
    overrides = [f"tokenizer={path}", "data=imagefolder", f"data.root={image_folder}", "data.num_workers=0",
                 "splits=[train]", "shard_size=2", "device=cpu", f"out_dir={out_dir}"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    second = tokenize_dataset(compose_config("tokenize", overrides))
    # 7 files in shards of 2 (a/0 a/1 | a/2 a/9_corrupt | b/0 b/1 | b/2): rank 1 takes shards 1 and 3
    assert second.counts == {"train": 2} and second.skipped == {"train": 1}
    assert sorted(p.name for p in out_dir.iterdir()) == ["train-00001.safetensors", "train-00003.safetensors"]
    monkeypatch.setenv("RANK", "0")
    first = tokenize_dataset(compose_config("tokenize", overrides))
    assert first.counts == {"train": 4} and first.skipped == {"train": 0}
    assert read_index(out_dir)["skipped"] == {"train": 1} and len(TokenDataset(out_dir, "train")) == 6
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="0 <= RANK < WORLD_SIZE"):
        tokenize_dataset(compose_config("tokenize", overrides))


def test_tokenize_reads_an_official_tokenizer_file(image_folder, tmp_path):
    bundle = torch.load(DATA / "official_tiny4.pt", weights_only=True)
    torch.save(bundle["vqvae_state_dict"], tmp_path / "vae.pth")
    config = compose_config("tokenize", [
        f"tokenizer={tmp_path / 'vae.pth'}", "patch_nums=[1,2,3,4]", "splits=[val]", "data=imagefolder",
        f"data.root={image_folder}", "data.num_workers=0", "device=cpu", f"out_dir={tmp_path / 'cache'}"])
    assert tokenize_dataset(config).counts == {"val": 4}

    vae = varlib.load(tmp_path / "vae.pth", patch_nums=(1, 2, 3, 4))
    transform = ImageTransform(64, train=False)  # the official tokenizer downsamples by 16: 4 x 16 px
    images = torch.stack([transform(image) for image, _ in sorted_split_images(image_folder, "val")])
    tokens = all_rows(TokenDataset(str(tmp_path / "cache"), "val"))
    torch.testing.assert_close(tokens.long(), torch.cat(vae.encode_tokens(images), dim=1))


def test_tokenize_defaults_to_the_emoji_data(tiny, tmp_path):
    var, path = tiny
    config = compose_config("tokenize", [f"tokenizer={path}", "splits=[val]", "data.val_fraction=0.002",
                                         "device=cpu", f"out_dir={tmp_path}"])
    assert config.data._target_ == "varlib.data.EmojiDataModule"
    result = tokenize_dataset(config)

    emoji = varlib.data.EmojiDataModule(image_size=SIDE, val_fraction=0.002)
    emoji.setup("fit")
    assert result.counts == {"val": len(emoji.val_set)}
    cache = TokenDataset(str(tmp_path), "val")
    images = torch.stack([emoji.val_set[i][0] for i in range(len(emoji.val_set))])
    torch.testing.assert_close(all_rows(cache).long(), torch.cat(var.vae.encode_tokens(images), dim=1))
    assert read_index(tmp_path)["num_classes"] == emoji.num_classes


def test_tokenize_config_errors_exit_2(tiny, tmp_path, caplog):
    _, path = tiny
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "index.json").write_text(json.dumps({"format": "varlib-token-cache/1", "patch_nums": [1, 2, 3],
                                                     "vocab_size": 32, "num_classes": 9, "splits": {}}))
    cases = [
        (["splits=[train,test]", f"out_dir={tmp_path / 'new'}"], "among ['train', 'val'], got ['train', 'test']"),
        (["data=token_cache", "data.root=somewhere", f"out_dir={tmp_path / 'new'}"], "with an image_size"),
        ([f"out_dir={existing}"], "(patch_nums, vocab_size, num_classes) = ((1, 2, 3), 32, 9)"),
    ]
    for overrides, message in cases:
        caplog.clear()
        with pytest.raises(SystemExit) as exit_info:
            run_or_exit(tokenize_dataset, compose_config("tokenize", [f"tokenizer={path}", "device=cpu", *overrides]))
        assert exit_info.value.code == 2
        assert message in caplog.text, caplog.text
    assert sorted(os.listdir(tmp_path)) == ["existing"]
    assert os.listdir(existing) == ["index.json"]


def test_inference_precision_autocasts_bf16_with_tf32_and_restores():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("auto", cuda) == "bf16"
    before = torch.get_float32_matmul_precision()
    with inference_precision("bf16", cpu) as resolved:
        assert resolved == "bf16" and torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.get_float32_matmul_precision() == "high"
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu") and torch.get_float32_matmul_precision() == before
    with inference_precision("auto", cpu) as resolved:
        assert resolved == "fp32" and not torch.is_autocast_enabled("cpu")


def test_precision_option_of_the_inference_tools(tiny, tmp_path, caplog):
    var, path = tiny
    overrides = [f"checkpoint={path}", "labels=[0,1]", "seed=5", "top_k=20", "device=cpu"]
    bf16 = sample_to_files(compose_config("sample", overrides + ["precision=bf16", f"out_dir={tmp_path / 'bf16'}"]))
    images = np.stack([read_png(p) for p in bf16.image_paths])
    assert images.shape == (2, SIDE, SIDE, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the option is exactly bf16 autocast
        expected = to_uint8_nhwc(var.generate([0, 1], cfg=1.5, top_k=20, top_p=0.96, seed=5).float())
    np.testing.assert_array_equal(images, expected)
    for run, name in ((sample_to_files, "sample"), (tokenize_dataset, "tokenize")):
        caplog.clear()
        source = f"checkpoint={path}" if name == "sample" else f"tokenizer={path}"
        with pytest.raises(SystemExit) as exit_info:
            run_or_exit(run, compose_config(name, [source, "device=cpu", "precision=fp16",
                                                        f"out_dir={tmp_path / 'bad'}"]))
        assert exit_info.value.code == 2
        assert "precision must be one of ('auto', 'fp32', 'bf16'), got 'fp16'" in caplog.text
    assert not (tmp_path / "bad").exists()
