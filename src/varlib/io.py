"""varlib's own model files: safetensors weights plus the constructor config in the file's metadata.

A tokenizer file holds ``MultiScaleVQVAE`` weights; a VAR file holds the transformer under ``var.`` and its
tokenizer under ``vae.``, so one file is enough to sample. :func:`load` also opens Lightning checkpoints
written by varlib's training modules (read with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from varlib.models.transformer import VAR
from varlib.models.vqvae import MultiScaleVQVAE
from varlib.official import load_strict

FORMAT = "varlib/1"


def _plain_config(config: Mapping) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def _tensors(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().cpu().contiguous() for k, v in state.items()}


def model_metadata(vae: MultiScaleVQVAE, var: VAR | None = None) -> dict[str, str]:
    """The metadata that makes a file loadable by :func:`load`. Lightning modules store it in their
    checkpoints under ``checkpoint["varlib"]`` (with weights under ``vae.`` and ``var.``)."""
    meta = {"format": FORMAT, "kind": "tokenizer" if var is None else "var",
            "vae_config": json.dumps(_plain_config(vae.config))}
    if var is not None:
        meta["var_config"] = json.dumps(_plain_config(var.config))
    return meta


def save_tokenizer(vae: MultiScaleVQVAE, path: str | os.PathLike) -> None:
    """Writes a tokenizer to a ``.safetensors`` file that :func:`load` turns back into a MultiScaleVQVAE."""
    save_file(_tensors("", vae.state_dict()), os.fspath(path), metadata=model_metadata(vae))


def save_var(var: VAR, path: str | os.PathLike) -> None:
    """Writes a VAR transformer together with its tokenizer to one ``.safetensors`` file."""
    state = {**_tensors("vae.", var.vae.state_dict()), **_tensors("var.", var.state_dict())}
    save_file(state, os.fspath(path), metadata=model_metadata(var.vae, var))


def build_tokenizer(config: Mapping, state_dict: Mapping[str, torch.Tensor] | None = None) -> MultiScaleVQVAE:
    vae = MultiScaleVQVAE(**config)
    if state_dict is not None:
        load_strict(vae, state_dict, "MultiScaleVQVAE")
    return vae


def build_var(config: Mapping, vae: MultiScaleVQVAE, state_dict: Mapping[str, torch.Tensor] | None = None) -> VAR:
    var = VAR(vae, **config)
    if state_dict is not None:
        load_strict(var, state_dict, "VAR")
    return var


def _split(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> MultiScaleVQVAE | VAR:
    """Opens a varlib model file (safetensors) or a varlib Lightning checkpoint, in eval mode.

    Returns a :class:`MultiScaleVQVAE` for a tokenizer, or a :class:`VAR` (its tokenizer at ``.vae``) ready
    for ``generate``. Raises ValueError for files that varlib did not write.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model file at {path}")
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        meta = ckpt.get("varlib", {}) if isinstance(ckpt, Mapping) else {}
        state = ckpt.get("state_dict", {}) if isinstance(ckpt, Mapping) else {}
    if meta.get("format") != FORMAT or meta.get("kind") not in ("tokenizer", "var"):
        raise ValueError(
            f"{path} is not a varlib model file (expected metadata format={FORMAT!r} and kind 'tokenizer' or 'var'); "
            "official checkpoints load with load_official_vqvae / load_official_var"
        )
    vae_config = json.loads(meta["vae_config"])
    if meta["kind"] == "tokenizer":
        vae_state = state if path.endswith(".safetensors") else _split(state, "vae.")
        return build_tokenizer(vae_config, vae_state).to(device).eval()
    vae = build_tokenizer(vae_config, _split(state, "vae.")).eval().requires_grad_(False)
    var = build_var(json.loads(meta["var_config"]), vae, _split(state, "var."))
    return var.to(device).eval()
