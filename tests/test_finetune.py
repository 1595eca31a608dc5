"""Fine-tuning from a pretrained model: model.init_from (another class count and patch schedule, on a tiny
official-format checkpoint and varlib files), class_map, class_names, model.trainable and LoRA merged on export."""

import logging
import subprocess
import sys

import pytest
import torch

import varlib
from varlib import load_official_vqvae
from varlib.files.format import save_var
from varlib.models.transfer import resize_class_embedding, resize_position_embedding, transfer_state
from varlib.models.transformer import VAR, VARConfig
from varlib.training.optim_schedules import decay_parameter_groups
from varlib.training.var_module import VARModule


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The tiny4 official bundle's files: (tokenizer .pth, VAR .pth (10 classes, schedule 1-2-3-4), bundle)."""
    from conftest import load_bundle

    bundle = load_bundle("tiny4")
    tmp = tmp_path_factory.mktemp("official")
    torch.save(bundle["vqvae_state_dict"], tmp / "vae_tiny.pth")
    torch.save(bundle["var_state_dict"], tmp / "var_tiny.pth")
    return tmp / "vae_tiny.pth", tmp / "var_tiny.pth", bundle


def test_class_embedding_moves_null_row_keeps_mapped_rows_and_starts_others_at_the_mean():
    old = torch.arange(6 * 2, dtype=torch.float32).view(6, 2)  # 5 classes + null
    new = resize_class_embedding(old, 4, {0: 3, 2: 1})  # 3 classes + null
    assert torch.equal(new[3], old[5])  # null row at the new last index
    assert torch.equal(new[0], old[3]) and torch.equal(new[2], old[1])
    assert torch.equal(new[1], old[:5].mean(0))  # the null row is not part of the mean
    with pytest.raises(ValueError, match=r"class_map entry 5 -> 0: expected a new class in \[0, 3\)"):
        resize_class_embedding(old, 4, {5: 0})


def test_position_embedding_resize_is_per_scale_and_identity_on_the_same_scale():
    old = torch.randn(1, 1 + 4 + 16, 8)
    new = resize_position_embedding(old, (1, 2, 4), (1, 2, 8))
    assert new.shape == (1, 1 + 4 + 64, 8)
    assert torch.equal(new[:, :5], old[:, :5])  # scales whose side is unchanged are copied
    grid = old[:, 5:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)  # the 4x4 scale, bicubic to 8x8
    want = torch.nn.functional.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(new[:, 5:], want.permute(0, 2, 3, 1).reshape(1, 64, 8))
    # a constant grid stays constant under bicubic resizing
    flat = torch.ones(1, 21, 8)
    torch.testing.assert_close(resize_position_embedding(flat, (1, 2, 4), (1, 2, 8))[:, 5:], torch.ones(1, 64, 8))


def test_unmappable_shape_names_the_parameter_and_both_shapes():
    target, source = {"head.weight": torch.zeros(4, 8)}, {"head.weight": torch.zeros(5, 8)}
    with pytest.raises(ValueError, match=r"'head.weight' has shape \(5, 8\) in the pretrained model and \(4, 8\)"):
        transfer_state(target, source)


def test_official_checkpoint_fine_tunes_with_new_classes_and_schedule(official, caplog):
    """A tiny official VAR (10 classes at 1-2-3-4) starts a VAR of 3 classes at 1-2-4-8 (128 px)."""
    vae_path, var_path, bundle = official
    pretrained = varlib.load(var_path, vae=varlib.load(vae_path, patch_nums=(1, 2, 3, 4)))
    vae = load_official_vqvae(bundle["vqvae_state_dict"], patch_nums=(1, 2, 4, 8))
    with caplog.at_level(logging.INFO, logger="varlib.training.finetune"):
        module = VARModule(var={"depth": None, "width": None, "num_heads": None, "num_classes": 3}, vae=vae,
                           init_from=str(var_path), class_map={0: 7}, class_names=["seven", "new", "other"],
                           optim={"lr": 1e-3})
    var = module.var
    assert (var.depth, var.width, var.num_classes, var.patch_nums) == (2, 128, 3, (1, 2, 4, 8))
    assert "class_emb.weight: 10 -> 3 classes, null row moved to 3" in caplog.text
    assert "pos_1LC: per-scale bicubic (1, 2, 3, 4) -> (1, 2, 4, 8)" in caplog.text
    assert torch.equal(var.class_emb.weight[3], pretrained.class_emb.weight[10])
    assert torch.equal(var.class_emb.weight[0], pretrained.class_emb.weight[7])
    assert torch.equal(var.blocks[1].ffn.fc2.weight, pretrained.blocks[1].ffn.fc2.weight)
    assert torch.equal(var.pos_1LC[:, :5], pretrained.pos_1LC[:, :5])  # scales 1x1 and 2x2 unchanged
    assert torch.equal(var.lvl_embed.weight, pretrained.lvl_embed.weight)
    # guidance still works: the null class's logits are the pretrained model's on the shared first scales
    var.eval()
    tokens = vae.encode_tokens(torch.rand(2, 3, 128, 128) * 2 - 1, var.patch_nums)
    x = vae.teacher_forcing_input(tokens, var.patch_nums)
    null = torch.full((2,), 3)
    logits = var(null, x[:, :4])
    want = pretrained(torch.full((2,), 10), x[:, :4])
    torch.testing.assert_close(logits, want)
    images = var.generate(["seven", "null"], cfg=2.0, top_k=10, top_p=0.9, seed=0)
    assert images.shape == (2, 3, 128, 128)
    # a training step runs on the new schedule
    module.train()
    loss = torch.nn.functional.cross_entropy(var(torch.tensor([0, 2]), x).flatten(0, 1), torch.cat(tokens, 1).flatten())
    loss.backward()
    assert var.class_emb.weight.grad is not None


