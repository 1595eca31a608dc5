"""``data=hf`` (issue 40): Hugging Face datasets from local Parquet files and image folders, streamed or read from the
Arrow cache; bad rows counted; the stream resumed at the exact sample, also on 2 processes x 2 workers; and a stream
tokenised into the cache that the same images give from a folder. Tiny generated images; nothing is downloaded."""

import json
import logging
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

import varlib
from helpers.hf_data import CLASS_NAMES, caption, png, rows, write_image_folder, write_parquet
from helpers.hub import switch_hub_off
from helpers.shard_training import assert_killed_run_resumes_exactly
from varlib.data.tokenizing import TokenizeResult, tokenize_dataset
from varlib.configs import compose_config
from varlib.data import HFDataModule, ImageTransform, decode_rgb_image
from varlib.data.huggingface import HashSplit
from varlib.data.resumable import ResumableLoader
from varlib.data.token_cache import read_index
from varlib.models.vqvae import MultiScaleVQVAE

TESTS = Path(__file__).parent


@pytest.fixture
def parquet(tmp_path: Path) -> dict[str, str]:
    """24 train rows in 4 files, 6 validation rows in 1: the ``data_files`` of the parquet builder."""
    write_parquet(tmp_path / "pq", "train", rows(range(24)), files=4)
    write_parquet(tmp_path / "pq", "validation", rows(range(24, 30)), files=1)
    return {"train": str(tmp_path / "pq" / "train-*.parquet"), "validation": str(tmp_path / "pq" / "validation-*")}


def hf_data(tmp_path: Path, streaming: bool, **overrides) -> HFDataModule:
    settings = dict(path="parquet", streaming=streaming, batch_size=4, num_workers=0, image_size=12,
                    cache_dir=str(tmp_path / "datasets_cache"))
    return HFDataModule(**{**settings, **overrides})


def eval_image(index: int):
    return ImageTransform(12, train=False)(decode_rgb_image(png(index)))


@pytest.mark.parametrize("streaming", [True, False])
def test_parquet_splits_read_with_class_names_labels_and_captions(parquet, tmp_path, streaming):
    data = hf_data(tmp_path, streaming, data_files=parquet, captions=True, rows_per_epoch=24)
    assert data.class_names == CLASS_NAMES and data.num_classes == 2  # the ClassLabel's names
    val = [item for images, labels, captions in data.val_dataloader() for item in zip(images, labels, captions)]
    val_order = sorted(range(24, 30), key=lambda i: (i % 2, i))  # the file's order
    assert [(int(label), text) for _, label, text in val] == [(i % 2, caption(i)) for i in val_order]
    assert all(torch.equal(image, eval_image(i)) for (image, _, _), i in zip(val, val_order))
    train = [(int(label), text) for _, labels, captions in data.train_dataloader()
             for label, text in zip(labels, captions)]
    assert sorted(train, key=lambda pair: pair[1]) == sorted(((i % 2, caption(i)) for i in range(24)),
                                                            key=lambda pair: pair[1])
    assert [text for _, text in train] != [caption(i) for i in sorted(range(24), key=lambda i: (i % 2, i))]  # shuffled
    assert data.skipped == 0


@pytest.mark.parametrize("streaming", [True, False])
def test_image_folder_builder_labels_by_class_folder(tmp_path, streaming):
    write_image_folder(tmp_path / "folder", {"train": range(16), "validation": range(16, 20)})
    data = hf_data(tmp_path, streaming, path="imagefolder", data_dir=str(tmp_path / "folder"), rows_per_epoch=16)
    assert data.class_names == CLASS_NAMES
    images, labels = next(iter(data.val_dataloader()))
    assert labels.tolist() == [0, 0, 1, 1] and images.shape == (4, 3, 12, 12)
    assert torch.equal(images[2], eval_image(17))
    assert sorted(label for _, labels in data.train_dataloader() for label in labels.tolist()) == [0] * 8 + [1] * 8


def test_one_split_is_divided_by_a_hash_of_the_image_bytes_streamed_or_not(tmp_path):
    write_parquet(tmp_path / "pq", "train", rows(range(40)), files=2)
    files = {"train": str(tmp_path / "pq" / "*.parquet")}
    val = {}
    for streaming in (True, False):
        data = hf_data(tmp_path, streaming, data_files=files, val_split=None, val_fraction=0.25, captions=True)
        val[streaming] = sorted(text for _, _, captions in data.val_dataloader() for text in captions)
    train = sorted(text for _, _, captions in data.train_dataloader() for text in captions)
    assert val[True] == val[False] and 4 <= len(val[True]) <= 16  # a quarter of 40, give or take the hash
    assert not set(train) & set(val[True]) and len(train) + len(val[True]) == 40
    with pytest.raises(ValueError, match="set data.rows_per_epoch"):
        hf_data(tmp_path, True, data_files=files, val_split=None).train_dataloader()


