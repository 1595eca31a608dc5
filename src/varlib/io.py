"""Model files: varlib's own (safetensors weights plus the constructor config in the file's metadata) and
:func:`load`, the one loader of every model file varlib reads.

A tokenizer file holds ``MultiScaleVQVAE`` weights; a transformer file holds the transformer (a VAR under ``var.``,
the raster-AR baseline under ``ar.``) and its tokenizer under ``vae.``, so one file is enough to sample, and the
transformer's recommended sampling settings (``.sampling``). :func:`load` also opens Lightning checkpoints written
by varlib's training modules and the official FoundationVision checkpoints (torch files are read with
``torch.load(weights_only=True)``).

:func:`save_pretrained` / :func:`from_pretrained` share models as the Hugging Face Hub does: a folder with
``model.safetensors`` (the file above) and ``config.json`` (the same configs, readable); ``from_pretrained``
also takes a Hub repo id, downloaded with the optional ``huggingface_hub`` package.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import asdict
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader

from varlib.models.raster_ar import RasterAR
from varlib.models.sampling import SamplingConfig
from varlib.models.transformer import VAR
from varlib.models.vqvae import MultiScaleVQVAE
from varlib.official import load_official_var, load_official_vqvae, load_strict

FORMAT = "varlib/1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# metadata entries that hold JSON objects (safetensors metadata values are strings)
JSON_ENTRIES = ("vae_config", "var_config", "ar_config", "sampling")
#: kind -> (transformer class, the prefix of its weights and config in files and Lightning checkpoints)
TRANSFORMER_KINDS = {"var": (VAR, "var"), "raster_ar": (RasterAR, "ar")}
#: what marks a distributed (torch.distributed.checkpoint) folder, and Lightning's metadata file in it
DISTRIBUTED_CHECKPOINT_INDEX = ".metadata"
LIGHTNING_META_NAME = "meta.pt"
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
#: the prefix of the EMA's entries in a training checkpoint's state dict (the convention: see varlib.training.ema)
EMA_PREFIX = "ema."


def pop_ema_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Removes the EMA entries from a checkpoint's state dict (they are not the model's) and returns them."""
    return {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(EMA_PREFIX)]}


def ema_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The EMA's parameters and buffers in a checkpoint's state dict, by name in the averaged network (empty
    when the run kept no EMA)."""
    return {k.split(".", 2)[2]: v for k, v in state_dict.items() if k.startswith(EMA_PREFIX)}


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


def _preview(names, limit: int = 6) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _read(path: str) -> tuple[dict[str, str], Mapping]:
    """(varlib metadata, content) of a ``.safetensors`` file (content: its tensors) or a torch file (content: what
    it holds, loaded with ``weights_only=True``), on the CPU. Raises ValueError for pickled objects and for
    unreadable files."""
    try:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt", device="cpu") as f:
                meta, state = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
            if meta.get("kind") == "tokenizer":
                state = {"vae." + k: v for k, v in state.items()}
            return meta, state
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # torch's own message advises weights_only=False: varlib never does
        found = str(error).strip().splitlines()[-1]
        raise ValueError(
            f"{path} holds pickled Python objects, not only tensors and plain containers ({found}); varlib opens "
            "files with torch.load(weights_only=True) and never runs pickled code: re-save the weights as "
            "safetensors or as a plain state dict (torch.save(model.state_dict(), path))"
        ) from None
    except Exception as error:  # safetensors and torch raise several types for damaged files
        raise ValueError(f"{path}: expected a torch checkpoint or .safetensors file, got an unreadable file "
                         f"({type(error).__name__}: {error})") from error
    if not isinstance(content, Mapping):
        raise ValueError(f"{path}: expected a state dict or checkpoint (a mapping), got a {type(content).__name__}")
    if "varlib" in content:  # a Lightning checkpoint of varlib's training modules
        return dict(content["varlib"]), content.get("state_dict", {})
    return {}, content


def _read_distributed_checkpoint(folder: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, state dict) of a distributed Lightning checkpoint folder (FSDP2): Lightning's ``meta.pt`` holds
    the metadata, the shards the ``state_dict`` entries, read whole (optimiser states are left on disk)."""
    meta_path = folder / LIGHTNING_META_NAME
    if not meta_path.is_file():
        raise ValueError(f"{folder} is a distributed checkpoint without Lightning's {LIGHTNING_META_NAME}: expected "
                         "a checkpoint of varlib's training modules (or its save was interrupted)")
    meta, _ = _read(os.fspath(meta_path))
    reader = FileSystemReader(folder)
    entries = reader.read_metadata().state_dict_metadata
    state = {name.removeprefix("state_dict."): torch.empty(entry.size, dtype=entry.properties.dtype)
             for name, entry in entries.items() if name.startswith("state_dict.")}
    dcp.load({"state_dict": state}, storage_reader=reader, no_dist=True)
    return meta, state


