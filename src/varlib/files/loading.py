""":func:`load`, the one loader of every model file varlib reads, and the EMA convention of training checkpoints.

:func:`load` opens varlib's own files and ``save_pretrained`` folders (the format of :mod:`varlib.files.format`:
safetensors weights plus the constructor configs), Lightning checkpoints written by varlib's training modules
(files, or the folders of distributed FSDP2 checkpoints) and the official FoundationVision checkpoints (through
:mod:`varlib.files.official`). Torch files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from varlib.files.format import (FORMAT, HUB_FILE, HUB_REPO_ID, build_model, from_pretrained, hub_file, model_class,
                                 official_tokenizer_name, read_pretrained_folder, read_safetensors,
                                 unreadable_file_error)
from varlib.files.official import load_official_var, load_official_vqvae
from varlib.models.raster_ar import RasterAR
from varlib.models.transfer import lora_scaling, merge_lora_state
from varlib.models.transformer import VAR
from varlib.models.vqvae import MultiScaleVQVAE

#: what marks a distributed (torch.distributed.checkpoint) folder, and Lightning's metadata file in it
DISTRIBUTED_CHECKPOINT_INDEX = ".metadata"
LIGHTNING_META_NAME = "meta.pt"
#: the checkpoint a re-run of varlib-train resumes from, in paths.checkpoint_dir (a folder under FSDP2)
LAST_CHECKPOINT = "last.ckpt"
#: the prefix of the EMA's entries in a training checkpoint's state dict (the convention: see varlib.training.ema)
EMA_PREFIX = "ema."


def pop_ema_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Removes the EMA entries from a checkpoint's state dict (they are not the model's) and returns them."""
    return {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(EMA_PREFIX)]}


def ema_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The EMA's parameters and buffers in a checkpoint's state dict, by name in the averaged network (empty
    when the run kept no EMA)."""
    return {k.split(".", 2)[2]: v for k, v in state_dict.items() if k.startswith(EMA_PREFIX)}


def _preview(names, limit: int = 6) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _read(path: str) -> tuple[dict[str, str], Mapping]:
    """(varlib metadata, content) of a ``.safetensors`` file (content: its tensors) or a torch file (content: what
    it holds, loaded with ``weights_only=True``), on the CPU. Raises ValueError for pickled objects and for
    unreadable files."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # torch's own message advises weights_only=False: varlib never does
        found = str(error).strip().splitlines()[-1]
        raise ValueError(
            f"{path} holds pickled Python objects, not only tensors and plain containers ({found}); varlib opens "
            "files with torch.load(weights_only=True) and never runs pickled code: re-save the weights as "
            "safetensors or as a plain state dict (torch.save(model.state_dict(), path))"
        ) from None
    except Exception as error:  # torch raises several types for damaged files
        raise unreadable_file_error(path, error) from error
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
    """The model of a varlib file or checkpoint (:func:`varlib.files.format.build_model`), in eval mode on the CPU.

    A checkpoint's EMA entries (``ema.*``, see :mod:`varlib.training.ema`) replace the online weights of the
    averaged network (the tokenizer in a tokenizer checkpoint, else the transformer), unless ``ema`` is False."""
    averaged = model_class(meta.get("kind"), source).FILE_PREFIX + "."
    # the EMA also copies non-persistent buffers, which are not in the state dict
    weights = {averaged + name: v for name, v in ema_weights(state).items() if averaged + name in state} if ema else {}
    state = {**{k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}, **weights}
    if "lora" in meta:  # a checkpoint of a LoRA run: the adapters are folded into the weights
        state = merge_lora_state(state, lora_scaling(json.loads(meta["lora"])))
    return build_model(meta, state, source)


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

    ``path`` is a varlib ``.safetensors`` file (:func:`~varlib.files.format.save_var`,
    :func:`~varlib.files.format.save_tokenizer`, a training module's ``export``), a
    :func:`~varlib.files.format.save_pretrained` folder, a Lightning checkpoint of varlib's training modules (a file,
    or the folder of a distributed FSDP2 checkpoint, gathered whole in this one process), or an
    official FoundationVision checkpoint (``.pth`` or ``.safetensors``): the tokenizer ``vae_ch160v4096z32.pth``,
    or a transformer such as ``var_d16.pth`` given its tokenizer as ``vae`` (a MultiScaleVQVAE or a file).
    ``patch_nums`` sets an official tokenizer's schedule (its file does not record one: 10 scales are taken
    as the 256px schedule); varlib files keep the schedule they record. A checkpoint of a run that kept an EMA
    gives its averages, the weights ``export`` writes; ``ema=False`` gives the online weights instead.

    A name that is not on disk is looked up on the Hugging Face Hub: ``owner/repo/file.pth`` names a file
    (``FoundationVision/var/var_d16.pth``, whose tokenizer ``FoundationVision/var/vae_ch160v4096z32.pth`` comes
    with it), found in ``$VARLIB_WEIGHTS/owner/repo/`` or downloaded (:func:`~varlib.files.format.hub_file`; offline,
    the error says what to fetch and where to put it); ``owner/repo`` names a ``save_pretrained`` repo
    (:func:`~varlib.files.format.from_pretrained`).

    Returns a :class:`MultiScaleVQVAE` for a tokenizer, or a :class:`VAR` or :class:`RasterAR` (its tokenizer at
    ``.vae``) ready for ``generate``. Torch files are read with ``weights_only=True``; a file holding pickled
    objects, or anything else, raises ValueError saying what it holds.
    """
    path = os.fspath(path)
    if not os.path.exists(path) and HUB_FILE.fullmatch(path):
        tokenizer = official_tokenizer_name(path)
        path = os.fspath(hub_file(path))
        if vae is None and tokenizer is not None:
            vae = hub_file(tokenizer)
    elif not os.path.exists(path) and HUB_REPO_ID.fullmatch(path):
        return from_pretrained(path, device)
    if os.path.isfile(os.path.join(path, DISTRIBUTED_CHECKPOINT_INDEX)):
        meta, state = _read_distributed_checkpoint(Path(path))
    elif os.path.isdir(path):
        meta, state = read_pretrained_folder(Path(path))
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"no model file or folder at {path}")
    else:
        meta, state = _read(path)
    if meta.get("format") == FORMAT:
        return _build(meta, state, path, ema).to(device)
    return _build_official(state, path, vae, patch_nums).to(device)


def load_tokenizer(path: str | os.PathLike, patch_nums: Sequence[int] | None = None) -> MultiScaleVQVAE:
    """The one tokenizer loader (training, tokenising): a frozen tokenizer (eval mode, no gradients, on the CPU)
    from any file :func:`load` opens that holds one: a tokenizer file or checkpoint, a VAR or raster-AR file (its
    tokenizer), or the official ``vae_ch160v4096z32.pth``.

    ``patch_nums`` builds an official tokenizer with that schedule (otherwise the 256px one is inferred); for any
    tokenizer it must have as many scales as the tokenizer's own schedule.
    """
    if not Path(path).expanduser().exists():
        raise FileNotFoundError(f"tokenizer: expected a model file or folder at {path}, got nothing there")
    model = load(Path(path).expanduser(), patch_nums=patch_nums)
    vae = model if isinstance(model, MultiScaleVQVAE) else model.vae
    if patch_nums is not None and len(patch_nums) != len(vae.patch_nums):
        raise ValueError(f"patch_nums must have as many scales as the tokenizer's {vae.patch_nums}, got {tuple(patch_nums)}")
    return vae.eval().requires_grad_(False)
