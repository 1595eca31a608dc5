"""varlib's own model files round-trip through varlib.load."""

import ast
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint

import varlib
from varlib.files import format as file_format
from varlib.models.raster_ar import RasterAR
from varlib.models.sampling import SamplingConfig


def test_tokenizer_and_var_files_round_trip(tiny_models, tmp_path):
    vae, var, b = tiny_models
    varlib.save_tokenizer(vae, tmp_path / "tok.safetensors")
    loaded = varlib.load(tmp_path / "tok.safetensors")
    assert isinstance(loaded, varlib.MultiScaleVQVAE) and not loaded.training
    assert torch.equal(loaded.decode_tokens(b["vq"]["idx_Bl"]), vae.decode_tokens(b["vq"]["idx_Bl"]))

    varlib.save_var(var, tmp_path / "var.safetensors")
    loaded_var = varlib.load(tmp_path / "var.safetensors")
    assert isinstance(loaded_var, varlib.VAR) and loaded_var.config == var.config
    assert torch.equal(loaded_var.generate([1, 2], top_k=3, seed=0), var.generate([1, 2], top_k=3, seed=0))


def test_load_rejects_foreign_files(tiny_models, tmp_path):
    _, _, b = tiny_models
    torch.save(b["var_state_dict"], tmp_path / "official.pth")
    with pytest.raises(ValueError, match="not a varlib model file"):
        varlib.load(tmp_path / "official.pth")
    with pytest.raises(FileNotFoundError):
        varlib.load(tmp_path / "absent.safetensors")


def test_save_pretrained_round_trip_gives_equal_outputs(tiny_models, tmp_path, monkeypatch):
    vae, var, b = tiny_models
    monkeypatch.setattr(var, "sampling", SamplingConfig(cfg=2.5, top_k=7, top_p=0.9))
    folder = var.save_pretrained(tmp_path / "var")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["kind"] == "var" and config["var_config"]["depth"] == var.depth
    assert config["sampling"] == {"cfg": 2.5, "top_k": 7, "top_p": 0.9, "cfg_until": None, "prune": 1.0,
                                  "stop_after": None}
    assert config["vae_config"]["vocab_size"] == vae.vocab_size

    loaded = varlib.VAR.from_pretrained(folder)
    assert isinstance(loaded, varlib.VAR) and not loaded.training and loaded.config == var.config
    assert loaded.sampling == var.sampling
    for name, tensor in var.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    images = var.generate([1, 2], seed=3)
    assert torch.equal(loaded.generate([1, 2], seed=3), images)
    labels = torch.tensor([0, 3])
    x_BLCv = torch.randn(2, var.L - 1, var.code_channels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(labels, x_BLCv), var(labels, x_BLCv))
    # the same file also opens with varlib.load, settings included
    assert varlib.load(folder / "model.safetensors").sampling == var.sampling

    tokenizer = varlib.MultiScaleVQVAE.from_pretrained(vae.save_pretrained(tmp_path / "tok"))
    assert torch.equal(tokenizer.decode_tokens(b["vq"]["idx_Bl"]), vae.decode_tokens(b["vq"]["idx_Bl"]))
    with pytest.raises(ValueError, match="holds a MultiScaleVQVAE, expected a VAR"):
        varlib.VAR.from_pretrained(tmp_path / "tok")


def test_generate_uses_the_models_sampling_settings_and_explicit_arguments_win(tiny_models, tmp_path, monkeypatch):
    _, var, _ = tiny_models
    monkeypatch.setattr(var, "sampling", SamplingConfig(cfg=3.0, top_k=1, top_p=0.0))
    loaded = varlib.VAR.from_pretrained(var.save_pretrained(tmp_path / "var"))
    default = loaded.generate([1, 2, 3], seed=0)
    assert torch.equal(default, loaded.generate([1, 2, 3], seed=0, cfg=3.0, top_k=1, top_p=0.0))
    # top_k=1 is greedy: the seed no longer matters, unlike with the filter switched off explicitly
    assert torch.equal(default, loaded.generate([1, 2, 3], seed=1))
    unfiltered = loaded.generate([1, 2, 3], seed=0, top_k=0)
    assert not torch.equal(unfiltered, default)
    assert torch.equal(unfiltered, var.generate([1, 2, 3], seed=0, cfg=3.0, top_k=0, top_p=0.0))


