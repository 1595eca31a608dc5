"""Captioned data of the user's own (issue 26): image folders captioned by ``captions.jsonl`` or ``.txt`` files, web
shards captioned by their ``txt`` or ``json`` entries, and ``varlib-tokenize data.captions=true`` on them writing a
token cache whose captions the text training reads. Tiny generated images; nothing is downloaded."""

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import varlib
from varlib.configs import compose_config
from varlib.data import ImageFolderDataModule, ImageTransform, WebDatasetDataModule
from varlib.data.token_cache import TokenCacheDataModule, read_index
from varlib.data.tokenizing import tokenize_dataset, tokenize_split
from varlib.models.vqvae import MultiScaleVQVAE

# (relative path, caption or None, where the caption is written: "jsonl", "txt" or None)
TRAIN_IMAGES = [
    ("cat/000.png", "a grey cat", "jsonl"),
    ("cat/001.png", "a cat on a mat", "txt"),
    ("cat/002.png", None, None),
    ("dog/000.png", "un chien heureux, café", "jsonl"),
    ("dog/001.png", "a dog in the snow", "txt"),
]
VAL_IMAGES = [("cat/000.png", "a sleepy cat", "txt"), ("dog/000.png", "a small dog", "jsonl")]
CAPTIONED_TRAIN = [(caption, 0 if file.startswith("cat") else 1) for file, caption, _ in TRAIN_IMAGES if caption]


def make_captioned_split(split_dir: Path, images: list[tuple[str, str | None, str | None]]) -> None:
    """20x16 PNGs captioned as listed; jsonl entries alternate between the 'caption' and 'text' keys, and the .txt
    files end in a newline (stripped when read)."""
    lines = []
    for i, (file, caption, source) in enumerate(images):
        path = split_dir / file
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 16), (40 * i, 0, 0)).save(path)
        if source == "jsonl":
            lines.append(json.dumps({"file": file, ("caption", "text")[len(lines) % 2]: caption}))
        elif source == "txt":
            path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    if lines:
        (split_dir / "captions.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")


@pytest.fixture
def captioned_folder(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    make_captioned_split(root / "train", TRAIN_IMAGES)
    make_captioned_split(root / "val", VAL_IMAGES)
    return root


def tiny_vae() -> MultiScaleVQVAE:
    torch.manual_seed(0)
    return MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4)).eval()


# -- image folders --------------------------------------------------------------------------------------------------


def test_folder_captions_come_from_jsonl_and_txt_files_with_the_class_as_label(
    captioned_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = ImageFolderDataModule(str(captioned_folder), batch_size=8, num_workers=0, image_size=16, captions=True)
    data.setup("fit")
    with caplog.at_level(logging.WARNING):
        items = [data.train_set[i] for i in range(len(data.train_set))]
    assert items[2] is None and data.skipped == 1
    assert "cat/002.png" in caplog.text and "no caption" in caplog.text and "cat/002.txt" in caplog.text
    kept = [item for item in items if item is not None]
    assert [(caption, int(label)) for _, label, caption in kept] == CAPTIONED_TRAIN
    assert all(image.shape == (3, 16, 16) for image, _, _ in kept)
    images, labels, captions = next(iter(data.val_dataloader()))
    assert images.shape == (2, 3, 16, 16) and labels.tolist() == [0, 1]
    assert list(captions) == ["a sleepy cat", "a small dog"]
    # without captions=true the same folder gives (image, label) and skips nothing
    plain = ImageFolderDataModule(str(captioned_folder), num_workers=0, image_size=16)
    plain.setup("fit")
    assert [len(plain.train_set[i]) for i in range(5)] == [2] * 5 and plain.skipped == 0


def test_folder_captions_jsonl_entry_wins_over_txt_file(captioned_folder: Path) -> None:
    (captioned_folder / "train" / "cat" / "000.txt").write_text("the txt caption")
    data = ImageFolderDataModule(str(captioned_folder), num_workers=0, image_size=16, captions=True)
    data.setup("fit")
    assert data.train_set[0][2] == "a grey cat"


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"file": "cat/000.png", "caption": "ok"}', '{"file": "cat/001.png", "caption": "cut'],
         "captions.jsonl line 2: expected a JSON object, got '{\"file\": \"cat/001.png\", \"caption\": \"cut'"),
        (['{"file": "cat/000.png", "title": "no caption key"}'],
         "captions.jsonl line 1: expected an object with a 'file' string and a 'caption' \\(or 'text'\\) string"),
        (['{"caption": "no file"}'], "captions.jsonl line 1: expected an object with a 'file' string"),
        (['["cat/000.png", "a list"]'], "captions.jsonl line 1: expected an object with a 'file' string"),
        (['{"file": "cat/000.png", "text": "a"}', "", '{"file": "cat/000.png", "text": "b"}'],
         "captions.jsonl line 3: 'cat/000.png' is captioned a second time"),
    ],
)
def test_folder_captions_bad_jsonl_line_is_an_error_naming_file_and_line(
    captioned_folder: Path, lines: list[str], message: str
) -> None:
    (captioned_folder / "train" / "captions.jsonl").write_text("\n".join(lines) + "\n")
    data = ImageFolderDataModule(str(captioned_folder), num_workers=0, image_size=16, captions=True)
    with pytest.raises(ValueError, match=message):
        data.setup("fit")


