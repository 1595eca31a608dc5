"""Training a text-conditional VAR through the normal pipeline (issue 26): captioned data (the emoji with their names,
token caches that keep each row's caption, and a frozen encoder's precomputed features), VARModule on captions or
features, ``varlib-train experiment=t2i_emoji`` end to end (held-out loss, export, a killed run resumed) and
``varlib-sample prompts=[...]``. Tiny random models; nothing is downloaded."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from helpers.commands import run_in_process
from helpers.token_caches import tokenize_to_cache

import varlib
from varlib.configs import compose_config
from varlib.data.emoji import EmojiDataModule, emoji_caption
from varlib.data.token_cache import TokenCacheDataModule, TokenDataset
from varlib.data.tokenizing import tokenize_split, write_text_encoder
from varlib.data.transforms import ImageTransform
from varlib.models.conditioning import TextConditioning
from varlib.models.sampling import SamplingConfig
from varlib.models.text import HFTextEncoder, SmallTextEncoder, TextFeatures, build_text_encoder
from varlib.models.vqvae import MultiScaleVQVAE
from varlib.training.var_module import VARModule

CAPTIONS = ["red heart", "cat face with wry smile", "", "café ü", "a", "blue circle", "star", "smiling face"]
TEXT = dict(type="text", encoder=dict(_target_="varlib.models.text.SmallTextEncoder", width=32, depth=1, num_heads=2,
                                      max_length=32))
TINY_TEXT_VAR = dict(depth=2, num_classes=0, width=64, num_heads=2, conditioning=TEXT)


def tiny_vae() -> MultiScaleVQVAE:
    torch.manual_seed(0)
    return MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4)).eval()


@pytest.fixture(scope="module")
def captioned_cache(tmp_path_factory) -> Path:
    """An 8-image train / 4-image val cache with captions (UTF-8 and an empty one among them)."""
    root = tmp_path_factory.mktemp("captioned")
    vae = tiny_vae()
    torch.manual_seed(1)
    images, labels = torch.rand(8, 3, 64, 64) * 2 - 1, torch.arange(8) % 3
    batches = [(images[:4], labels[:4], CAPTIONS[:4]), (images[4:], labels[4:], CAPTIONS[4:])]
    tokenize_to_cache(vae, batches, root, "train", num_classes=3, captions=True)
    tokenize_to_cache(vae, batches[:1], root, "val", num_classes=3, captions=True)
    return root


# -- data -------------------------------------------------------------------------------------------------------


def test_token_cache_keeps_each_rows_caption_and_label(captioned_cache):
    data = TokenCacheDataModule(str(captioned_cache), batch_size=4, captions=True)
    data.setup()
    rows = [data.train_set[i] for i in range(8)]
    assert [caption for _, _, caption in rows] == CAPTIONS
    assert [int(label) for _, label, _ in rows] == [i % 3 for i in range(8)]
    tokens, labels, captions = next(iter(data.val_dataloader()))
    assert tokens.shape == (4, 30) and list(captions) == CAPTIONS[:4] and labels.tolist() == [0, 1, 2, 0]
    # without the flag the batches are the class model's (tokens, labels)
    plain = TokenCacheDataModule(str(captioned_cache), batch_size=4)
    plain.setup()
    assert len(next(iter(plain.train_dataloader()))) == 2


@pytest.mark.parametrize("class_balance", [0.0, 1.0])
def test_resumed_captioned_loader_continues_with_the_same_rows(captioned_cache, class_balance):
    def loader():
        data = TokenCacheDataModule(str(captioned_cache), batch_size=2, captions=True, class_balance=class_balance,
                                    block_size=2, shuffle_seed=3)
        data.setup()
        return data.train_dataloader()

    whole = loader()
    batches = list(whole)
    first = loader()
    iterator = iter(first)
    next(iterator)
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    for want, got in zip(batches[1:], resumed, strict=True):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1]) and want[2] == got[2]


def test_caption_cache_errors_name_what_was_expected(captioned_cache, tmp_path):
    vae = tiny_vae()
    images, labels = torch.rand(2, 3, 64, 64) * 2 - 1, torch.zeros(2, dtype=torch.long)
    tokenize_to_cache(vae, [(images, labels)], tmp_path / "plain", "train", num_classes=1)
    with pytest.raises(ValueError, match="has no captions: expected one written from a captioned dataset"):
        TokenCacheDataModule(str(tmp_path / "plain"), captions=True).setup()
    with pytest.raises(ValueError, match=r"expected batches of \(images, labels, captions\), got 2 entries"):
        tokenize_to_cache(vae, [(images, labels)], tmp_path / "other", "train", num_classes=1, captions=True)
    with pytest.raises(ValueError, match="written by another tokenisation run"):  # a resumed run keeps its setting
        tokenize_to_cache(vae, [(images, labels, ["a", "b"])], tmp_path / "plain", "train", num_classes=1,
                          captions=True)


def test_captioned_emoji_batches_and_their_cache_keep_name_and_category(tmp_path):
    data = EmojiDataModule(batch_size=4, image_size=64, captions=True, class_balance=1.0)
    data.setup()
    image, label, caption = data.train_set[0]
    row = data.train_set.indices[0]
    assert image.shape == (3, 64, 64) and caption == emoji_caption(Path(data.file_names[row]).stem)
    assert int(label) == int(data.train_set.labels[0])
    _, labels, captions = next(iter(data.train_dataloader()))
    assert len(captions) == 4 and all(isinstance(c, str) and c for c in captions) and labels.shape == (4,)
    # varlib-tokenize's path: the val split in order, each row keeping its emoji's name and category
    units = data.tokenizing_units("val", ImageTransform(64, train=False), shard_size=64)
    tokenize_split(tiny_vae(), units, tmp_path, "val", data.num_classes, (1, 2, 3, 4), captions=True)
    cached = TokenCacheDataModule(str(tmp_path), val_split="val", train_split="val", captions=True)
    cached.setup()
    val_rows = data.val_set.indices
    assert len(cached.val_set) == len(val_rows) > 100
    for i in (0, len(val_rows) // 2, len(val_rows) - 1):
        _, label, caption = cached.val_set[i]
        assert caption == emoji_caption(Path(data.file_names[val_rows[i]]).stem)
        assert int(label) == int(data.val_set.labels[i])


# -- VARModule on captions ------------------------------------------------------------------------------------------


def trainer(tmp_path, steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kwargs)


def test_text_var_module_trains_on_captions_and_shows_the_grid_prompts(captioned_cache, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    prompts = ["red heart", "pizza", "blue circle"]
    module = VARModule(var=TINY_TEXT_VAR, vae=tiny_vae(), optim=dict(lr=1e-2), grid_prompts=prompts, grid_per_class=2)
    assert module.text_conditional and isinstance(module.var.conditioning, TextConditioning)
    encoder = module.var.conditioning.encoder
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    data = TokenCacheDataModule(str(captioned_cache), batch_size=4, captions=True, class_balance=1.0)
    fit = trainer(tmp_path, 4, limit_val_batches=1, val_check_interval=2, num_sanity_val_steps=0,
                  logger=CSVLogger(tmp_path, name="csv", version=""))
    fit.fit(module, datamodule=data)
    assert any(not torch.equal(before[k], v) for k, v in encoder.state_dict().items())  # the encoder trains too
    grids = sorted((tmp_path / "csv" / "images" / "val_samples").glob("*.png"))
    assert len(grids) == 2  # one per validation: the prompts in columns, grid_per_class rows, 64 px, 2 px padding
    assert Image.open(grids[-1]).size == (3 * 66 + 2, 2 * 66 + 2)
    assert module.var.class_names is None  # the data's categories do not name a text model's (absent) classes

    module.export(tmp_path / "t2i.safetensors")
    loaded = varlib.load(tmp_path / "t2i.safetensors")
    for key, tensor in module.var.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    images = loaded.generate(prompts, seed=0, cfg=1.0)
    assert torch.equal(images, module.var.generate(prompts, seed=0, cfg=1.0))


def test_text_and_class_settings_that_do_not_fit_fail_before_training(captioned_cache, tmp_path):
    plain = TokenCacheDataModule(str(captioned_cache), batch_size=4)
    module = VARModule(var=TINY_TEXT_VAR, vae=tiny_vae())
    with pytest.raises(ValueError, match="expected data.captions=true, got false"):
        trainer(tmp_path, 1, logger=False).fit(module, datamodule=plain)
    plain.setup()
    batch = next(iter(plain.train_dataloader()))
    with pytest.raises(ValueError, match="got batches without captions: set data.captions=true"):
        module.tokens_and_input(batch)
    with pytest.raises(ValueError, match="grid_prompts are for a text-conditional model"):
        VARModule(var=dict(TINY_TEXT_VAR, num_classes=3, conditioning=None), vae=tiny_vae(), grid_prompts=["a"])
    with pytest.raises(ValueError, match="grid_prompts must be a list of non-empty prompts"):
        VARModule(var=TINY_TEXT_VAR, vae=tiny_vae(), grid_prompts=["a", ""])
    # a class model trains on a captioned cache's labels, the captions unused
    class_module = VARModule(var=dict(TINY_TEXT_VAR, num_classes=3, conditioning=None), vae=tiny_vae())
    captioned = TokenCacheDataModule(str(captioned_cache), batch_size=4, captions=True)
    captioned.setup()
    labels, _, _ = class_module.tokens_and_input(next(iter(captioned.train_dataloader())))
    assert labels.dtype == torch.long and labels.shape == (4,)


def test_the_class_sampling_fid_callback_is_disabled_for_a_text_model(tmp_path):
    from varlib.evaluation.generation_callback import GenerationMetricsCallback

    callback = GenerationMetricsCallback(extractor=torch.nn.Identity(), reference=str(tmp_path / "none.npz"),
                                         num_classes=3, num_per_class=4, num_is_splits=2)
    with pytest.warns(UserWarning, match="trains a text-conditional model; this callback samples classes 0..2"):
        assert not callback._prepare(VARModule(var=TINY_TEXT_VAR, vae=tiny_vae()))
    assert "text-conditional" in callback.disabled_reason


# -- precomputed features of a frozen encoder -------------------------------------------------------------------------

CLIP = dict(model_type="clip_text_model", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, vocab_size=300, max_position_embeddings=40)
CLIP_ENCODER = dict(_target_="varlib.models.text.HFTextEncoder", config=CLIP, max_length=40)


def clip_encoder(seed: int) -> HFTextEncoder:
    torch.manual_seed(seed)
    return build_text_encoder(CLIP_ENCODER)


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory) -> Path:
    """The captioned cache's images and captions with the features of a random frozen CLIP text model."""
    root = tmp_path_factory.mktemp("features")
    vae, encoder = tiny_vae(), clip_encoder(seed=3)
    torch.manual_seed(1)
    images, labels = torch.rand(8, 3, 64, 64) * 2 - 1, torch.arange(8) % 3
    batches = [(images[:4], labels[:4], CAPTIONS[:4]), (images[4:], labels[4:], CAPTIONS[4:])]
    tokenize_to_cache(vae, batches, root, "train", num_classes=3, captions=True, text_encoder=encoder)
    tokenize_to_cache(vae, batches[:1], root, "val", num_classes=3, captions=True, text_encoder=encoder)
    write_text_encoder(root, encoder)
    return root


