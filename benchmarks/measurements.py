"""Timing, memory and FLOP accounting shared by the speed benchmark; independent of which implementation runs.

An implementation under test is a :class:`Contender`: the callables each measurement needs (sample a batch,
the teacher-forced forward, encode, decode). varlib and the official code each supply one, so both go
through exactly the same timing loop.

MFU (model FLOPs utilisation) of a training step::

    MFU = tokens_per_s * flops_per_token / peak_flops

with ``flops_per_token`` the model's training FLOPs per token (``VAR.flops_per_token``, the count of
:mod:`varlib.models.flops`) and ``peak_flops`` the device's dense bf16 peak.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from tqdm import tqdm


#: Dense bf16 peak TFLOP/s by a substring of ``torch.cuda.get_device_name()``; the first match wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


@dataclass
class RunSettings:
    """Where and how the measurements run: device, autocast dtype (None: fp32), timed and warm-up calls."""

    device: torch.device
    dtype: torch.dtype | None
    steps: int
    warmup: int

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


@dataclass
class Contender:
    """One implementation under test.

    transformer: the module whose trainable parameters the training step updates.
    train_forward: (labels_B, x_BLCv (B,L-1,Cvae)) -> logits (B,L,V).
    sample: labels_B -> images (B,3,H,W), the full sampler including the tokenizer's decoder.
    encode: images (B,3,H,W) in [-1,1] -> K LongTensors (B,pn_k^2). decode: the reverse, -> (B,3,H,W).
    """

    name: str
    transformer: nn.Module
    train_forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    sample: Callable[[torch.Tensor], torch.Tensor]
    encode: Callable[[torch.Tensor], list[torch.Tensor]]
    decode: Callable[[Sequence[torch.Tensor]], torch.Tensor]


# -- timing and memory --------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(fn: Callable[[], object], run: RunSettings, calls: int | None = None) -> None:
    """Calls ``fn`` untimed ``calls`` times (default ``run.warmup``), then waits for the device."""
    for _ in range(run.warmup if calls is None else calls):
        fn()
    synchronize(run.device)


def time_interleaved(fns: Sequence[Callable[[], object]], run: RunSettings, desc: str) -> list[float]:
    """The median seconds of each of ``fns`` over ``run.steps`` timed rounds (no warm-up here).

    Each round calls every function once, in turn, so implementations compared with each other share
    the same machine conditions (other processes' load drifts slowly compared with a round).
    """
    seconds: list[list[float]] = [[] for _ in fns]
    for _ in tqdm(range(run.steps), desc=desc, leave=False, disable=None):
        for fn, samples in zip(fns, seconds):
            start = time.perf_counter()
            fn()
            synchronize(run.device)
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in seconds]


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the CPU tensor storages that ops create while it is active, and their peak.

    A storage is counted once, when an op returns it and it is none of the op's inputs' (views and in-place
    results are not new memory), and uncounted when it is freed (storages keep their Python object alive
    while they live, so a weak-reference finaliser marks the free)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self.live and key not in inputs:
                self.live[key] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, key)
        return out


class PeakMemory:
    """Measures how far tensor memory rose above its level at entry while the ``with`` block ran.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocated bytes at entry. CPU: the peak of the bytes
    of the tensors created inside the block and still alive, counted op by op. Both count tensors, not the
    allocator's reserve: on CPU the process RSS would also count the freed heap that glibc keeps, whose size
    depends on the order of allocations rather than on the model. ``increase_bytes`` is set on exit.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.increase_bytes: int | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._counter = _LiveTensorBytes()
            self._counter.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.increase_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._counter.__exit__(*exc)
            self.increase_bytes = self._counter.peak


# -- peak FLOP/s ---------------------------------------------------------------------------------


def default_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a known GPU, else None."""
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in device_name), None)


# -- the three measurements (each returns one dict of figures per contender, in order) -------------------


def measure_sampling(
    contenders: Sequence[Contender], labels_B: torch.Tensor, run: RunSettings
) -> list[dict[str, float]]:
    """Images/s and seconds per batch of the full sampler (transformer, KV cache, guidance, decoder)."""
    samplers = [lambda c=c: c.sample(labels_B) for c in contenders]
    for contender in contenders:
        contender.transformer.eval()
    with torch.no_grad(), run.autocast():
        for sample in samplers:
            warm_up(sample, run)
        medians = time_interleaved(samplers, run, "sampling")
    return [{"sampling_images_per_s": labels_B.shape[0] / s, "sampling_latency_s": s} for s in medians]


def training_step(contender: Contender, labels_B: torch.Tensor, x_BLCv: torch.Tensor, targets_BL: torch.Tensor,
                   run: RunSettings) -> Callable[[], None]:
    """forward + cross-entropy + backward + AdamW step (with its own optimizer) as a closure."""
    params = [p for p in contender.transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=run.device.type == "cuda")

    def step() -> None:
        with run.autocast():
            logits_BLV = contender.train_forward(labels_B, x_BLCv)
            loss = F.cross_entropy(logits_BLV.flatten(0, 1), targets_BL.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure_training(
    contenders: Sequence[Contender],
    labels_B: torch.Tensor,
    x_BLCv: torch.Tensor,
    targets_BL: torch.Tensor,
    run: RunSettings,
    flops_per_token: float,
    peak_tflops: float | None,
) -> list[dict[str, float | None]]:
    """Tokens/s, seconds, peak memory increase and MFU (None without ``peak_tflops``) of a training step.

    The memory figure is taken over each contender's warm-up, one contender at a time: at least two steps,
    so that it includes a backward that runs beside the gradients and AdamW state of an earlier step.
    """
    steps = []
    for contender in contenders:
        contender.transformer.train()
        steps.append(training_step(contender, labels_B, x_BLCv, targets_BL, run))
    memory = []
    for step in steps:
        with PeakMemory(run.device) as peak:
            warm_up(step, run, max(2, run.warmup))
        memory.append(peak.increase_bytes)
    medians = time_interleaved(steps, run, "training")
    del steps
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    figures = []
    for seconds, increase in zip(medians, memory):
        tokens_per_s = targets_BL.numel() / seconds
        figures.append({
            "train_tokens_per_s": tokens_per_s,
            "train_step_s": seconds,
            "train_peak_mem_mib": increase / 2**20 if increase is not None else None,
            "train_mfu": tokens_per_s * flops_per_token / (peak_tflops * 1e12) if peak_tflops else None,
        })
    return figures


def measure_tokenizer(
    contenders: Sequence[Contender], images_B3HW: torch.Tensor, run: RunSettings
) -> list[dict[str, float]]:
    """Images/s of encoding images to K token maps and of decoding the token maps back to images.

    Encoding always runs in fp32, as in training pipelines (the official quantizer's nearest-code search
    fails under bf16 autocast); decoding runs in ``run.dtype``, as inside the sampler.
    """
    B = images_B3HW.shape[0]
    with torch.no_grad():
        encoders = [lambda c=c: c.encode(images_B3HW) for c in contenders]
        for encode in encoders:
            warm_up(encode, run)
        encode_s = time_interleaved(encoders, run, "encode")
        token_maps = [c.encode(images_B3HW) for c in contenders]
        decoders = [lambda c=c, tokens=tokens: c.decode(tokens) for c, tokens in zip(contenders, token_maps)]
        with run.autocast():
            for decode in decoders:
                warm_up(decode, run)
            decode_s = time_interleaved(decoders, run, "decode")
    return [{"encode_images_per_s": B / e, "decode_images_per_s": B / d} for e, d in zip(encode_s, decode_s)]