@pytest.mark.parametrize("streaming", [True, False])
def test_bad_rows_are_skipped_and_counted(tmp_path, streaming, caplog):
    table = rows(range(8))
    table[1]["image"] = {"bytes": b"not an image", "path": None}
    table[2]["label"] = None
    table[5]["caption"] = None
    write_parquet(tmp_path / "pq", "train", table, files=1)
    data = hf_data(tmp_path, streaming, data_files={"train": str(tmp_path / "pq" / "*")}, val_split="train",
                   captions=True)
    with caplog.at_level(logging.WARNING):
        read = [text for _, _, captions in data.val_dataloader() for text in captions]
    assert read == [row["caption"] for i, row in enumerate(table) if i not in (1, 2, 5)]
    assert data.skipped == 3
    skipped = [record.getMessage() for record in caplog.records if record.getMessage().startswith("Skipping")]
    assert len(skipped) == 3
    assert "cannot identify image" in skipped[0] and "label None" in skipped[1] and "no caption" in skipped[2]


def test_a_wrong_column_or_split_stops_naming_what_the_dataset_has(parquet, tmp_path):
    with pytest.raises(ValueError, match=r"has no column 'text': it has \['caption', 'image', 'label'\]"):
        hf_data(tmp_path, True, data_files=parquet, captions=True, caption_column="text")
    with pytest.raises(ValueError, match=r"has no column 'img', 'cls': it has \['caption', 'image', 'label'\]"):
        hf_data(tmp_path, False, data_files=parquet, image_column="img", label_column="cls")
    with pytest.raises(ValueError, match=r"no split 'val' \(val_split\): it has \['train', 'validation'\]"):
        hf_data(tmp_path, True, data_files=parquet, val_split="val")


def test_an_unreachable_hub_says_to_download_first_or_use_a_local_builder(tmp_path, monkeypatch):
    switch_hub_off(monkeypatch)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # datasets' own copy, also read at its import
    with pytest.raises(ValueError) as error:
        hf_data(tmp_path, True, path="ILSVRC/imagenet-1k")
    message = str(error.value)
    assert "\n" not in message and message.startswith("cannot reach the Hugging Face Hub for 'ILSVRC/imagenet-1k'")
    assert "hf download ILSVRC/imagenet-1k --repo-type dataset" in message and "data.path=parquet" in message


def batch_records(loader, batches: int | None = None) -> list[tuple[list[int], float]]:
    """(labels, pixel sum) of the loader's next ``batches`` batches (all with None)."""
    records = []
    for images, labels in loader:
        records.append((labels.tolist(), images.double().sum().item()))
        if len(records) == batches:
            break
    return records


def test_a_stream_read_by_two_workers_resumes_mid_epoch_at_the_exact_batch(parquet, tmp_path):
    def loader():
        return hf_data(tmp_path, True, data_files=parquet, rows_per_epoch=24, batch_size=2, num_workers=2, hflip=True,
                       shuffle_buffer=4, shuffle_seed=3).train_dataloader()

    whole = loader()
    epochs = [batch_records(whole), batch_records(whole)]
    assert [len(epoch) for epoch in epochs] == [12, 12]
    assert all(sorted(label for labels, _ in epoch for label in labels) == [0] * 12 + [1] * 12 for epoch in epochs)
    assert epochs[0] != epochs[1] and batch_records(loader()) == epochs[0]  # fixed by (seed, epoch)
    killed = loader()
    batch_records(killed)
    before = batch_records(killed, 5)  # epoch 1: 5 batches, so that worker 1's batch comes next
    state = killed.state_dict()
    assert state["epoch"] == 1 and state["batches"] == 5 and state["ranks"][0]["next_worker"] == 1
    resumed = loader()
    resumed.load_state_dict(torch.load(_saved(tmp_path, state), weights_only=True))
    assert before + batch_records(resumed) == epochs[1]  # the same rows, crops and flips in the same order
    with pytest.raises(ValueError, match=r"checkpoint has \(streams per rank, ranks\) = \(2, 1\), this run \(1, 1\)"):
        hf_data(tmp_path, True, data_files=parquet, rows_per_epoch=24).train_dataloader().load_state_dict(state)


def test_arrow_rows_resume_through_the_resumable_loader(parquet, tmp_path):
    def loader():
        return hf_data(tmp_path, False, data_files=parquet, batch_size=2, hflip=True, shuffle_seed=3).train_dataloader()

    whole = loader()
    assert isinstance(whole, ResumableLoader) and len(whole) == 12
    epoch = batch_records(whole)
    killed = loader()
    before = batch_records(killed, 5)
    resumed = loader()
    resumed.load_state_dict(killed.state_dict())
    assert before + batch_records(resumed) == epoch