def test_config_json_edits_change_the_recommended_settings(tiny_models, tmp_path):
    _, var, _ = tiny_models
    folder = var.save_pretrained(tmp_path / "var")
    config = json.loads((folder / "config.json").read_text())
    config["sampling"]["top_k"] = 5
    (folder / "config.json").write_text(json.dumps(config))
    assert varlib.VAR.from_pretrained(folder).sampling.top_k == 5
    config["sampling"]["temperature"] = 2.0
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown keys \\['temperature'\\]"):
        varlib.VAR.from_pretrained(folder)
    with pytest.raises(ValueError, match="top_p in \\[0, 1\\]"):
        SamplingConfig(top_p=1.5)


def test_from_pretrained_names_what_is_missing(tiny_models, tmp_path, monkeypatch):
    _, var, _ = tiny_models
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected config.json"):
        varlib.VAR.from_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a Hub repo id"):
        varlib.VAR.from_pretrained(tmp_path / "absent" / "deeper" / "folder")
    varlib.save_var(var, tmp_path / "var.safetensors")
    with pytest.raises(ValueError, match="varlib.load opens files"):
        varlib.VAR.from_pretrained(tmp_path / "var.safetensors")

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(ImportError, match="needs the huggingface_hub package"):
        varlib.VAR.from_pretrained("someone/var-d16")


def test_from_pretrained_downloads_repo_ids_through_huggingface_hub(tiny_models, tmp_path, monkeypatch):
    _, var, _ = tiny_models
    folder = var.save_pretrained(tmp_path / "snapshot")
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        if repo_id == "someone/offline":
            raise ConnectionError("no network")
        return str(folder)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    loaded = varlib.VAR.from_pretrained("someone/var-d2", revision="v1")
    assert calls == [("someone/var-d2", "v1", ("config.json", "model.safetensors"))]
    assert torch.equal(loaded.generate([0], seed=0), var.generate([0], seed=0))
    with pytest.raises(OSError, match="needs network access.*local folder works offline"):
        varlib.VAR.from_pretrained("someone/offline")


def test_load_opens_official_files_and_says_what_a_foreign_file_holds(tiny_models, tmp_path):
    vae, var, b = tiny_models
    torch.save(b["vqvae_state_dict"], tmp_path / "vae.pth")
    torch.save(b["var_state_dict"], tmp_path / "var.pth")
    patch_nums = b["config"]["patch_nums"]
    tokenizer = varlib.load(tmp_path / "vae.pth", patch_nums=patch_nums)
    assert isinstance(tokenizer, varlib.MultiScaleVQVAE) and tokenizer.patch_nums == tuple(patch_nums)
    assert torch.equal(tokenizer.decode_tokens(b["vq"]["idx_Bl"]), vae.decode_tokens(b["vq"]["idx_Bl"]))
    for given in (tokenizer, tmp_path / "vae.pth"):  # the tokenizer as a model or as its file
        loaded = varlib.load(tmp_path / "var.pth", vae=given, patch_nums=patch_nums)
        assert loaded.sampling == varlib.files.official.OFFICIAL_SAMPLING
        assert torch.equal(loaded.generate([1, 2], top_k=3, seed=0), var.generate([1, 2], top_k=3, seed=0))
    varlib.save_var(var, tmp_path / "var.safetensors")
    with pytest.raises(ValueError, match=r"vae=.*var.safetensors: expected a tokenizer, got a VAR"):
        varlib.load(tmp_path / "var.pth", vae=tmp_path / "var.safetensors")

    torch.save({"step": 3, "model": b["var_state_dict"]}, tmp_path / "wrapped.pth")
    with pytest.raises(ValueError, match=r"not a plain state dict \(keys model, step\)"):
        varlib.load(tmp_path / "wrapped.pth")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"holds a state dict of 1 tensors without .*\(keys encoder.weight\)"):
        varlib.load(tmp_path / "other.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a state dict or checkpoint \\(a mapping\\), got a list"):
        varlib.load(tmp_path / "list.pth")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="corrupt.safetensors: expected a torch checkpoint or .safetensors file, "
                                         "got an unreadable file"):
        varlib.load(tmp_path / "corrupt.safetensors")


