"""``save_pretrained`` / ``from_pretrained`` on the models, in the Hugging Face Hub convention (the official
code uses ``PyTorchModelHubMixin``). The file format lives in :mod:`varlib.io`."""

from __future__ import annotations

import os
from pathlib import Path

import torch


class PretrainedMixin:
    """Adds ``model.save_pretrained(dir)`` and ``Model.from_pretrained(dir_or_repo_id)`` to a varlib model."""

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Writes ``directory/model.safetensors`` and ``directory/config.json`` (see :func:`varlib.io.save_pretrained`)."""
        from varlib.io import save_pretrained  # varlib.io builds the models, so it imports this module's users

        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                        revision: str | None = None):
        """The model saved in a local folder or a Hub repo id, in eval mode (see :func:`varlib.io.from_pretrained`).

        Raises ValueError when the folder holds another kind of model (a tokenizer asked for as a VAR)."""
        from varlib.io import from_pretrained

        model = from_pretrained(name_or_path, device, revision)
        if not isinstance(model, cls):
            raise ValueError(f"{name_or_path} holds a {type(model).__name__}, expected a {cls.__name__}")
        return model
