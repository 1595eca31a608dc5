"""Tests for varlib.data: transforms, robust image loading, and the three DataModules."""

from __future__ import annotations

import inspect
import io
import logging
import tarfile
from collections import Counter
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from varlib.configs import CONFIG_MODULE, datamodule_config
from varlib.data import (
    EmojiDataModule,
    ImageDecodeError,
    ImageFolderDataModule,
    ImageTransform,
    SkipCounter,
    WebDatasetDataModule,
    collate_skipping_none,
    decode_rgb_image,
    load_rgb_image,
    resize_target,
    resolve_shard_urls,
)
from varlib.data.emoji import (
    CachedImageDataset,
    decode_emoji_images,
    emoji_category,
    labelled_emoji_files,
    twemoji_png_dir,
)
from varlib.data.transforms import resize_shorter_side

DATA_CONFIGS = files(CONFIG_MODULE) / "data"  # the packaged conf/data


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def coordinate_image(size: int) -> Image.Image:
    """RGB image whose red channel is 3 * x and green channel is 3 * y (so offsets are readable)."""
    ys, xs = np.mgrid[0:size, 0:size]
    pixels = np.stack([3 * xs, 3 * ys, np.full_like(xs, 7)], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


def to_uint8(image_CHW: torch.Tensor) -> torch.Tensor:
    return torch.round((image_CHW + 1) * 127.5).to(torch.uint8)


# --------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("resolution, expected", [(64, 72), (256, 288), (512, 576), (16, 18), (100, 112)])
def test_resize_target_is_rounded_1125_times_resolution(resolution: int, expected: int) -> None:
    assert resize_target(resolution) == expected


def test_resize_shorter_side_keeps_aspect_like_torchvision() -> None:
    assert resize_shorter_side(Image.new("RGB", (300, 200)), 72).size == (108, 72)
    assert resize_shorter_side(Image.new("RGB", (200, 301)), 72).size == (72, 108)


@pytest.mark.parametrize("train", [True, False])
def test_transform_shape_dtype_and_range(train: bool) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8))
    out = ImageTransform(64, train=train, hflip=True)(image)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert ImageTransform(32, train=train)(Image.new("RGB", (50, 40), (255, 255, 255))).eq(1.0).all()
    assert ImageTransform(32, train=train)(Image.new("RGB", (50, 40), (0, 0, 0))).eq(-1.0).all()


def test_centre_crop_is_deterministic_and_centred() -> None:
    # 72x72 needs no resize for resolution 64, so the centre crop starts at offset (72 - 64) / 2 = 4.
    transform = ImageTransform(64, train=False, hflip=True)
    first, second = transform(coordinate_image(72)), transform(coordinate_image(72))
    assert torch.equal(first, second)
    pixels = to_uint8(first)
    assert pixels[0, 0, 0].item() == 3 * 4 and pixels[1, 0, 0].item() == 3 * 4
    assert pixels[0, 0, 63].item() == 3 * 67


def test_random_crop_is_a_window_at_varying_offsets() -> None:
    torch.manual_seed(0)
    transform = ImageTransform(64, train=True)
    offsets = set()
    for _ in range(20):
        pixels = to_uint8(transform(coordinate_image(72))).int()
        left, top = pixels[0, 0, 0].item() // 3, pixels[1, 0, 0].item() // 3
        assert 0 <= left <= 8 and 0 <= top <= 8
        expected = to_uint8(ImageTransform(64, train=False)(coordinate_image(72))).int()
        shift = torch.tensor([3 * (left - 4), 3 * (top - 4), 0]).view(3, 1, 1)
        assert torch.equal(pixels, expected + shift)
        offsets.add((left, top))
    assert len(offsets) > 5


def test_hflip_only_when_enabled() -> None:
    torch.manual_seed(0)

    def flipped(transform: ImageTransform) -> list[bool]:
        reds = [to_uint8(transform(coordinate_image(72)))[0, 0] for _ in range(30)]
        return [bool(red[0] > red[-1]) for red in reds]

    with_flip = flipped(ImageTransform(64, train=True, hflip=True))
    assert 5 < sum(with_flip) < 25
    assert not any(flipped(ImageTransform(64, train=True, hflip=False)))
    assert not any(flipped(ImageTransform(64, train=False, hflip=True)))


def test_transform_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="RGB"):
        ImageTransform(16, train=False)(Image.new("L", (20, 20)))
    for resolution in (0, -4, 16.0):
        with pytest.raises(ValueError, match="resolution"):
            ImageTransform(resolution, train=False)