def _build(meta: Mapping[str, str], state: Mapping[str, torch.Tensor], source: str,
           ema: bool = True) -> MultiScaleVQVAE | VAR | RasterAR:
    """The model that ``meta`` describes (the metadata of :func:`model_metadata`), with weights from ``state``
    (tokenizer weights under ``vae.``, transformer weights under ``var.`` or ``ar.``), in eval mode on the CPU.

    A checkpoint's EMA entries (``ema.*``, see :mod:`varlib.training.ema`) replace the online weights of the
    averaged network (the tokenizer in a tokenizer checkpoint, else the transformer), unless ``ema`` is False."""
    kind = meta.get("kind")
    if kind not in ("tokenizer", *TRANSFORMER_KINDS):
        raise ValueError(f"{source}: expected a varlib model kind among 'tokenizer', "
                         f"{', '.join(repr(k) for k in TRANSFORMER_KINDS)}, got {kind!r}")
    averaged = "vae." if kind == "tokenizer" else TRANSFORMER_KINDS[kind][1] + "."
    # the EMA also copies non-persistent buffers, which are not in the state dict
    weights = {averaged + name: v for name, v in ema_weights(state).items() if averaged + name in state} if ema else {}
    state = {**{k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}, **weights}
    vae = build_tokenizer(json.loads(meta["vae_config"]), _split(state, "vae.")).eval()
    if kind == "tokenizer":
        return vae
    name = TRANSFORMER_KINDS[kind][1]
    var = build_var(json.loads(meta[f"{name}_config"]), vae.requires_grad_(False), _split(state, f"{name}."), kind)
    if "sampling" in meta:  # files written before sampling settings existed keep the model's defaults
        var.sampling = SamplingConfig.from_dict(json.loads(meta["sampling"]))
    return var.eval()


def _build_official(state: Mapping, source: str, vae: MultiScaleVQVAE | str | os.PathLike | None,
                    patch_nums: Sequence[int] | None) -> MultiScaleVQVAE | VAR:
    """An official tokenizer or VAR from its state dict; anything else raises ValueError saying what it holds."""
    if "quantize.embedding.weight" in state:
        return load_official_vqvae(state, **({} if patch_nums is None else {"patch_nums": tuple(patch_nums)}))
    if "class_emb.weight" in state:
        if vae is None:
            raise ValueError(f"{source} is not a varlib model file but an official VAR transformer state dict, "
                             "which needs its tokenizer: varlib.load(path, vae=<tokenizer or its file>)")
        tokenizer = vae if isinstance(vae, MultiScaleVQVAE) else load(vae, patch_nums=patch_nums)
        if not isinstance(tokenizer, MultiScaleVQVAE):
            raise ValueError(f"vae={vae}: expected a tokenizer, got a {type(tokenizer).__name__}")
        return load_official_var(state, tokenizer)
    tensors = all(isinstance(v, torch.Tensor) for v in state.values())
    found = (f"a state dict of {len(state)} tensors without the official tokenizer's 'quantize.embedding.weight' or "
             "transformer's 'class_emb.weight'" if tensors else "a mapping that is not a plain state dict")
    raise ValueError(
        f"{source} is not a varlib model file (safetensors metadata or checkpoint entry 'varlib' with format "
        f"{FORMAT!r}) nor an official VQVAE/VAR checkpoint: it holds {found} (keys {_preview(map(str, state))})"
    )


def load(path: str | os.PathLike, device: str | torch.device = "cpu", *,
         vae: MultiScaleVQVAE | str | os.PathLike | None = None,
         patch_nums: Sequence[int] | None = None, ema: bool = True) -> MultiScaleVQVAE | VAR | RasterAR:
    """Opens any model file varlib reads, in eval mode on ``device``; the one loader every tool calls.

    ``path`` is a varlib ``.safetensors`` file (:func:`save_var`, :func:`save_tokenizer`, a training module's
    ``export``), a :func:`save_pretrained` folder, a Lightning checkpoint of varlib's training modules (a file,
    or the folder of a distributed FSDP2 checkpoint, gathered whole in this one process), or an
    official FoundationVision checkpoint (``.pth`` or ``.safetensors``): the tokenizer ``vae_ch160v4096z32.pth``,
    or a transformer such as ``var_d16.pth`` given its tokenizer as ``vae`` (a MultiScaleVQVAE or a file).
    ``patch_nums`` sets an official tokenizer's schedule (its file does not record one: 10 scales are taken
    as the 256px schedule); varlib files keep the schedule they record. A checkpoint of a run that kept an EMA
    gives its averages, the weights ``export`` writes; ``ema=False`` gives the online weights instead.

    Returns a :class:`MultiScaleVQVAE` for a tokenizer, or a :class:`VAR` or :class:`RasterAR` (its tokenizer at
    ``.vae``) ready for ``generate``. Torch files are read with ``weights_only=True``; a file holding pickled
    objects, or anything else, raises ValueError saying what it holds.
    """
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, DISTRIBUTED_CHECKPOINT_INDEX)):
        meta, state = _read_distributed_checkpoint(Path(path))
    elif os.path.isdir(path):
        meta, state = _read_pretrained_folder(Path(path))
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"no model file or folder at {path}")
    else:
        meta, state = _read(path)
    if meta.get("format") == FORMAT:
        return _build(meta, state, path, ema).to(device)
    return _build_official(state, path, vae, patch_nums).to(device)


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
    return _build(*_read_pretrained_folder(folder), os.fspath(folder)).to(device)


def _read_pretrained_folder(folder: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, state dict) of a :func:`save_pretrained` folder: ``config.json`` gives the metadata."""
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a varlib pretrained folder: expected {path.name} "
                                    f"(written by varlib.save_pretrained), got nothing there")
    config = json.loads(config_path.read_text())
    meta = {k: json.dumps(v) if k in JSON_ENTRIES else v for k, v in config.items()}
    _, state = _read(os.fspath(weights_path))
    return meta, state


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