def test_class_count_change_on_a_varlib_file_and_class_names_in_the_export(official, tmp_path):
    vae_path, var_path, _ = official
    vae = varlib.load(vae_path, patch_nums=(1, 2, 3, 4))
    source = varlib.load(var_path, vae=vae)
    source.class_names = [f"c{i}" for i in range(10)]
    save_var(source, tmp_path / "pretrained.safetensors")
    module = VARModule(var={"depth": None, "width": None, "num_heads": None, "num_classes": 12}, vae=vae,
                       init_from=str(tmp_path / "pretrained.safetensors"), class_map={i: i for i in range(10)})
    assert module.var.class_names is None  # two new classes have no name
    assert torch.equal(module.var.class_emb.weight[:10], source.class_emb.weight[:10])
    assert torch.equal(module.var.class_emb.weight[12], source.class_emb.weight[10])
    carried = VARModule(var={"depth": None, "width": None, "num_heads": None, "num_classes": 2}, vae=vae,
                        init_from=str(tmp_path / "pretrained.safetensors"), class_map={0: 4, 1: 2})
    assert carried.var.class_names == ["c4", "c2"]
    carried.export(tmp_path / "out.safetensors")
    loaded = varlib.load(tmp_path / "out.safetensors")
    assert loaded.class_names == ["c4", "c2"]
    torch.testing.assert_close(loaded.generate("c2", batch_size=2, seed=1), loaded.generate([1, 1], seed=1))
    with pytest.raises(ValueError, match="unknown class name 'c9'; the model's classes: 'c4', 'c2'"):
        loaded.generate(["c9"])
    with pytest.raises(ValueError, match="model.class_map maps new classes to pretrained ones: it needs"):
        VARModule(var={"depth": 2, "width": 128, "num_heads": 2, "num_classes": 2}, vae=vae, class_map={0: 1})


def test_trainable_patterns_freeze_the_rest_and_unknown_patterns_fail(official, caplog):
    vae_path, var_path, _ = official
    vae = varlib.load(vae_path, patch_nums=(1, 2, 3, 4))
    with caplog.at_level(logging.INFO, logger="varlib.training.finetune"):
        module = VARModule(var={"depth": None, "width": None, "num_heads": None, "num_classes": 10}, vae=vae,
                           init_from=str(var_path), trainable=["class_emb.*", "head.*"])
    trained = {n for n, p in module.var.named_parameters() if p.requires_grad}
    assert trained == {"class_emb.weight", "head.weight", "head.bias"}
    count = sum(module.var.get_parameter(n).numel() for n in trained)
    frozen = sum(p.numel() for p in module.var.parameters()) - count
    assert f"VAR: {count} trainable parameters, {frozen} frozen" in caplog.text
    groups = decay_parameter_groups(module.var, 0.05)  # the optimiser's groups hold the trainable ones only
    assert sum(len(g["params"]) for g in groups) == 3
    with pytest.raises(ValueError, match=r"model.trainable patterns \['blockz.\*'\] match no parameter"):
        VARModule(var={"depth": None, "width": None, "num_heads": None, "num_classes": 10}, vae=vae,
                  init_from=str(var_path), trainable=["blockz.*"])


