"""varlib's own model files: safetensors weights plus the constructor config in the file's metadata.

A tokenizer file holds ``MultiScaleVQVAE`` weights; a transformer file holds the transformer (a VAR under ``var.``,
the raster-AR baseline under ``ar.``) and its tokenizer under ``vae.``, so one file is enough to sample, and the
transformer's recommended sampling settings (``.sampling``). :func:`load` also opens Lightning checkpoints written by varlib's training modules (read
with ``torch.load(weights_only=True)``).

:func:`save_pretrained` / :func:`from_pretrained` share models as the Hugging Face Hub does: a folder with
``model.safetensors`` (the file above) and ``config.json`` (the same configs, readable); ``from_pretrained``
also takes a Hub repo id, downloaded with the optional ``huggingface_hub`` package.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from varlib.models.raster_ar import RasterAR
from varlib.models.sampling import SamplingConfig
from varlib.models.transformer import VAR
from varlib.models.vqvae import MultiScaleVQVAE
from varlib.official import load_strict

FORMAT = "varlib/1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# metadata entries that hold JSON objects (safetensors metadata values are strings)
JSON_ENTRIES = ("vae_config", "var_config", "ar_config", "sampling")
#: kind -> (transformer class, the prefix of its weights and config in files and Lightning checkpoints)
TRANSFORMER_KINDS = {"var": (VAR, "var"), "raster_ar": (RasterAR, "ar")}
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def transformer_kind(model: nn.Module) -> str:
    """The file kind of a transformer ('var' or 'raster_ar')."""
    for kind, (cls, _) in TRANSFORMER_KINDS.items():
        if isinstance(model, cls):
            return kind
    raise ValueError(f"expected a VAR or RasterAR, got {type(model).__name__}")


def _plain_config(config: Mapping) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def _tensors(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().cpu().contiguous() for k, v in state.items()}


def model_metadata(vae: MultiScaleVQVAE, var: VAR | RasterAR | None = None) -> dict[str, str]:
    """The metadata that makes a file loadable by :func:`load`. Lightning modules store it in their
    checkpoints under ``checkpoint["varlib"]`` (with weights under ``vae.`` and ``var.`` or ``ar.``)."""
    kind = "tokenizer" if var is None else transformer_kind(var)
    meta = {"format": FORMAT, "kind": kind, "vae_config": json.dumps(_plain_config(vae.config))}
    if var is not None:
        meta[f"{TRANSFORMER_KINDS[kind][1]}_config"] = json.dumps(_plain_config(var.config))
        meta["sampling"] = json.dumps(asdict(var.sampling))
    return meta


def save_tokenizer(vae: MultiScaleVQVAE, path: str | os.PathLike) -> None:
    """Writes a tokenizer to a ``.safetensors`` file that :func:`load` turns back into a MultiScaleVQVAE."""
    save_file(_tensors("", vae.state_dict()), os.fspath(path), metadata=model_metadata(vae))


def save_var(var: VAR | RasterAR, path: str | os.PathLike) -> None:
    """Writes a VAR (or the raster-AR baseline) together with its tokenizer to one ``.safetensors`` file."""
    prefix = TRANSFORMER_KINDS[transformer_kind(var)][1] + "."
    state = {**_tensors("vae.", var.vae.state_dict()), **_tensors(prefix, var.state_dict())}
    save_file(state, os.fspath(path), metadata=model_metadata(var.vae, var))


def build_tokenizer(config: Mapping, state_dict: Mapping[str, torch.Tensor] | None = None) -> MultiScaleVQVAE:
    vae = MultiScaleVQVAE(**config)
    if state_dict is not None:
        load_strict(vae, state_dict, "MultiScaleVQVAE")
    return vae


def build_var(config: Mapping, vae: MultiScaleVQVAE, state_dict: Mapping[str, torch.Tensor] | None = None,
              kind: str = "var") -> VAR | RasterAR:
    """The transformer of file kind ``kind`` ('var' or 'raster_ar') on ``vae``, with weights when given."""
    cls = TRANSFORMER_KINDS[kind][0]
    var = cls(vae, **config)
    if state_dict is not None:
        load_strict(var, state_dict, cls.__name__)
    return var


def _split(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _read(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, state dict) of a varlib ``.safetensors`` file or Lightning checkpoint (tensors on the CPU)."""
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("kind") == "tokenizer":
            state = {"vae." + k: v for k, v in state.items()}
        return meta, state
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    meta = ckpt.get("varlib", {}) if isinstance(ckpt, Mapping) else {}
    state = ckpt.get("state_dict", {}) if isinstance(ckpt, Mapping) else {}
    return meta, state