def test_cached_text_features_are_the_frozen_encoders_and_train_like_the_captions(feature_cache, tmp_path):
    data = TokenCacheDataModule(str(feature_cache), batch_size=4, captions=True, text_features=True)
    data.setup()
    encoder = clip_encoder(seed=3)
    want = encoder.encode(CAPTIONS)  # padded to the longest of all 8; the shards to their own longest, then the split's
    rows = [data.train_set[i] for i in range(8)]
    assert [caption for _, _, caption, _ in rows] == CAPTIONS
    for i, (_, _, _, features) in enumerate(rows):
        length = int(want.mask_BT[i].sum())
        assert features["mask"].sum() == length and features["mask"][:length].all()
        torch.testing.assert_close(features["tokens"][:length], want.tokens_BTD[i, :length], rtol=0, atol=1e-6)
        torch.testing.assert_close(features["pooled"], want.pooled_BD[i], rtol=0, atol=1e-6)
    # a model whose frozen encoder is configured alike takes the cache's weights (its own random ones differ)
    var = dict(TINY_TEXT_VAR, conditioning=dict(type="text", encoder=CLIP_ENCODER))
    torch.manual_seed(4)
    module = VARModule(var=var, vae=tiny_vae(), optim=dict(lr=1e-2), ema_decay=0.5)
    fit = trainer(tmp_path, 2, logger=False, limit_val_batches=1, num_sanity_val_steps=0)
    fit.fit(module, datamodule=data)
    ema = {k: v.clone() for k, v in module.ema.shadow_params.items()}
    fit.validate(module, datamodule=data)  # a later stage takes the weights no more: the EMA stays
    assert all(torch.equal(module.ema.shadow_params[k], v) for k, v in ema.items())
    model_encoder = module.var.conditioning.encoder
    for key, tensor in encoder.state_dict().items():
        assert torch.equal(model_encoder.state_dict()[key], tensor), key
    # the cached features condition the model as its encoder's own features of the captions do
    batch = next(iter(data.val_dataloader()))
    module.var.eval()
    features, targets_BL, x_BLCv = module.tokens_and_input(batch)
    assert isinstance(features, TextFeatures)
    with torch.no_grad():
        from_cache, from_captions = module.var(features, x_BLCv), module.var(list(batch[2]), x_BLCv)
    torch.testing.assert_close(from_cache, from_captions, rtol=1e-5, atol=1e-5)
    module.export(tmp_path / "t2i.safetensors")  # prompts at sampling go through the cache's encoder
    exported = varlib.load(tmp_path / "t2i.safetensors").conditioning.encoder.state_dict()
    for key, tensor in encoder.state_dict().items():
        assert torch.equal(exported[key], tensor), key