def test_lora_trains_adapters_only_and_exports_a_merged_file_that_opens_without_peft(official, tmp_path):
    vae_path, var_path, _ = official
    vae = varlib.load(vae_path, patch_nums=(1, 2, 3, 4))
    module = VARModule(var={"depth": None, "width": None, "num_heads": None, "num_classes": 3}, vae=vae,
                       init_from=str(var_path), lora={"r": 4, "alpha": 8, "target_modules": ["proj", "fc1", "fc2"]})
    var = module.var
    trained = [n for n, p in var.named_parameters() if p.requires_grad]
    assert "class_emb.weight" in trained  # new classes need their own rows
    adapters = [n for n in trained if n != "class_emb.weight"]
    assert all(".lora_" in n for n in adapters) and len(adapters) == 2 * 2 * 3  # A and B of proj, fc1, fc2, 2 blocks
    with torch.no_grad():  # adapters start at zero (B = 0): give them values so the merge matters
        for n, p in var.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    var.eval()
    labels, x = torch.tensor([0, 2]), torch.randn(2, 29, 8)
    with torch.no_grad():
        want = var(labels, x)
    module.export(tmp_path / "lora.safetensors")
    merged = varlib.load(tmp_path / "lora.safetensors")
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(labels, x), want, atol=1e-5, rtol=1e-5)
    # a fresh interpreter without peft opens the exported file
    code = ("import sys; sys.modules['peft'] = None; import varlib; "
            f"v = varlib.load({str(tmp_path / 'lora.safetensors')!r}); print(v.num_classes)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and done.stdout.strip() == "3", done.stderr[-2000:]
    with pytest.raises(ValueError, match="reads mat_qkv.weight directly"):
        VARModule(var={"depth": None, "width": None, "num_heads": None, "num_classes": 3}, vae=vae,
                  init_from=str(var_path), lora={"r": 4, "target_modules": ["mat_qkv"]})


def test_init_from_rejects_another_kind_of_model(official):
    vae_path, var_path, _ = official
    vae = varlib.load(vae_path, patch_nums=(1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"holds a MultiScaleVQVAE; the VARModule needs a VAR"):
        VARModule(var={"depth": 2, "num_classes": 3}, vae=vae, init_from=str(vae_path))


def test_tokenizer_init_from_takes_the_architecture_and_weights_and_trains_the_decoder_only(official, caplog):
    from varlib.training.tokenizer_module import TokenizerModule

    vae_path, _, bundle = official
    with caplog.at_level(logging.INFO, logger="varlib.training.finetune"):
        module = TokenizerModule(vae={"vocab_size": None, "ch": None, "z_channels": None, "patch_nums": [1, 2, 3, 4]},
                                 loss={"lpips_weight": 0.0, "disc_weight": 0.0}, init_from=str(vae_path),
                                 trainable=["decoder.*", "post_quant_conv.*"])
    assert "init_from" in caplog.text and "loaded" in caplog.text
    assert module.hparams["vae"]["ch"] == 32 and module.vae.vocab_size == 64
    for name, value in bundle["vqvae_state_dict"].items():
        assert torch.equal(module.vae.state_dict()[name], value.to(module.vae.state_dict()[name].dtype)), name
    trained = {n.split(".")[0] for n, p in module.vae.named_parameters() if p.requires_grad}
    assert trained == {"decoder", "post_quant_conv"}
    (optimizer,) = module.configure_optimizers()
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in module.vae.parameters() if p.requires_grad)


def test_raster_ar_init_from_changes_the_class_count(tmp_path):
    from varlib.models.raster_ar import RasterAR
    from varlib.models.vqvae import MultiScaleVQVAE
    from varlib.training.raster_ar_module import RasterARModule

    torch.manual_seed(0)
    vae = MultiScaleVQVAE(vocab_size=16, z_channels=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(4,),
                          using_sa=False, using_mid_sa=False, norm_groups=8)
    source = RasterAR(vae, VARConfig(depth=1, num_classes=4, width=32, num_heads=2))
    save_var(source, tmp_path / "ar.safetensors")
    module = RasterARModule(var={"depth": None, "width": None, "num_heads": None, "num_classes": 2}, vae=vae,
                            init_from=str(tmp_path / "ar.safetensors"), class_map={1: 3})
    ar = module.ar
    assert (ar.depth, ar.width, ar.num_classes) == (1, 32, 2)
    assert torch.equal(ar.class_emb.weight[2], source.class_emb.weight[4])  # null row
    assert torch.equal(ar.class_emb.weight[1], source.class_emb.weight[3])
    assert torch.equal(ar.class_emb.weight[0], source.class_emb.weight[:4].mean(0))
    assert torch.equal(ar.head.weight, source.head.weight)


def test_fine_tuning_inherits_the_design_switches_the_finetune_experiment_leaves_null(tmp_path):
    from varlib.configs import compose_config
    from varlib.models.vqvae import MultiScaleVQVAE

    torch.manual_seed(0)
    vae = MultiScaleVQVAE(vocab_size=16, z_channels=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2),
                          using_sa=False, using_mid_sa=False, norm_groups=8)
    source = VAR(vae, VARConfig(depth=1, num_classes=4, width=32, num_heads=2, adaln=False, attn_l2_norm=False))
    save_var(source, tmp_path / "bare.safetensors")
    var = dict(compose_config("train", ["experiment=var_finetune"]).model.var)
    assert var["adaln"] is None and var["attn_l2_norm"] is None
    module = VARModule(var={**var, "num_classes": 4}, vae=vae, init_from=str(tmp_path / "bare.safetensors"))
    assert not module.var.adaln and not module.var.config["attn_l2_norm"]
    assert torch.equal(module.var.head_nm.weight, source.head_nm.weight)