def _build(meta: Mapping[str, str], state: Mapping[str, torch.Tensor], source: str) -> MultiScaleVQVAE | VAR | RasterAR:
    """The model that ``meta`` describes (the metadata of :func:`model_metadata`), with weights from ``state``
    (tokenizer weights under ``vae.``, transformer weights under ``var.`` or ``ar.``), in eval mode on the CPU."""
    kind = meta.get("kind")
    if meta.get("format") != FORMAT or kind not in ("tokenizer", *TRANSFORMER_KINDS):
        raise ValueError(
            f"{source} is not a varlib model file (expected metadata format={FORMAT!r} and kind 'tokenizer', "
            f"{', '.join(repr(k) for k in TRANSFORMER_KINDS)}); "
            "official checkpoints load with load_official_vqvae / load_official_var"
        )
    vae = build_tokenizer(json.loads(meta["vae_config"]), _split(state, "vae.")).eval()
    if kind == "tokenizer":
        return vae
    name = TRANSFORMER_KINDS[kind][1]
    var = build_var(json.loads(meta[f"{name}_config"]), vae.requires_grad_(False), _split(state, f"{name}."), kind)
    if "sampling" in meta:  # files written before sampling settings existed keep the model's defaults
        var.sampling = SamplingConfig.from_dict(json.loads(meta["sampling"]))
    return var.eval()


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> MultiScaleVQVAE | VAR | RasterAR:
    """Opens a varlib model file (safetensors) or a varlib Lightning checkpoint, in eval mode.

    Returns a :class:`MultiScaleVQVAE` for a tokenizer, or a :class:`VAR` or :class:`RasterAR` (its tokenizer at
    ``.vae``) ready for ``generate``. Raises ValueError for files that varlib did not write.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model file at {path}")
    meta, state = _read(path)
    return _build(meta, state, path).to(device)


def save_pretrained(model: MultiScaleVQVAE | VAR | RasterAR, directory: str | os.PathLike) -> Path:
    """Writes ``directory/model.safetensors`` (as :func:`save_var` / :func:`save_tokenizer`) and
    ``directory/config.json`` (format, kind, the constructor configs and, for a transformer, its sampling settings).

    The folder is what :func:`from_pretrained` reads and what a Hugging Face Hub model repo holds. Returns the
    folder.
    """
    if not isinstance(model, (VAR, RasterAR, MultiScaleVQVAE)):
        raise ValueError(f"expected a VAR, a RasterAR or a MultiScaleVQVAE, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(model, (VAR, RasterAR)):
        save_var(model, directory / WEIGHTS_NAME)
        meta = model_metadata(model.vae, model)
    else:
        save_tokenizer(model, directory / WEIGHTS_NAME)
        meta = model_metadata(model)
    config = {k: json.loads(v) if k in JSON_ENTRIES else v for k, v in meta.items()}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def from_pretrained(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                    revision: str | None = None) -> MultiScaleVQVAE | VAR | RasterAR:
    """A model from a :func:`save_pretrained` folder or a Hugging Face Hub repo id (``"user/model"``).

    A local folder works offline. ``config.json`` decides the architecture and the sampling settings (edit
    it to change the recommended ones); ``model.safetensors`` gives the weights. A repo id is downloaded with
    ``huggingface_hub`` (``pip install 'varlib[hub]'``) at ``revision`` and needs the network (or the Hub
    cache); both absences raise an error that says so.
    """
    folder = Path(name_or_path)
    if not folder.is_dir():
        folder = _download(os.fspath(name_or_path), revision)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a varlib pretrained folder: expected {path.name} "
                                    f"(written by varlib.save_pretrained), got nothing there")
    config = json.loads(config_path.read_text())
    meta = {k: json.dumps(v) if k in JSON_ENTRIES else v for k, v in config.items()}
    _, state = _read(os.fspath(weights_path))
    return _build(meta, state, os.fspath(folder)).to(device)


def _download(repo_id: str, revision: str | None) -> Path:
    """The local snapshot of a Hub repo's config.json and model.safetensors."""
    if os.path.isfile(repo_id):
        raise ValueError(f"{repo_id} is a file; from_pretrained takes a folder or a Hub repo id (varlib.load opens files)")
    if not HUB_REPO_ID.fullmatch(repo_id):
        raise FileNotFoundError(f"no pretrained folder at {repo_id} (and it is not a Hub repo id 'user/model')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"{repo_id!r} is not a local folder; downloading it as a Hub repo id needs the "
                          "huggingface_hub package (pip install 'varlib[hub]') and network access") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    except Exception as error:  # huggingface_hub raises many types (offline, not found, gated, HTTP errors)
        raise OSError(f"could not download {repo_id!r} from the Hugging Face Hub ({type(error).__name__}: {error}); "
                      "a repo id needs network access or a filled Hub cache, a local folder works offline") from error