def test_text_feature_settings_that_do_not_fit_fail_with_what_was_expected(feature_cache, captioned_cache, tmp_path):
    images, labels = torch.rand(2, 3, 64, 64) * 2 - 1, torch.zeros(2, dtype=torch.long)
    trainable = SmallTextEncoder(width=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="need captions=True and a frozen text encoder"):
        tokenize_to_cache(tiny_vae(), [(images, labels, ["a", "b"])], tmp_path / "c", "train", 1, captions=True,
                          text_encoder=trainable)
    with pytest.raises(ValueError, match="text_features=true expects the encoder that computed them"):
        TokenCacheDataModule(str(captioned_cache), captions=True, text_features=True)
    with pytest.raises(ValueError, match="expected captions=True and shards with text_"):
        TokenDataset(feature_cache, "train", text_features=True)
    data = TokenCacheDataModule(str(feature_cache), batch_size=4, captions=True, text_features=True)
    other = dict(CLIP_ENCODER, max_length=20)
    module = VARModule(var=dict(TINY_TEXT_VAR, conditioning=dict(type="text", encoder=other)), vae=tiny_vae())
    with pytest.raises(ValueError, match="expected model.var.conditioning.encoder alike"):
        trainer(tmp_path, 1, logger=False).fit(module, datamodule=data)


