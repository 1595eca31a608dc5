"""Starting a training run from a pretrained model: ``model.init_from``, ``model.class_map``, ``model.trainable``
and ``model.lora`` of the VAR, raster-AR and tokenizer modules.

``init_from`` takes weights only (the optimiser, step and data position start fresh, unlike resuming) from any
file :func:`varlib.load` opens, and maps them with :func:`varlib.models.transfer.transfer_state` (another class
count, another patch schedule), logging what was loaded, resized, re-initialised and dropped. ``trainable`` keeps
the parameters whose names match its patterns trainable and freezes the rest; ``lora`` adds LoRA adapters with
``peft`` (the optional ``varlib[lora]``) and freezes the base weights except the class embedding. Exports merge the adapters
(:func:`varlib.models.transfer.merge_lora_state`), so exported files open without ``peft``.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from varlib.models.transfer import TransferReport, transfer_state

log = logging.getLogger(__name__)

#: parameters that train beside LoRA adapters: the class embedding (new classes start from the same mean row)
LORA_ALWAYS_TRAINED = ("class_emb.*",)
#: modules whose weight VAR reads directly (``F.linear(x, mat_qkv.weight, q/v bias)``): an adapter there has no effect
DIRECT_WEIGHT_MODULES = ("mat_qkv",)


@dataclass(frozen=True)
class LoraSpec:
    """``model.lora``: rank ``r``, scaling ``alpha`` (the update is alpha / r * B @ A), ``dropout`` on the adapter
    input, and ``target_modules`` (module name suffixes, peft's matching: ``proj``, ``fc1``, ``fc2``,
    ``ada_lin.1``)."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("proj", "fc1", "fc2")

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1 or not self.target_modules:
            raise ValueError(f"model.lora: expected r >= 1, alpha > 0, dropout in [0, 1) and target_modules, got "
                             f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}, "
                             f"target_modules={self.target_modules}")
        direct = [t for t in self.target_modules if t.split(".")[-1] in DIRECT_WEIGHT_MODULES]
        if direct:
            raise ValueError(f"model.lora.target_modules {direct}: the attention reads mat_qkv.weight directly (with "
                             f"its q/v biases), so an adapter there would be ignored; use proj, fc1, fc2, ada_lin.1")

    @classmethod
    def from_config(cls, spec: Mapping[str, Any] | None) -> LoraSpec | None:
        if spec is None:
            return None
        try:
            spec = dict(spec)
            if "target_modules" in spec:
                spec["target_modules"] = tuple(spec["target_modules"])
            return cls(**spec)
        except TypeError as error:
            raise ValueError(f"bad model.lora config {dict(spec)}: {error} (keys: r, alpha, dropout, "
                             "target_modules)") from error

    def as_dict(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": list(self.target_modules)}


def pretrained_model(source: str, what: str, expected: type, vae: nn.Module | None = None,
                     patch_nums: Sequence[int] | None = None) -> nn.Module:
    """The model in ``source`` (anything :func:`varlib.load` opens; ``vae`` completes an official VAR file and
    ``patch_nums`` sets an official tokenizer file's schedule), which must be an ``expected``; a tokenizer asked
    for from a transformer file gets that file's tokenizer."""
    from varlib.files.loading import load  # the loader imports the training modules' conventions: imported when used

    model = load(source, vae=vae, patch_nums=patch_nums)
    if not isinstance(model, expected) and isinstance(getattr(model, "vae", None), expected):
        model = model.vae
    if not isinstance(model, expected):
        raise ValueError(f"model.init_from={source} holds a {type(model).__name__}; the {what} needs a "
                         f"{expected.__name__}")
    return model


def initialise_from(model: nn.Module, pretrained: nn.Module, source: str,
                    class_map: Mapping[int, int] | None = None) -> TransferReport:
    """Loads ``pretrained``'s weights into ``model`` (see :func:`varlib.models.transfer.transfer_state`; ``class_map``:
    new class index -> pretrained index) and logs what was loaded, resized, re-initialised and dropped."""
    state, report = transfer_state(
        model.state_dict(), pretrained.state_dict(), target_patch_nums=getattr(model, "patch_nums", None),
        source_patch_nums=getattr(pretrained, "patch_nums", None),
        class_map=class_map,
        what=type(model).__name__)
    model.load_state_dict(state)
    log.info("init_from %s: %s", source, report.summary())
    return report


def freeze_except(model: nn.Module, patterns: Sequence[str] | None) -> tuple[int, int]:
    """Keeps the parameters whose names match one of the fnmatch ``patterns`` (``class_emb.*``,
    ``blocks.*.ada_lin.*``) trainable and freezes the rest; None leaves everything as it is. Returns the
    (trainable, frozen) parameter counts and logs them; a pattern that matches nothing is an error."""
    if patterns is not None:
        names = [n for n, _ in model.named_parameters()]
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            raise ValueError(f"model.trainable patterns {unmatched} match no parameter of the "
                             f"{type(model).__name__} (names such as {names[:4]})")
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(any(fnmatch.fnmatchcase(name, p) for p in patterns))
    return log_trainable(model)


def log_trainable(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    log.info("%s: %d trainable parameters, %d frozen", type(model).__name__, trainable, frozen)
    return trainable, frozen


def add_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Adds LoRA adapters (peft) to the ``spec.target_modules`` linear layers of ``model``, in place; only the
    adapters stay trainable. Needs ``peft`` (``pip install 'varlib[lora]'``)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError("model.lora needs the peft package: pip install 'varlib[lora]'") from None
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.target_modules), bias="none")
    try:
        inject_adapter_in_model(config, model)
    except ValueError as error:  # peft: target modules not found
        raise ValueError(f"model.lora.target_modules {list(spec.target_modules)} do not fit the "
                         f"{type(model).__name__}: {error}") from error
    return model