def test_load_refuses_pickled_objects_with_its_own_message(tmp_path):
    torch.save({"weight": torch.zeros(2), "args": SamplingConfig()}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="holds pickled Python objects") as error:
        varlib.load(tmp_path / "pickled.pth")
    assert "never runs pickled code" in str(error.value) and "weights_only=False" not in str(error.value)


def test_load_opens_pretrained_folders_and_distributed_checkpoints(tiny_models, tmp_path):
    _, var, _ = tiny_models
    folder = var.save_pretrained(tmp_path / "var")
    assert torch.equal(varlib.load(folder).generate([1], seed=0), var.generate([1], seed=0))

    # Lightning's layout of an FSDP2 checkpoint: shards of {"state_dict": ..., "optimizer_0": ...} + meta.pt
    checkpoint = tmp_path / "last.ckpt"
    state = {**{f"vae.{k}": v for k, v in var.vae.state_dict().items()}, **{f"var.{k}": v for k, v in var.state_dict().items()}}
    torch.distributed.checkpoint.save({"state_dict": state, "optimizer_0": {"step": torch.tensor(3.0)}},
                                      checkpoint_id=checkpoint, no_dist=True)
    torch.save({"global_step": 3, "varlib": file_format.model_metadata(var.vae, var)}, checkpoint / "meta.pt")
    loaded = varlib.load(checkpoint)
    for name, tensor in var.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    (checkpoint / "meta.pt").unlink()
    with pytest.raises(ValueError, match="distributed checkpoint without Lightning's meta.pt"):
        varlib.load(checkpoint)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected config.json"):
        varlib.load(tmp_path / "empty")


def test_file_kinds_name_their_classes_and_other_kinds_are_refused(tiny_models, tmp_path):
    vae, var, _ = tiny_models
    assert file_format.MODEL_CLASSES == {"tokenizer": varlib.MultiScaleVQVAE, "var": varlib.VAR, "raster_ar": RasterAR}
    assert file_format.model_metadata(vae)["kind"] == "tokenizer"
    assert file_format.model_metadata(var.vae, var)["kind"] == "var"
    folder = var.save_pretrained(tmp_path / "var")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "kind": "diffusion"}))
    refused = "expected a varlib model kind among 'tokenizer', 'var', 'raster_ar', got 'diffusion'"
    with pytest.raises(ValueError, match=refused):
        varlib.load(folder)
    with pytest.raises(ValueError, match=refused):
        varlib.VAR.from_pretrained(folder)
    with pytest.raises(ValueError, match="expected a VAR or RasterAR, got MultiScaleVQVAE"):
        varlib.save_var(vae, tmp_path / "tok.safetensors")
    with pytest.raises(ValueError, match="expected one of MultiScaleVQVAE, VAR, RasterAR, got Linear"):
        file_format.save_pretrained(torch.nn.Linear(1, 1), tmp_path / "linear")


def test_models_import_no_varlib_module_above_them():
    """The models are the floor: none imports anything above varlib.models but for the file methods of
    models/pretrained.py, which delegate to varlib.files.format inside the methods (the model classes register
    nowhere: files/format.py lists them)."""
    within, above = [], []
    for path in sorted((Path(varlib.__file__).parent / "models").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = ["varlib.<relative>" if node.level > 1 else node.module or ""]
            else:
                continue
            for module in filter(lambda m: m.split(".")[0] == "varlib", modules):
                (within if module.startswith("varlib.models.") else above).append(f"{path.name}: {module}")
    assert "vqvae.py: varlib.models.pretrained" in within
    assert above == ["pretrained.py: varlib.files.format"] * 3
