"""Starting a training run from a pretrained model: ``model.init_from``, ``model.class_map``, ``model.trainable``
and ``model.lora`` of the VAR, raster-AR and tokenizer modules; :func:`start_transformer` is what the transformer
modules call to build the network they train (tokenizer, architecture, pretrained weights, LoRA, freezing).

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
from varlib.models.transformer import AdaLNTransformer, VARConfig
from varlib.models.vqvae import MultiScaleVQVAE
from varlib.training.components import construct

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


def with_pretrained_values(given: Mapping[str, Any], pretrained: Mapping[str, Any],
                           keep: Sequence[str] = ()) -> dict[str, Any]:
    """A model config node with its entries left out or set to null taken from the pretrained model's config,
    except the ``keep`` keys (left as given)."""
    given = dict(given)
    return {**given, **{k: v for k, v in pretrained.items() if k not in keep and given.get(k) is None}}


#: what a fine-tuned transformer does not take from the pretrained one: the schedule (null: the tokenizer's) and
#: the initialisation of the weights it does not load
NOT_INHERITED = ("patch_nums", "init_adaln", "init_adaln_gamma", "init_head", "init_std")


def start_transformer(transformer_class: type[AdaLNTransformer], var: Mapping[str, Any], what: str, *,
                      tokenizer_path: str | None = None, vae: MultiScaleVQVAE | None = None,
                      init_from: str | None = None, class_map: Mapping[int, int] | None = None,
                      class_names: Sequence[str] | None = None, trainable: Sequence[str] | None = None,
                      lora: Mapping[str, Any] | None = None,
                      **runtime) -> tuple[AdaLNTransformer, LoraSpec | None]:
    """The transformer a training run of ``what`` (the module's name, for errors) starts from, and its LoRA spec.

    Args:
        transformer_class: VAR or RasterAR, built as ``transformer_class(vae, config, **runtime)``.
        var: ``model.var``, the :class:`~varlib.models.transformer.VARConfig` fields as plain data; with
            ``init_from``, the entries left out or null take the pretrained model's values (not ``patch_nums``: null
            is the tokenizer's schedule).
        tokenizer_path, vae: the frozen tokenizer, a file (:func:`varlib.files.loading.load_tokenizer`) or a model.
        init_from, class_map, class_names, trainable, lora: the pretrained weights (mapped by ``class_map``, new
            index -> pretrained index; see :func:`initialise_from`), the class names (None: the pretrained names of
            the mapped classes), the trained parameters and the LoRA adapters (:class:`LoraSpec`; the base weights
            frozen except the class embedding).
    """
    from varlib.files.loading import load_tokenizer  # as pretrained_model: imported when used

    if (tokenizer_path is None) == (vae is None):
        raise ValueError("give exactly one of tokenizer_path or vae")
    vae = load_tokenizer(tokenizer_path) if vae is None else vae.eval().requires_grad_(False)
    pretrained = None
    if init_from is not None:
        pretrained = pretrained_model(init_from, what, transformer_class, vae=vae, patch_nums=vae.patch_nums)
        var = with_pretrained_values(var, pretrained.config, keep=NOT_INHERITED)
    model = transformer_class(vae, VARConfig.from_dict(var, "model.var"), **runtime)
    model.class_names = _take_pretrained(model, pretrained, init_from, class_map, class_names)
    spec = LoraSpec.from_config(lora)
    if spec is not None:
        add_lora(model, spec)
        # the class rows are the only per-class weights: new classes start equal and must train
        trainable = [*(trainable or []), *LORA_ALWAYS_TRAINED, "*.lora_*"]
    freeze_except(model, trainable)
    return model, spec


def _take_pretrained(model: AdaLNTransformer, pretrained: AdaLNTransformer | None, init_from: str | None,
                     class_map: Mapping[int, int] | None, class_names: Sequence[str] | None) -> list[str] | None:
    """Loads ``pretrained``'s weights into ``model`` (mapped by ``class_map``) and returns the model's class names:
    ``class_names``, else the pretrained names of the mapped classes when every class has one."""
    class_map = None if class_map is None else {int(k): int(v) for k, v in class_map.items()}
    if class_names is not None and len(class_names) != model.num_classes:
        raise ValueError(f"model.class_names has {len(class_names)} names, expected num_classes={model.num_classes}")
    if pretrained is None:
        if class_map is not None:
            raise ValueError("model.class_map maps new classes to pretrained ones: it needs model.init_from")
        return None if class_names is None else list(class_names)
    initialise_from(model, pretrained, init_from, class_map)
    if class_names is None and pretrained.class_names is not None and class_map is not None:
        carried = [pretrained.class_names[class_map[i]] if i in class_map else None for i in range(model.num_classes)]
        class_names = None if None in carried else carried
    return None if class_names is None else list(class_names)


def start_tokenizer(vae: Mapping[str, Any] | MultiScaleVQVAE, what: str, init_from: str | None = None,
                    trainable: Sequence[str] | None = None) -> MultiScaleVQVAE:
    """The tokenizer a training run of ``what`` starts from: ``vae`` built (``model.vae``, the MultiScaleVQVAE
    arguments; with ``init_from``, entries left out or null take the pretrained tokenizer's values) or as given,
    with the pretrained weights of ``init_from`` and only the ``trainable`` parameters trained."""
    pretrained = None
    if init_from is not None:
        pretrained = pretrained_model(init_from, what, MultiScaleVQVAE,
                                      patch_nums=None if isinstance(vae, MultiScaleVQVAE) else vae.get("patch_nums"))
        if not isinstance(vae, MultiScaleVQVAE):
            vae = with_pretrained_values(vae, pretrained.config)
    if not isinstance(vae, MultiScaleVQVAE):
        vae = construct(MultiScaleVQVAE, vae, "model.vae")
    if pretrained is not None:
        initialise_from(vae, pretrained, init_from)
    freeze_except(vae, trainable)
    return vae