def _saved(tmp_path: Path, state: dict) -> Path:
    """``state`` written as a checkpoint holds it."""
    torch.save(state, tmp_path / "state.pt")
    return tmp_path / "state.pt"


@pytest.mark.slow  # three 2-process training runs
def test_a_two_process_two_worker_stream_killed_mid_epoch_resumes_with_the_rest_of_it(tmp_path):
    # 4 files (one per rank and worker) of 12 training rows after 0, 2, 4, 6 rows that the hash split validates:
    # each worker has read a different number of rows at the same batch, so each rank resumes from its own count
    is_val = HashSplit("image", 0.5, 0, validation=True)
    indices = {True: [], False: []}
    for i in range(200):
        indices[is_val({"image": {"bytes": png(i)}})].append(i)
    features = datasets.Features({"image": datasets.Image(), "index": datasets.Value("int64")})
    train_rows = []
    for shard in range(4):
        validated = indices[True][shard * (shard - 1):shard * (shard + 1)]  # 2 * shard rows
        train_rows += indices[False][12 * shard:12 * shard + 12]
        table = [{"image": {"bytes": png(i), "path": None}, "index": i} for i in validated + train_rows[-12:]]
        datasets.Dataset.from_list(table, features=features).to_parquet(str(tmp_path / f"train-{shard}.parquet"))
    epoch_one = assert_killed_run_resumes_exactly(TESTS / "helpers" / "hf_training.py",
                                                  str(tmp_path / "train-*.parquet"), tmp_path)
    assert sorted(epoch_one) == sorted(train_rows)  # an epoch: every training row once over both ranks


def tiny_vae() -> MultiScaleVQVAE:
    torch.manual_seed(0)
    return MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, patch_nums=(1, 2, 3)).eval()


def test_tokenising_a_stream_on_two_processes_writes_the_cache_of_the_same_images_in_a_folder(tmp_path, monkeypatch):
    # the same 30 images as Parquet files and as a folder, the 4th training image broken in both
    table = rows(range(24))
    table[3]["image"]["bytes"] = b"broken"
    write_parquet(tmp_path / "pq", "train", table, files=4)
    write_parquet(tmp_path / "pq", "validation", rows(range(24, 30)), files=1)
    parquet = {"train": str(tmp_path / "pq" / "train-*"), "validation": str(tmp_path / "pq" / "validation-*")}
    write_image_folder(tmp_path / "folder", {"train": range(24), "val": range(24, 30)})
    (tmp_path / "folder" / "train" / "cat" / "006.png").write_bytes(b"broken")  # row 3: cats 0, 2, 4, 6, ...
    varlib.save_tokenizer(tiny_vae(), tmp_path / "tok.safetensors")

    def tokenise(out: str, *data: str) -> TokenizeResult:
        return tokenize_dataset(compose_config("tokenize", [
            f"tokenizer={tmp_path / 'tok.safetensors'}", *data, "data.captions=true", "data.num_workers=0",
            "data.batch_size=4", "shard_size=6", "device=cpu", f"out_dir={tmp_path / out}"]))

    tokenise("folder_cache", "data=imagefolder", f"data.root={tmp_path / 'folder'}")
    stream = ("data=hf", "data.path=parquet", f"data.cache_dir={tmp_path / 'datasets_cache'}",
              f"data.data_files={{train: '{parquet['train']}', validation: '{parquet['validation']}'}}")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):  # as torchrun starts them: each writes every other shard, the last one the index
        monkeypatch.setenv("RANK", rank)
        result = tokenise("stream_cache", *stream)
        assert result.counts == {"train": 12 - (rank == "0"), "val": 6 * (rank == "0")}
        assert sorted(read_index(tmp_path / "stream_cache")["splits"]) == (["train", "val"] if rank == "1" else ["val"])
    folder, streamed = tmp_path / "folder_cache", tmp_path / "stream_cache"
    assert read_index(streamed) == read_index(folder)  # shards, classes and skipped counts
    assert read_index(streamed)["skipped"] == {"train": 1, "val": 0}
    assert json.loads((streamed / "class_names.json").read_text()) == CLASS_NAMES
    for name in read_index(folder)["splits"]["train"] + read_index(folder)["splits"]["val"]:
        expected, got = load_file(folder / name), load_file(streamed / name)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    (streamed / "train-00002.safetensors").unlink()  # a killed run's missing shard: only it is written again
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert tokenise("stream_cache", *stream).counts == {"train": 6, "val": 0}
    again = load_file(streamed / "train-00002.safetensors")
    assert all(torch.equal(again[k], v) for k, v in load_file(folder / "train-00002.safetensors").items())
