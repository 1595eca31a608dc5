"""Exponential moving average (EMA) of a model's weights, for evaluating and saving a smoothed model.

The one checkpoint convention of varlib's training modules: a Lightning checkpoint's ``state_dict`` holds the
online (trained) weights, which Lightning resumes, and the EMA's averages join it as ``ema.params.<name>`` and
``ema.buffers.<name>`` (names relative to the averaged network: the tokenizer, or the transformer), so that a
distributed (FSDP2) checkpoint stores each rank's shard of them; the counters go in ``checkpoint["ema"]``.
``export`` writes the averages, and ``varlib.load`` of a checkpoint gives them too (``ema=False``: the online
weights).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from varlib.files.loading import EMA_PREFIX


class ModelEMA:
    """EMA of a module's parameters; its buffers (BatchNorm statistics, counters) are copied, not averaged.

    After each optimiser step call ``update(model)``: ``ema = d * ema + (1 - d) * param`` with ``d = decay``,
    or, with ``warmup``, ``d = min(decay, (1 + n) / (10 + n))`` where n counts the earlier updates, so that
    early averages are not dominated by the random initialisation. Averages are kept in at least float32 and
    follow the parameters' device.

    Pass the bare module everywhere: under DistributedDataParallel use ``ddp_model.module`` (the wrapper's
    ``module.`` name prefix is reported as a mismatch). All ranks hold the same weights after a step, so each
    rank updates its own EMA and no communication is needed. Built from a sharded (FSDP2) module, the averages
    are DTensors sharded like its parameters, so each rank averages its own shard.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow_params: dict[str, Tensor] = {
            name: p.detach().clone().to(torch.promote_types(p.dtype, torch.float32))
            for name, p in model.named_parameters()
        }
        self.shadow_buffers: dict[str, Tensor] = {name: b.detach().clone() for name, b in model.named_buffers()}

    def current_decay(self) -> float:
        """The decay the next ``update`` applies."""
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current parameters into the averages and copy its buffers."""
        params, buffers = self._named_tensors(model)
        new_weight = 1.0 - self.current_decay()
        for name, param in params.items():
            shadow = self.shadow_params[name]
            if shadow.device != param.device:
                shadow = self.shadow_params[name] = shadow.to(param.device)
            shadow.lerp_(param.to(shadow.dtype), new_weight)
        for name, buffer in buffers.items():
            self.shadow_buffers[name] = buffer.detach().clone()
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters and buffers with the EMA values."""
        params, buffers = self._named_tensors(model)
        for name, param in params.items():
            param.copy_(self.shadow_params[name])
        for name, buffer in buffers.items():
            buffer.copy_(self.shadow_buffers[name])

    @contextmanager
    def swap(self, model: nn.Module) -> Iterator[nn.Module]:
        """Context manager: the model holds the EMA weights inside the block, its own weights again after it
        (also on exceptions). Keeps one extra copy of the weights meanwhile."""
        params, buffers = self._named_tensors(model)
        tensors = params | buffers
        backup = {name: t.detach().clone() for name, t in tensors.items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, t in tensors.items():
                    t.copy_(backup[name])

    def state_dict(self) -> dict[str, Any]:
        """Plain dict of Python numbers and tensors, loadable with ``torch.load(weights_only=True)``."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "params": dict(self.shadow_params),
            "buffers": dict(self.shadow_buffers),
        }

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """The averages as checkpoint state-dict entries (the EMA's own tensors, not copies)."""
        return {f"{EMA_PREFIX}{key}.{name}": value
                for key, tensors in (("params", self.shadow_params), ("buffers", self.shadow_buffers))
                for name, value in tensors.items()}

    def checkpoint_counters(self) -> dict[str, Any]:
        """What ``checkpoint["ema"]`` holds: the settings and the update count."""
        return {k: v for k, v in self.state_dict().items() if k not in ("params", "buffers")}

    def load_checkpoint(self, counters: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> None:
        """Restores from ``checkpoint["ema"]`` and the entries of :meth:`checkpoint_tensors`."""
        self.load_state_dict({**counters, **{
            key: {k.removeprefix(f"{EMA_PREFIX}{key}."): v for k, v in tensors.items()
                  if k.startswith(f"{EMA_PREFIX}{key}.")}
            for key in ("params", "buffers")}})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()``; names and shapes must match this EMA's model."""
        for key, shadow in (("params", self.shadow_params), ("buffers", self.shadow_buffers)):
            if state[key].keys() != shadow.keys():
                raise ValueError(
                    f"EMA {key} do not match: missing {_preview(shadow.keys() - state[key].keys())}, "
                    f"unexpected {_preview(state[key].keys() - shadow.keys())}"
                )
            for name, value in state[key].items():
                if value.shape != shadow[name].shape:
                    raise ValueError(
                        f"EMA {key} {name!r}: expected shape {tuple(shadow[name].shape)}, got {tuple(value.shape)}"
                    )
        for key, shadow in (("params", self.shadow_params), ("buffers", self.shadow_buffers)):
            for name, value in state[key].items():
                shadow[name] = value.to(device=shadow[name].device, dtype=shadow[name].dtype, copy=True)
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])

    def _named_tensors(self, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        if params.keys() != self.shadow_params.keys() or buffers.keys() != self.shadow_buffers.keys():
            expected = self.shadow_params.keys() | self.shadow_buffers.keys()
            got = params.keys() | buffers.keys()
            raise ValueError(
                f"model does not match the one this EMA tracks: missing {_preview(expected - got)}, "
                f"unexpected {_preview(got - expected)}"
            )
        return params, buffers


def _preview(names: set[str], limit: int = 5) -> str:
    """The first few names, sorted, and how many there are in all."""
    shown = sorted(names)[:limit]
    return f"{len(names)} names {shown}" + (" ..." if len(names) > limit else "")