# --------------------------------------------------------------------------- image loading


def pixel(image: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    assert image.mode == "RGB"
    return image.getpixel(xy)


def test_greyscale_modes_convert_to_rgb() -> None:
    assert pixel(decode_rgb_image(encode(Image.new("L", (4, 4), 100), "PNG"))) == (100, 100, 100)
    sixteen_bit = Image.fromarray(np.array([[65535, 32896]], dtype=np.uint16))
    assert sixteen_bit.mode == "I;16"
    decoded = decode_rgb_image(encode(sixteen_bit, "PNG"))
    assert pixel(decoded, (0, 0)) == (255, 255, 255) and pixel(decoded, (1, 0)) == (128, 128, 128)
    assert pixel(load_rgb_image(encode(Image.new("I", (2, 2), 40), "TIFF"))) == (40, 40, 40)
    unit_float = Image.fromarray(np.full((2, 2), 0.25, dtype=np.float32))
    assert pixel(load_rgb_image(encode(unit_float, "TIFF"))) == (64, 64, 64)


def test_alpha_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    decoded = decode_rgb_image(encode(rgba, "PNG"))
    assert pixel(decoded, (0, 0)) == (255, 255, 255)
    assert all(abs(channel - 127) <= 1 for channel in pixel(decoded, (1, 0)))
    grey_alpha = Image.new("LA", (1, 1), (50, 255))
    assert pixel(load_rgb_image(encode(grey_alpha, "PNG"))) == (50, 50, 50)
    assert pixel(load_rgb_image(encode(Image.new("LA", (1, 1), (50, 0)), "PNG"))) == (255, 255, 255)


def test_palette_with_transparency_and_cmyk() -> None:
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    decoded = decode_rgb_image(encode(palette, "PNG"))
    assert pixel(decoded, (0, 0)) == (255, 255, 255) and pixel(decoded, (1, 0)) == (255, 0, 0)
    assert pixel(decode_rgb_image(encode(Image.new("CMYK", (2, 2), (0, 0, 0, 0)), "JPEG"))) == (255, 255, 255)
    cyan = decode_rgb_image(encode(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "TIFF"))
    assert pixel(cyan) == (0, 255, 255)


def test_loader_accepts_path_bytes_and_file(tmp_path: Path) -> None:
    data = encode(Image.new("RGB", (3, 2), (1, 2, 3)), "PNG")
    (tmp_path / "a.png").write_bytes(data)
    for source in (tmp_path / "a.png", str(tmp_path / "a.png"), data, io.BytesIO(data)):
        image = load_rgb_image(source)
        assert image.size == (3, 2) and pixel(image) == (1, 2, 3)


def test_bad_image_data_returns_none(tmp_path: Path) -> None:
    jpeg = encode(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")
    png = encode(coordinate_image(64), "PNG")
    truncated = [jpeg[: len(jpeg) // 2], png[: len(png) // 2]]
    bad_sources = [b"", b"not an image at all", *truncated, tmp_path / "missing.png"]
    for source in bad_sources:
        assert load_rgb_image(source) is None
        with pytest.raises(ImageDecodeError):
            decode_rgb_image(source)


# --------------------------------------------------------------------------- skipping


def test_collate_drops_none_and_all_bad_batch_is_none() -> None:
    good = (torch.zeros(3, 4, 4), torch.tensor(2))
    images, labels = collate_skipping_none([None, good, None, good])
    assert images.shape == (2, 3, 4, 4) and labels.tolist() == [2, 2]
    assert collate_skipping_none([None, None]) is None


def test_skip_counter_counts_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING):
        counter.record("broken.jpg", "truncated")
        counter.record("other.jpg", "empty")
    assert counter.value == 2
    assert "broken.jpg" in caplog.text and "truncated" in caplog.text


# --------------------------------------------------------------------------- image folders


def make_folder(root: Path, layout: dict[str, int], corrupt: str | None = None) -> None:
    """Write `count` 20x16 PNGs into each relative folder of `layout`; optionally one truncated JPEG."""
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (20, 16), (10 * i, 0, 0)).save(root / folder / f"{i:03d}.png")
    if corrupt is not None:
        jpeg = encode(Image.new("RGB", (32, 32), (1, 2, 3)), "JPEG")
        (root / corrupt).write_bytes(jpeg[: len(jpeg) // 3])


def test_image_folder_skips_and_counts_corrupt_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    layout = {"train/cat": 3, "train/dog": 2, "val/cat": 1, "val/dog": 1}
    make_folder(tmp_path, layout, corrupt="train/cat/bad.jpg")
    datamodule = ImageFolderDataModule(str(tmp_path), batch_size=4, num_workers=0, image_size=16)
    assert datamodule.class_names == ["cat", "dog"] and datamodule.num_classes == 2
    datamodule.setup("fit")
    assert len(datamodule.train_set) == 6
    loader = DataLoader(datamodule.train_set, batch_size=6, collate_fn=collate_skipping_none)
    with caplog.at_level(logging.WARNING):
        images, labels = next(iter(loader))
    assert images.shape == (5, 3, 16, 16)
    assert Counter(labels.tolist()) == {0: 3, 1: 2}
    assert datamodule.skipped == 1
    assert "bad.jpg" in caplog.text


def test_image_folder_counts_skips_from_worker_processes(tmp_path: Path) -> None:
    make_folder(tmp_path, {"train/a": 1, "train/b": 1, "val/a": 3, "val/b": 3}, corrupt="val/b/bad.jpg")
    datamodule = ImageFolderDataModule(str(tmp_path), batch_size=2, num_workers=2, image_size=8)
    labels = torch.cat([batch[1] for batch in datamodule.val_dataloader() if batch is not None])
    assert Counter(labels.tolist()) == {0: 3, 1: 3}
    assert datamodule.skipped == 1


def test_train_loader_drops_last_partial_batch(tmp_path: Path) -> None:
    make_folder(tmp_path, {"train/a": 5, "val/a": 1})
    datamodule = ImageFolderDataModule(str(tmp_path), batch_size=2, num_workers=0, image_size=8)
    sizes = [len(labels) for _, labels in datamodule.train_dataloader()]
    assert sizes == [2, 2]


def test_flat_image_folder_is_one_class(tmp_path: Path) -> None:
    make_folder(tmp_path, {"train": 3, "val": 2})
    datamodule = ImageFolderDataModule(str(tmp_path), batch_size=8, num_workers=0, image_size=8)
    assert datamodule.num_classes == 1
    images, labels = next(iter(datamodule.val_dataloader()))
    assert images.shape == (2, 3, 8, 8) and labels.tolist() == [0, 0]


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="root"):
        ImageFolderDataModule(str(tmp_path / "nowhere"))
    make_folder(tmp_path, {"train/a": 1})
    with pytest.raises(FileNotFoundError, match="val"):
        ImageFolderDataModule(str(tmp_path), num_workers=0).setup("fit")
    make_folder(tmp_path, {"val/zebra": 1})
    with pytest.raises(ValueError, match="zebra"):
        ImageFolderDataModule(str(tmp_path), num_workers=0).setup("validate")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderDataModule(str(tmp_path / "empty"), num_workers=0).setup("fit")


@pytest.mark.parametrize(
    "overrides, name",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"image_size": 0}, "image_size"),
    ],
)
def test_config_values_are_validated(tmp_path: Path, overrides: dict, name: str) -> None:
    make_folder(tmp_path, {"train": 1})
    with pytest.raises(ValueError, match=name):
        ImageFolderDataModule(str(tmp_path), **overrides)
    with pytest.raises(ValueError, match=name):
        EmojiDataModule(**overrides)


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.1, 1.5])
def test_val_fraction_must_be_in_open_unit_interval(val_fraction: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        EmojiDataModule(val_fraction=val_fraction)


# --------------------------------------------------------------------------- emoji


def test_emoji_classes_and_category_lookup() -> None:
    datamodule = EmojiDataModule()
    assert datamodule.num_classes == 9
    assert datamodule.class_names == sorted(datamodule.class_names)
    assert "Component" not in datamodule.class_names and "Flags" in datamodule.class_names
    directory = twemoji_png_dir()
    expected = {
        "1f600": "Smileys & Emotion",  # grinning face
        "1f44b-1f3fb": "People & Body",  # waving hand, light skin tone
        "1f1fa-1f1f8": "Flags",  # United States
        "23-20e3": "Symbols",  # keycap '#', table code 0023-FE0F-20E3
        "1f3fb": "Component",  # skin tone swatch
    }
    for stem, category in expected.items():
        assert (directory / f"{stem}.png").exists()
        assert emoji_category(stem) == category
    assert emoji_category("1f1e6") is None  # lone regional indicator letter


def test_emoji_split_is_deterministic_disjoint_and_sized() -> None:
    labelled, dropped = labelled_emoji_files(twemoji_png_dir())
    assert len(labelled) > 3000 and dropped["excluded_category"] > 0
    names = [path.name for path, _ in labelled]
    train, val = EmojiDataModule(val_fraction=0.05).split_indices(names)
    train_again, val_again = EmojiDataModule(val_fraction=0.05).split_indices(names)
    assert (train, val) == (train_again, val_again)
    assert not set(train) & set(val) and len(train) + len(val) == len(names)
    assert 0.03 < len(val) / len(names) < 0.07
    _, other_val = EmojiDataModule(val_fraction=0.05, split_seed=1).split_indices(names)
    assert set(other_val) != set(val)


def test_emoji_items_are_white_backed_images() -> None:
    labelled, _ = labelled_emoji_files(twemoji_png_dir())
    class_names = EmojiDataModule().class_names
    images_NHWC, labels_N, names = decode_emoji_images(labelled[:6], class_names, SkipCounter())
    assert images_NHWC.shape == (6, 72, 72, 3) and images_NHWC.dtype == torch.uint8
    assert names == [path.name for path, _ in labelled[:6]]
    assert [class_names[i] for i in labels_N] == [category for _, category in labelled[:6]]
    assert images_NHWC[:, 0, 0].eq(255).all()  # transparent corners became white
    dataset = CachedImageDataset(images_NHWC, torch.arange(6), [1, 4], ImageTransform(64, train=False))
    image, label = dataset[1]
    assert image.shape == (3, 64, 64) and label.item() == 4 and label.dtype == torch.int64
    expected_CHW = images_NHWC[4, 4:68, 4:68].permute(2, 0, 1).float() / 127.5 - 1  # centre crop of row 4
    assert torch.allclose(image, expected_CHW, atol=1e-6)


def test_emoji_datamodule_setup_and_batches() -> None:
    datamodule = EmojiDataModule(batch_size=8, image_size=32)
    datamodule.setup("fit")
    labelled, _ = labelled_emoji_files(twemoji_png_dir())
    assert len(datamodule.train_set) + len(datamodule.val_set) == len(labelled) - datamodule.skipped
    assert datamodule.skipped == 0
    images, labels = next(iter(datamodule.val_dataloader()))
    assert images.shape == (8, 3, 32, 32) and labels.dtype == torch.int64
    assert 0 <= labels.min() and labels.max() < datamodule.num_classes


# --------------------------------------------------------------------------- webdataset


def write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, entries in samples.items():
            for extension, data in entries.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def png_sample(label: int) -> dict[str, bytes]:
    return {"png": encode(Image.new("RGB", (24, 20), (label, 0, 0)), "PNG"), "cls": str(label).encode()}


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    """Two shards with labels 0-3 and 4-7; label 5's image is corrupt."""
    write_shard(tmp_path / "shard-000000.tar", {f"s{i:02d}": png_sample(i) for i in range(4)})
    second = {f"s{i:02d}": png_sample(i) for i in range(4, 8)}
    second["s05"]["png"] = second["s05"]["png"][:40]
    write_shard(tmp_path / "shard-000001.tar", second)
    return tmp_path


def val_labels(datamodule: WebDatasetDataModule) -> list[int]:
    return sorted(label for _, labels in datamodule.val_dataloader() for label in labels.tolist())


def test_webdataset_skips_corrupt_sample(shard_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    pattern = str(shard_dir / "shard-{000000..000001}.tar")
    settings = dict(num_classes=8, batch_size=3, num_workers=0, image_size=16)
    datamodule = WebDatasetDataModule(pattern, pattern, **settings)
    with caplog.at_level(logging.WARNING):
        assert val_labels(datamodule) == [0, 1, 2, 3, 4, 6, 7]
    assert datamodule.skipped == 1
    assert "s05" in caplog.text and "shard-000001.tar" in caplog.text
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (3, 3, 16, 16) and labels.dtype == torch.int64


def test_webdataset_splits_shards_across_workers(shard_dir: Path) -> None:
    shards = str(shard_dir / "*.tar")
    settings = dict(num_classes=8, batch_size=2, num_workers=2, image_size=8)
    datamodule = WebDatasetDataModule(shards, shards, **settings)
    assert val_labels(datamodule) == [0, 1, 2, 3, 4, 6, 7]
    assert datamodule.skipped == 1


def test_webdataset_splits_shards_across_ranks(shard_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = str(shard_dir / "*.tar")
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        datamodule = WebDatasetDataModule(shards, shards, num_classes=8, batch_size=4, num_workers=0, image_size=8)
        per_rank.append(val_labels(datamodule))
    assert per_rank == [[0, 1, 2, 3], [4, 6, 7]]


def test_webdataset_bad_labels_and_truncated_shard(tmp_path: Path) -> None:
    samples = {"a": png_sample(1), "b": png_sample(2), "c": png_sample(3), "d": png_sample(0)}
    samples["b"]["cls"] = b"twelve"
    samples["c"]["cls"] = b"9"
    del samples["d"]["cls"]
    write_shard(tmp_path / "labels.tar", samples)
    write_shard(tmp_path / "long.tar", {f"k{i}": png_sample(i) for i in range(6)})
    data = (tmp_path / "long.tar").read_bytes()
    cut = data.index(b"k3.png") + 512 + 40  # inside the data of member k3.png
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    urls = [str(tmp_path / "labels.tar"), f"pipe:cat {tmp_path / 'cut.tar'}"]
    datamodule = WebDatasetDataModule(urls, urls, num_classes=8, batch_size=8, num_workers=0, image_size=8)
    labels = [label for _, labels in datamodule.val_dataloader() for label in labels.tolist()]
    assert labels == [1, 0, 1, 2]  # 'a', then the samples before the cut
    # 3 bad labels, then the truncated shard reports its cut member and its broken tail.
    assert datamodule.skipped == 5


def test_resolve_shard_urls(shard_dir: Path) -> None:
    first, second = str(shard_dir / "shard-000000.tar"), str(shard_dir / "shard-000001.tar")
    assert resolve_shard_urls(str(shard_dir / "shard-*.tar")) == [first, second]
    assert resolve_shard_urls(str(shard_dir / "shard-00000{0,1}.tar")) == [first, second]
    assert resolve_shard_urls(f"{second}::{first}") == [second, first]
    assert resolve_shard_urls(["pipe:cat x.tar", first]) == ["pipe:cat x.tar", first]
    with pytest.raises(FileNotFoundError, match="missing"):
        resolve_shard_urls(str(shard_dir / "missing.tar"))
    with pytest.raises(FileNotFoundError, match="no shard files"):
        resolve_shard_urls(str(shard_dir / "*.zip"))
    with pytest.raises(ValueError, match="shard spec"):
        resolve_shard_urls([])


def test_webdataset_config_errors(shard_dir: Path) -> None:
    shard = str(shard_dir / "shard-000000.tar")
    with pytest.raises(ValueError, match="samples_per_epoch"):
        WebDatasetDataModule(shard, resampled=True)
    with pytest.raises(ValueError, match="val_urls"):
        WebDatasetDataModule(shard).val_dataloader()
    with pytest.raises(ValueError, match="resampled=True, samples_per_epoch=10 with indexed=true"):
        WebDatasetDataModule(shard, resampled=True, samples_per_epoch=10)
    with pytest.raises(ValueError, match="indexed reading needs local shard files, got 'pipe:cat x.tar'"):
        WebDatasetDataModule("pipe:cat x.tar").train_dataloader()  # tokenising or validating may stream it


def test_webdataset_resampled_epoch_length(shard_dir: Path) -> None:
    shards = str(shard_dir / "*.tar")
    datamodule = WebDatasetDataModule(
        shards, num_classes=8, batch_size=2, num_workers=0, image_size=8, resampled=True, samples_per_epoch=10,
        indexed=False,
    )
    assert sum(len(labels) for _, labels in datamodule.train_dataloader()) == 10


# --------------------------------------------------------------------------- hydra configs


@pytest.mark.parametrize(
    "name, cls",
    [("emoji", EmojiDataModule), ("imagefolder", ImageFolderDataModule), ("webdataset", WebDatasetDataModule)],
)
def test_configs_list_every_constructor_argument(name: str, cls: type) -> None:
    loaded = OmegaConf.load(str(DATA_CONFIGS / f"{name}.yaml"))
    assert loaded.global_batch_size is None  # varlib-train's key, turned into batch_size per device
    config = datamodule_config(loaded)
    target = config.pop("_target_")
    assert target == f"varlib.data.{cls.__name__}"
    parameters = inspect.signature(cls.__init__).parameters
    assert set(config.keys()) == set(parameters) - {"self"}
    for key in config:
        default = parameters[key].default
        if default is inspect.Parameter.empty:
            assert OmegaConf.is_missing(config, key), key
            continue
        value = OmegaConf.to_object(config[key]) if OmegaConf.is_config(config[key]) else config[key]
        assert value == (list(default) if isinstance(default, tuple) else default), key