def test_varlib_tokenize_writes_the_emoji_captions_with_their_features(tmp_path):
    from varlib.data.tokenizing import tokenize_dataset

    varlib.save_tokenizer(tiny_vae(), tmp_path / "tok.safetensors")
    clip = ", ".join(f"{k}: {v}" for k, v in CLIP.items())
    config = compose_config("tokenize", [
        f"tokenizer={tmp_path / 'tok.safetensors'}", "data.captions=true", "splits=[val]", "device=cpu",
        f"out_dir={tmp_path / 'cache'}", "seed=3",
        f"text_encoder={{_target_: varlib.models.text.HFTextEncoder, config: {{{clip}}}, max_length: 40}}"])
    tokenize_dataset(config)
    data = TokenCacheDataModule(str(tmp_path / "cache"), captions=True, text_features=True, train_split="val")
    data.setup()
    _, _, caption, features = data.val_set[5]
    want = clip_encoder(seed=3).encode([caption])  # the command draws a config-only encoder with its seed
    length = int(want.mask_BT.sum())
    torch.testing.assert_close(features["tokens"][:length], want.tokens_BTD[0], rtol=0, atol=1e-6)
    emoji = EmojiDataModule(captions=True)
    emoji.setup()
    assert caption == emoji.val_set[5][2]


# -- varlib-train experiment=t2i_emoji -------------------------------------------------------------------------------