# -- web shards -----------------------------------------------------------------------------------------------------


def write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, entries in samples.items():
            for extension, data in entries.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 20), (shade, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def captioned_shard(tmp_path: Path) -> str:
    """Six samples: captioned by txt, json 'caption', json 'text', txt beside a json (txt wins); two without one."""
    samples = {
        "s0": {"png": png(0), "cls": b"2", "txt": "a red square\n".encode()},
        "s1": {"png": png(1), "cls": b"0", "json": json.dumps({"caption": "a blue circle", "width": 24}).encode()},
        "s2": {"png": png(2), "cls": b"1", "json": json.dumps({"text": "crème brûlée"}).encode()},
        "s3": {"png": png(3), "cls": b"1"},
        "s4": {"png": png(4), "cls": b"0", "json": b'{"width": 24}'},
        "s5": {"png": png(5), "cls": b"2", "txt": b"a green star", "json": b'{"caption": "not this one"}'},
    }
    path = tmp_path / "captioned-000000.tar"
    write_shard(path, samples)
    return str(path)


SHARD_CAPTIONS = [("a red square", 2), ("a blue circle", 0), ("crème brûlée", 1), ("a green star", 2)]


def test_shard_captions_from_txt_and_json_entries_skip_and_count_the_uncaptioned(
    captioned_shard: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = dict(num_classes=3, batch_size=8, num_workers=0, image_size=16, captions=True)
    data = WebDatasetDataModule(captioned_shard, captioned_shard, **settings)
    with caplog.at_level(logging.WARNING):
        images, labels, captions = next(iter(data.val_dataloader()))  # streamed, in shard order
    assert list(zip(captions, labels.tolist())) == SHARD_CAPTIONS and images.shape == (4, 3, 16, 16)
    assert data.skipped == 2
    assert "sample s3 in" in caplog.text and "no caption: expected a 'txt' entry" in caplog.text
    assert "sample s4 in" in caplog.text and "expected the json entry to be an object with a 'caption'" in caplog.text
    # indexed training reads the same captions by row
    train = data.train_dataloader().dataset
    rows = [train[i] for i in range(len(train))]
    assert [(row[2], int(row[1])) for row in rows if row is not None] == SHARD_CAPTIONS
    assert data.skipped == 4 and "sample row 3 in" in caplog.text


# -- the token cache -------------------------------------------------------------------------------------------------


def test_varlib_tokenize_keeps_a_captioned_folders_captions_and_labels_in_order(
    captioned_folder: Path, tmp_path: Path
) -> None:
    varlib.save_tokenizer(tiny_vae(), tmp_path / "tok.safetensors")
    cache = tmp_path / "cache"
    config = compose_config("tokenize", [
        f"tokenizer={tmp_path / 'tok.safetensors'}", "data=imagefolder", f"data.root={captioned_folder}",
        "data.captions=true", "data.num_workers=0", "data.batch_size=2", "shard_size=2", "device=cpu",
        f"out_dir={cache}"])
    result = tokenize_dataset(config)
    assert result.counts == {"train": 4, "val": 2} and result.skipped == {"train": 1, "val": 0}
    assert read_index(cache)["skipped"] == {"train": 1, "val": 0}
    data = TokenCacheDataModule(str(cache), batch_size=4, captions=True)  # what experiment=t2i_emoji reads
    data.setup()
    assert data.class_names == ["cat", "dog"] and len(data.train_set.paths) == 3
    rows = [data.train_set[i] for i in range(len(data.train_set))]
    assert [(caption, int(label)) for _, label, caption in rows] == CAPTIONED_TRAIN
    tokens, labels, captions = next(iter(data.val_dataloader()))
    assert tokens.shape == (2, 30) and labels.tolist() == [0, 1]
    assert list(captions) == ["a sleepy cat", "a small dog"]


def test_captioned_shards_tokenise_into_a_cache_with_their_captions(captioned_shard: str, tmp_path: Path) -> None:
    data = WebDatasetDataModule(captioned_shard, num_classes=3, batch_size=3, num_workers=0, image_size=64,
                                captions=True)
    units = data.tokenizing_units("train", ImageTransform(64, train=False), shard_size=2)
    counts = tokenize_split(tiny_vae(), units, tmp_path, "train", 3, (1, 2, 3, 4), captions=True)
    assert counts == {"written": 4, "skipped": 2, "resumed": 0}
    cached = TokenCacheDataModule(str(tmp_path), captions=True)
    cached.setup()
    assert [(caption, int(label)) for _, label, caption in cached.train_set] == SHARD_CAPTIONS
