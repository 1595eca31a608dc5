"""Swappable parts of a training module given as config nodes (``model.optimizer``, ``model.discriminator``), in
the lightning-hydra-template style: ``{_target_: torch.optim.AdamW, betas: [0.9, 0.95]}``.

The module receives the node as plain data and builds the part itself, adding the arguments it computes (the
parameter groups and learning rate, the tokenizer's channels). Its hyperparameters, and so its checkpoints, then
hold only dicts, lists, strings and numbers, which ``torch.load(weights_only=True)`` reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate


def component_factory(spec: Mapping[str, Any] | None, section: str, default_target: str | None = None) -> partial:
    """The factory of config node ``spec`` (``section`` names it in errors): its ``_target_`` with the node's
    keyword arguments bound (lists as tuples). A node without ``_target_`` (or None) takes ``default_target``.

    Raises ValueError naming the section when the node is not a mapping or its target cannot be imported."""
    if spec is not None and not isinstance(spec, Mapping):
        raise ValueError(f"{section} must be a config node with a _target_, got {spec!r}")
    spec = {"_target_": default_target, **(spec or {})}
    if spec["_target_"] is None:
        raise ValueError(f"{section} needs a _target_ (a class or function to build), got {spec}")
    try:
        factory = instantiate(spec, _partial_=True, _convert_="all")
    except InstantiationException as error:
        raise ValueError(f"{section}._target_={spec['_target_']!r} cannot be built: expected an importable class or "
                         f"function{f' such as {default_target}' if default_target else ''} ({error})") from error
    # lists as tuples, the type torch's signatures name (betas); the config holds lists
    return partial(factory.func, *factory.args,
                   **{k: tuple(v) if isinstance(v, list) else v for k, v in factory.keywords.items()})


def build_component(factory: partial, section: str, *args: Any, **kwargs: Any) -> Any:
    """``factory(*args, **kwargs)``, with a ValueError naming ``section`` when the node's arguments do not fit."""
    try:
        return factory(*args, **kwargs)
    except (TypeError, ValueError) as error:
        target = f"{factory.func.__module__}.{factory.func.__qualname__}"
        raise ValueError(f"bad {section} config for {target} with {factory.keywords}: {error}") from error


def construct(cls: type, kwargs: Mapping[str, Any], section: str) -> Any:
    """``cls(**kwargs)`` of a node without ``_target_`` (``model.vae``, ``model.perceptual``), with a ValueError
    naming ``section`` for an unknown or missing keyword."""
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ValueError(f"bad {section} config {dict(kwargs)}: {error}") from error