def train_command(tmp: Path, out: str, *extra: str) -> list[str]:
    """``varlib-train experiment=t2i_emoji``: a tiny text VAR on the tiny captioned cache of ``t2i_cache``."""
    return [
        sys.executable, "-m", "varlib.cli.train", "experiment=t2i_emoji", f"paths.output_dir={tmp / out}",
        f"data.root={tmp / 'cache'}", f"model.tokenizer_path={tmp / 'tok.safetensors'}", "data.batch_size=4",
        "model.var.depth=2", "model.var.width=64", "model.var.conditioning.encoder.width=32",
        "model.var.conditioning.encoder.depth=1", "trainer.num_sanity_val_steps=0", "logger=csv",
        "trainer.enable_progress_bar=false", "callbacks.progress_bar=null", *extra,
    ]


def run_killed(tmp: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    """:func:`train_command` in a process of its own, for a run that kills itself (helpers.callbacks.KillAtStep)."""
    # tests/ for the helper callbacks, after whatever PYTHONPATH selects the varlib under test
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(Path(__file__).parent)]))
    return subprocess.run(train_command(tmp, out, *extra), cwd=tmp, env={**os.environ, "PYTHONPATH": path},
                          capture_output=True, text=True, timeout=600)


def train(tmp: Path, out: str, *extra: str) -> dict:
    """:func:`train_command` to its end in this process (helpers.commands); returns the final val metrics."""
    run = run_in_process(train_command(tmp, out, *extra), tmp)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((tmp / out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def t2i_cache(tmp_path_factory) -> Path:
    """A tokenizer and a cache of 16 train / 8 held-out val images captioned "<colour> <thing>"."""
    tmp = tmp_path_factory.mktemp("t2i_train")
    vae = tiny_vae()
    varlib.save_tokenizer(vae, tmp / "tok.safetensors")
    torch.manual_seed(1)
    images, labels = torch.rand(24, 3, 64, 64) * 2 - 1, torch.arange(24) % 3
    captions = [f"{colour} {shape}" for colour in ("red", "blue", "green") for shape in
                ("heart", "circle", "square", "star", "moon", "tree", "cat", "dog")]
    batches = [(images[i:i + 8], labels[i:i + 8], captions[i:i + 8]) for i in range(0, 24, 8)]
    tokenize_to_cache(vae, batches[:2], tmp / "cache", "train", num_classes=3, captions=True)
    tokenize_to_cache(vae, batches[2:], tmp / "cache", "val", num_classes=3, captions=True)  # held out
    return tmp


@pytest.mark.slow
def test_varlib_train_t2i_emoji_lowers_the_held_out_loss_and_exports_a_text_var(t2i_cache):
    untrained = train(t2i_cache, "untrained", "trainer.max_steps=0")["val/loss_avg"]
    trained = train(t2i_cache, "trained", "trainer.max_steps=20", "trainer.val_check_interval=10")["val/loss_avg"]
    assert untrained == pytest.approx(torch.log(torch.tensor(32.0)).item(), abs=0.1)  # near-uniform at init
    assert trained < untrained - 0.5

    model = varlib.load(t2i_cache / "trained" / "model.safetensors")
    assert isinstance(model.conditioning, TextConditioning) and model.num_classes == 0
    assert model.conditioning.context_dim == 32  # the config's encoder, with cross-attention
    images = model.generate(["red heart", "blue moon", "pizza"], seed=0)  # the file's sampling settings (cfg 2)
    assert images.shape == (3, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    assert len(list((t2i_cache / "trained" / "csv" / "images" / "val_samples").glob("*.png"))) == 2


def step_losses(run_dir: Path) -> dict[int, float]:
    rows = csv.DictReader((run_dir / "csv" / "metrics.csv").open())
    return {int(row["step"]): float(row["train/loss"]) for row in rows if row.get("train/loss")}


@pytest.mark.slow
def test_a_killed_t2i_run_resumes_mid_epoch_and_ends_like_an_uninterrupted_one(t2i_cache):
    # 4 class-balanced batches an epoch, validated (and saved) every 2: killed after step 6, mid-epoch
    steps = ("trainer.max_steps=12", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1")
    train(t2i_cache, "reference", *steps)
    kill = ("+callbacks.kill._target_=helpers.callbacks.KillAtStep", "+callbacks.kill.step=6")
    assert run_killed(t2i_cache, "resumed", *steps, *kill).returncode == -9
    resumed = run_in_process(train_command(t2i_cache, "resumed", *steps, *kill), t2i_cache)  # the marker: no kill
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr  # not a fresh (equally deterministic) run
    # the same captions in the same order, text dropout and optimiser state (the text encoder's too)
    want, got = step_losses(t2i_cache / "reference"), step_losses(t2i_cache / "resumed")
    assert sorted(got) == list(range(12))
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], abs=1e-6), step
    reference = varlib.load(t2i_cache / "reference" / "model.safetensors").state_dict()
    for key, tensor in varlib.load(t2i_cache / "resumed" / "model.safetensors").state_dict().items():
        torch.testing.assert_close(tensor, reference[key], atol=1e-6, rtol=0, msg=key)


# -- varlib-sample prompts=[...] ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_var_file(tmp_path_factory) -> Path:
    torch.manual_seed(2)
    var = varlib.VAR(tiny_vae(), varlib.VARConfig(**TINY_TEXT_VAR))
    with torch.no_grad():  # open gates, so the token features (and a negative prompt) reach the logits
        for block in var.blocks:
            block.cross_gate.fill_(1.0)
    var.sampling = SamplingConfig(cfg=2.0, top_k=8, top_p=0.9)
    path = tmp_path_factory.mktemp("t2i") / "t2i.safetensors"
    varlib.save_var(var, path)
    return path


def test_varlib_sample_draws_per_class_images_of_each_prompt(text_var_file, tmp_path):
    from varlib.generate_files import sample_to_files

    prompts = ["red heart", "cat face", "pizza"]
    overrides = [f"checkpoint={text_var_file}", "prompts=[red heart, cat face, pizza]", "per_class=2", "batch_size=4",
                 "seed=5", "device=cpu"]
    result = sample_to_files(compose_config("sample", [*overrides, f"out_dir={tmp_path / 'a'}"]))
    assert result.prompts == [p for p in prompts for _ in range(2)] and result.labels == []
    assert [p.name for p in result.image_paths] == [f"{i:05d}_prompt{i // 2}.png" for i in range(6)]
    assert Image.open(result.grid_path).size == (2 * 66 + 2, 3 * 66 + 2)  # a row per prompt, 64 px, 2 px padding
    # batch i of the prompt rows with seed + i and the file's sampling settings
    var = varlib.load(text_var_file)
    want = torch.cat([var.generate(result.prompts[:4], seed=5), var.generate(result.prompts[4:], seed=6)])
    got = torch.stack([torch.from_numpy(np.asarray(Image.open(p))).permute(2, 0, 1) for p in result.image_paths])
    assert torch.equal(got, (want * 255).round().to(torch.uint8))
    negative = sample_to_files(compose_config("sample", [*overrides, "negative=blue heart", f"out_dir={tmp_path / 'b'}"]))
    steered = torch.cat([var.generate(result.prompts[:4], seed=5, negative="blue heart"),
                         var.generate(result.prompts[4:], seed=6, negative="blue heart")])
    assert not torch.equal(steered, want)
    got = torch.stack([torch.from_numpy(np.asarray(Image.open(p))).permute(2, 0, 1) for p in negative.image_paths])
    assert torch.equal(got, (steered * 255).round().to(torch.uint8))


def test_varlib_sample_refuses_labels_for_text_and_prompts_for_class_models(text_var_file, tmp_path):
    from varlib.generate_files import sample_to_files

    base = [f"checkpoint={text_var_file}", "device=cpu", f"out_dir={tmp_path}"]
    with pytest.raises(ValueError, match="a text-conditional model samples prompts"):
        sample_to_files(compose_config("sample", base))
    with pytest.raises(ValueError, match="takes prompts, not labels"):
        sample_to_files(compose_config("sample", [*base, "prompts=[a]", "labels=[0]"]))
    class_var = varlib.VAR(tiny_vae(), varlib.VARConfig(**dict(TINY_TEXT_VAR, num_classes=3, conditioning=None)))
    varlib.save_var(class_var, tmp_path / "class.safetensors")
    with pytest.raises(ValueError, match="prompts and negative are for a text-conditional model"):
        sample_to_files(compose_config("sample", [f"checkpoint={tmp_path / 'class.safetensors'}", "device=cpu",
                                             "prompts=[red heart]", f"out_dir={tmp_path}"]))
