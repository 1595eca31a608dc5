"""What makes a varlib model class buildable from its config and reachable as files: :class:`PretrainedMixin`
(``FILE_KIND``, ``FILE_PREFIX``, ``from_config``, and ``save_pretrained`` / ``push_to_hub`` / ``from_pretrained``,
thin delegations to :mod:`varlib.files.format`, which the import-linter contract allows as the one import from
the models up to the files) and :func:`load_strict`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Mapping

import torch
import torch.nn as nn


class PretrainedMixin:
    """Adds ``model.save_pretrained(dir)`` and ``Model.from_pretrained(dir_or_repo_id)`` to a varlib model.

    ``FILE_KIND`` ('tokenizer', 'var' or 'raster_ar') names the kind of file a subclass is saved as
    (:data:`varlib.files.format.MODEL_CLASSES` maps it back to the class); ``FILE_PREFIX`` names its weights
    (``var.``) and config (``var_config``) in files and checkpoints. It has a ``config`` dict (its constructor's
    arguments)."""

    FILE_KIND: ClassVar[str]
    FILE_PREFIX: ClassVar[str]

    @classmethod
    def from_config(cls, config: Mapping, state_dict: Mapping[str, torch.Tensor] | None = None, **parts):
        """The model with constructor arguments ``config`` (its ``.config``) and ``parts`` (the built
        sub-models it takes, a transformer's ``vae``), with every weight of ``state_dict`` when given."""
        model = cls(**parts, **config)
        if state_dict is not None:
            load_strict(model, state_dict, cls.__name__)
        return model

    def save_pretrained(self, directory: str | os.PathLike, training: Mapping | None = None,
                        license: str = "mit") -> Path:
        """Writes ``directory/model.safetensors``, ``config.json`` and the model card ``README.md`` (see
        :func:`varlib.files.format.save_pretrained`)."""
        from varlib.files.format import save_pretrained  # the file format sits above the models it writes

        return save_pretrained(self, directory, training, license)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Uploads the :meth:`save_pretrained` folder to the Hub model repo ``repo_id`` (see
        :func:`varlib.files.format.push_to_hub`)."""
        from varlib.files.format import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                        revision: str | None = None):
        """The model saved in a local folder or a Hub repo id, in eval mode (see
        :func:`varlib.files.format.from_pretrained`).

        Raises ValueError when the folder holds another kind of model (a tokenizer asked for as a VAR)."""
        from varlib.files.format import from_pretrained

        model = from_pretrained(name_or_path, device, revision)
        if not isinstance(model, cls):
            raise ValueError(f"{name_or_path} holds a {type(model).__name__}, expected a {cls.__name__}")
        return model


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    """Loads every key (buffers included) or raises ValueError naming the missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mis_shaped = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(state_dict[k].shape)}"
                  for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or mis_shaped:
        def show(items):
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "") or "none"
        raise ValueError(
            f"state dict does not fit {what}: missing keys [{show(missing)}]; unexpected keys [{show(unexpected)}]; "
            f"shape mismatches [{show(mis_shaped)}]"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()}, strict=True)
    return model
