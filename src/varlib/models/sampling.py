"""VAR inference: next-scale sampling with a KV cache, classifier-free guidance (with negative conditions),
top-k/top-p and editing, for class and text models.

Reproduces the official ``autoregressive_infer_cfg`` token for token (same logits, same RNG call sequence:
one ``torch.multinomial`` per scale on a seeded private generator).

Every scale step has static shapes (the KV cache is preallocated for all L tokens; scale k writes and reads
fixed ranges) and no data-dependent Python branch, so ``compile=True`` traces the transformer part of each
step into one graph per scale (``fullgraph``: a graph break is an error, not a silent slowdown).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from varlib.models.layers import KVCache
from varlib.models.vqvae import MultiScaleVQVAE


class ClassConditional(Protocol):
    """What label handling needs of a class-conditional model (VAR, RasterAR)."""

    num_classes: int  # also the null class's index

    @property
    def device(self) -> torch.device: ...

    def check_labels(self, labels_B: torch.Tensor) -> None: ...


class ClassConditionalGenerator(ClassConditional, Protocol):
    """What per-class sampling needs of a model (VAR, RasterAR): ``generate(labels, seed=..., **sampling)``."""

    def generate(self, labels, **kwargs) -> torch.Tensor: ...


class NextScalePredictor(Protocol):
    """What sampling needs of a model (:class:`varlib.models.transformer.VAR` is one); ``conditioning`` is a
    :class:`varlib.models.conditioning.Conditioning`."""

    patch_nums: tuple[int, ...]
    vocab_size: int
    code_channels: int
    conditioning: Any

    @property
    def device(self) -> torch.device: ...

    @property
    def vae(self) -> MultiScaleVQVAE: ...

    def prepare_condition(self, condition, batch_size: int | None = None) -> Any: ...

    def embed_first_scale(self, condition) -> tuple[torch.Tensor, torch.Tensor, tuple | None]: ...

    def adaln_condition(self, cond_BD: torch.Tensor) -> torch.Tensor: ...

    def embed_next_scale(self, next_BCpp: torch.Tensor, scale_index: int) -> torch.Tensor: ...

    def new_kv_caches(self, batch_size: int, dtype: torch.dtype) -> list[KVCache]: ...

    @property
    def blocks(self) -> Sequence[Any]: ...

    def get_logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor: ...

    def block_causal_attention(self, length: int) -> Any: ...

    def forward_scale(
        self, x_BlC: torch.Tensor, cond: torch.Tensor, cond_BD: torch.Tensor, caches: Sequence[KVCache],
        context: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor: ...


@dataclass
class SampleOutput:
    """tokens: K LongTensors (B, pn^2) that built f_hat (ground truth where an edit forced it);
    sampled: the model's own picks; f_hat: (B,Cvae,h,w) the final latent."""

    tokens: list[torch.Tensor]
    sampled: list[torch.Tensor]
    f_hat: torch.Tensor


@dataclass(frozen=True)
class SamplingConfig:
    """A model's recommended sampling settings (what a generation config is to a language model): the one
    definition of the sampling defaults, and with :meth:`resolve` the one place where given settings meet them.

    ``generate``, ``edit``, the validation grids, the app and every command-line tool use them for each setting
    left out (None); model files carry them. The defaults are the official FID settings (cfg 1.5, top_k 900,
    top_p 0.96), which official checkpoints keep; a training config may store others (``model.sampling``).

    The fast options (see :func:`sample_token_maps`) trade exactness for speed; their neutral values, the defaults,
    sample exactly what the official sampler samples:
    ``cfg_until`` (None: guidance on every scale; n: on the first n scales only), ``prune`` (1.0: every token;
    r < 1: the FastVAR-style keep ratio of the last scales' later blocks) and ``stop_after`` (None: every scale;
    n: decode after the first n scales).
    """

    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    cfg_until: int | None = None
    prune: float = 1.0
    stop_after: int | None = None

    def __post_init__(self) -> None:
        check_sampling_values(self.cfg, self.top_k, self.top_p, self.cfg_until, self.prune, self.stop_after)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SamplingConfig":
        """From a plain mapping (a model file's JSON, a config node); a None value keeps the default, unknown
        keys are an error naming the known ones."""
        return cls(**cls().resolve(**values))

    def resolve(self, **given) -> dict[str, Any]:
        """The sampling settings of one call, ``{cfg, top_k, top_p, cfg_until, prune, stop_after}``: each given
        value (numbers from a config or a form are converted: 2 -> 2.0, "0.9" -> 0.9), else this config's (a
        given None keeps this config's), validated. Raises ValueError for an unknown key (naming the known ones)
        or a value out of range."""
        unknown = set(given) - set(SAMPLING_TYPES)
        if unknown:
            raise ValueError(f"sampling settings take {', '.join(SAMPLING_TYPES)}, got unknown keys {sorted(unknown)}")
        settings = {key: getattr(self, key) for key in SAMPLING_TYPES}
        for key, value in given.items():
            if value is None:
                continue
            kind = SAMPLING_TYPES[key]
            try:
                number = kind(value)
            except (TypeError, ValueError):
                number = None
            if number is None or isinstance(value, bool) or (kind is int and number != float(value)):
                raise ValueError(f"sampling setting {key} must be {'an integer' if kind is int else 'a number'} "
                                 f"or null, got {value!r}")
            settings[key] = number
        check_sampling_values(**settings)
        return settings


#: The sampling settings and the type of their values (a None is the neutral value of cfg_until and stop_after).
SAMPLING_TYPES = {"cfg": float, "top_k": int, "top_p": float, "cfg_until": int, "prune": float, "stop_after": int}


@dataclass(frozen=True)
class Draft:
    """CoDe-style drafting: ``model`` (another VAR of the same tokenizer, usually a larger one) samples the first
    ``scales`` scales; the sampled model prefills their tokens into its KV cache in one block-causal pass and
    samples the rest. ``scales`` 0 drafts nothing (the exact sampler)."""

    model: Any
    scales: int


def sample_per_class(
    model: ClassConditionalGenerator, per_class: int, seed: int, batch_size: int = 50, **sampling
) -> torch.Tensor:
    """``per_class`` samples of every class, class by class: (num_classes*per_class, 3, H, W) in [0,1] on the CPU.

    Batch i (of at most ``batch_size``) of class c uses seed + 1000*c + i, so a class's samples do not depend on
    how many classes come before it. ``sampling`` (cfg, top_k, top_p, ...) overrides the model's own settings
    (its ``sampling``) key by key; left out, ``model.generate`` uses them.
    """
    images = []
    for label in range(model.num_classes):
        for i, start in enumerate(range(0, per_class, batch_size)):
            count = min(batch_size, per_class - start)
            images.append(model.generate([label] * count, seed=seed + 1000 * label + i, **sampling).cpu())
    return torch.cat(images)


def sample_prompts(
    model: ClassConditionalGenerator, prompts: Sequence[str], seed: int, batch_size: int = 50, **sampling
) -> torch.Tensor:
    """One sample of each of ``prompts`` (a text model's), in order: (len(prompts), 3, H, W) in [0,1] on the CPU.

    Batch i (of at most ``batch_size`` consecutive prompts) uses seed + i; ``sampling`` as in
    :func:`sample_per_class`.
    """
    prompts = list(prompts)
    return torch.cat([model.generate(prompts[start:start + batch_size], seed=seed + i, **sampling).cpu()
                      for i, start in enumerate(range(0, len(prompts), batch_size))])


def check_sampling_values(cfg: float, top_k: int, top_p: float, cfg_until: int | None = None, prune: float = 1.0,
                          stop_after: int | None = None) -> None:
    """Raises ValueError naming the expected ranges unless every setting is in range."""
    if (top_k < 0 or not 0.0 <= top_p <= 1.0 or cfg < 0 or (cfg_until is not None and cfg_until < 0)
            or not 0.0 < prune <= 1.0 or (stop_after is not None and stop_after < 1)):
        raise ValueError(f"expected top_k >= 0, top_p in [0, 1], cfg >= 0, cfg_until >= 0 or null, prune in (0, 1], "
                         f"stop_after >= 1 or null; got top_k={top_k}, top_p={top_p}, cfg={cfg}, "
                         f"cfg_until={cfg_until}, prune={prune}, stop_after={stop_after}")


@dataclass
class TokenConstraint:
    """Zero-shot editing: teacher-force ground-truth tokens where ``keep`` is true.

    gt_tokens: K LongTensors (B, pn^2), the tokens of the image being edited.
    keep: K bool tensors (B, pn, pn), true where the ground truth is kept (see ``varlib.models.editing``).
    """

    gt_tokens: Sequence[torch.Tensor]
    keep: Sequence[torch.Tensor]


def filter_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Masks logits in place with -inf outside the top-k and the nucleus of mass ``top_p``.

    top-k keeps every logit >= the k-th largest (ties kept). top-p sorts ascending and drops entries whose
    cumulative softmax is <= 1 - top_p, always keeping the largest.
    """
    V = logits_BlV.shape[-1]
    if top_k > 0 and top_k < V:
        kth_largest = logits_BlV.topk(top_k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth_largest, float("-inf"))
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False
        logits_BlV.masked_fill_(drop_sorted.scatter(-1, sorted_idx, drop_sorted), float("-inf"))
    return logits_BlV


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator | None) -> torch.Tensor:
    """Soft Gumbel-softmax drawing its noise from ``generator``."""
    gumbels = -torch.empty_like(logits).exponential_(generator=generator).log()
    return ((logits + gumbels) / tau).softmax(dim=-1)


#: How many compiled step graphs (one per scale, schedule, model and batch size) one process may keep.
COMPILED_GRAPHS_LIMIT = 256


def transformer_step(
    var: NextScalePredictor, caches: Sequence[KVCache], x_BlC: torch.Tensor, cond: torch.Tensor,
    cond_BD: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One scale through the model (attending to the cached coarser scales and the text context): (B,l,V)
    logits."""
    return var.forward_scale(x_BlC, cond, cond_BD, caches, context)


def compiled_transformer_step(backend: str = "inductor"):
    """:func:`transformer_step` under ``torch.compile`` with ``backend`` (no graph breaks allowed): ``inductor``
    generates kernels, ``cudagraphs`` captures CUDA graphs, ``eager`` only traces.

    Static shapes, so one graph per scale and batch size (bounded by :data:`COMPILED_GRAPHS_LIMIT`): each scale has
    its own token count and key prefix, and CUDA graphs replay fixed shapes anyway. The KV-cache writes are input
    mutations, which CUDA graphs accept only for inputs at static addresses: :func:`sample_token_maps` marks the
    caches so (without it ``cudagraphs`` would silently run without graphs)."""
    return torch.compile(transformer_step, fullgraph=True, dynamic=False, backend=backend)


def as_labels(var: ClassConditional, labels, batch_size: int | None) -> torch.Tensor:
    """(B,) int64 class labels on the model's device from a tensor, a list, or one int with ``batch_size``;
    class names (a str, or strs in the list) are looked up in ``var.class_names``. Raises ValueError for float,
    out-of-range, unknown or empty labels. ``var``: VAR, RasterAR or any :class:`ClassConditional` model."""
    device = var.device
    if isinstance(labels, str) or (isinstance(labels, (list, tuple)) and any(isinstance(x, str) for x in labels)):
        labels = class_indices(var, [labels] if isinstance(labels, str) else labels)
        if len(labels) == 1 and batch_size is not None:
            labels = labels[0]
    if isinstance(labels, int):
        if batch_size is None or batch_size < 1:
            raise ValueError(f"a single int label needs batch_size >= 1, got batch_size={batch_size}")
        labels = torch.full((batch_size,), labels, dtype=torch.long)
    labels = torch.as_tensor(labels)  # lists and ints on the host, where check_labels checks their range
    if labels.dtype.is_floating_point:
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.long()
    var.check_labels(labels)
    if labels.numel() == 0:
        raise ValueError("labels must name at least one image, got an empty batch")
    return labels.to(device)


def class_indices(var: ClassConditional, labels) -> list[int]:
    """Class indices of ``labels`` (ints kept, names looked up in ``var.class_names``, "null" = the null class);
    raises ValueError naming the known classes for an unknown name."""
    names = list(getattr(var, "class_names", None) or [])
    out = []
    for label in labels:
        if not isinstance(label, str):
            out.append(int(label))
        elif label == "null":
            out.append(var.num_classes)
        elif label in names:
            out.append(names.index(label))
        else:
            known = ", ".join(repr(n) for n in names[:12]) if names else "none: the model file has no class names"
            raise ValueError(f"unknown class name {label!r}; the model's classes: {known}")
    return out


#: FastVAR-style pruning (``prune`` < 1) acts on this many last scales, in the blocks from depth // 2 on.
PRUNED_SCALES = 2


def forward_scale_pruned(
    var: NextScalePredictor, x_BlC: torch.Tensor, cond: torch.Tensor, cond_BD: torch.Tensor, caches: Sequence[KVCache],
    context: tuple[torch.Tensor, torch.Tensor] | None, keep: float, previous_BCpp: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale with FastVAR's cached token pruning: (B,l,V) logits and the (B,l,C) output of the last block.

    The blocks before depth // 2 see every token; the later ones only the ``keep`` share (at least one) of the
    tokens farthest from the scale's mean token, whose keys alone enter the KV cache; the other tokens' outputs are
    the previous scale's last-block output ``previous_BCpp`` (B,C,pn',pn'), area-interpolated to this scale's grid.
    ``keep`` 1 runs every block on every token (what :meth:`forward_scale` computes).
    """
    blocks = var.blocks
    first_pruned = len(blocks) // 2 if keep < 1 else len(blocks)
    for block, cache in zip(blocks[:first_pruned], caches):
        x_BlC = block(x_BlC, cond, kv_cache=cache, context=context)
    if first_pruned < len(blocks):
        rows, length, width = x_BlC.shape
        distance_Bl = (x_BlC - x_BlC.mean(dim=1, keepdim=True)).norm(dim=-1)
        kept_Bn = distance_Bl.topk(max(1, round(keep * length)), dim=1).indices.sort(dim=1).values
        index_BnC = kept_Bn.unsqueeze(-1).expand(-1, -1, width)
        kept_BnC = x_BlC.gather(1, index_BnC)
        for block, cache in zip(blocks[first_pruned:], caches[first_pruned:]):
            kept_BnC = block(kept_BnC, cond, kv_cache=cache, context=context)
        side = math.isqrt(length)
        cached_BCpp = F.interpolate(previous_BCpp[:rows].to(x_BlC.dtype), size=(side, side), mode="area")
        x_BlC = rearrange(cached_BCpp, "B C h w -> B (h w) C").scatter(1, index_BnC, kept_BnC)
    return var.get_logits(x_BlC, cond_BD), x_BlC


class _ModelRun:
    """One model's side of a sampling run: its condition rows ([cond; uncond] while guided), KV caches and the
    next scale's input."""

    def __init__(self, var: NextScalePredictor, labels, batch_size: int | None, negative, guided: bool,
                 compile: bool | str):
        conditioning = var.conditioning
        cond_B = var.prepare_condition(labels, batch_size)
        self.var, self.B = var, conditioning.batch_size(cond_B)
        if guided:
            negative_B = None if negative is None else var.prepare_condition(negative, self.B)
            cond_B = conditioning.cat(cond_B, conditioning.unconditional(cond_B, negative_B))
        self.rows = conditioning.batch_size(cond_B)
        self.x_BlC, self.cond_BD, self.context = var.embed_first_scale(cond_B)
        self.cond = var.adaln_condition(self.cond_BD)
        device = var.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.x_BlC.dtype
        self.caches = var.new_kv_caches(self.rows, dtype)
        self.compile = compile
        self.step = transformer_step
        if compile:
            self.step = compiled_transformer_step("inductor" if compile is True else compile)
            self.mark_caches_static()
        self.previous_BCpp: torch.Tensor | None = None  # the last scale's last-block output, for pruning

    @property
    def guided(self) -> bool:
        return self.rows > self.B

    def mark_caches_static(self) -> None:
        """The compiled steps write the KV caches: static addresses let CUDA graphs keep these input mutations."""
        for cache in self.caches:
            torch._dynamo.mark_static_address(cache.k_BHLc)
            torch._dynamo.mark_static_address(cache.v_BHLc)

    def drop_guidance(self) -> None:
        """From now on the conditional rows alone (half the batch): the unconditional ones leave the caches."""
        B = self.B
        for cache in self.caches:
            cache.keep_rows(B)
        if self.compile:
            self.mark_caches_static()
        self.x_BlC, self.cond, self.cond_BD = self.x_BlC[:B], self.cond[:B], self.cond_BD[:B]
        self.context = None if self.context is None else tuple(t[:B] for t in self.context)
        self.rows = B

    def logits(self, si: int, keep: float, record: bool) -> torch.Tensor:
        """Scale ``si``'s (rows,l,V) logits; ``record`` keeps the last block's output for a pruned next scale."""
        if keep < 1 or record:
            logits_BlV, hidden_BlC = forward_scale_pruned(self.var, self.x_BlC, self.cond, self.cond_BD, self.caches,
                                                          self.context, keep, self.previous_BCpp)
            pn = self.var.patch_nums[si]
            self.previous_BCpp = rearrange(hidden_BlC, "B (h w) C -> B C h w", h=pn)
            return logits_BlV
        with torch._dynamo.config.patch(recompile_limit=COMPILED_GRAPHS_LIMIT) if self.compile else nullcontext():
            return self.step(self.var, self.caches, self.x_BlC, self.cond, self.cond_BD, self.context)

    def set_input(self, next_BCpp: torch.Tensor, si: int) -> None:
        """Scale ``si``'s input from its (B,Cvae,pn,pn) down-sampled f_hat."""
        self.x_BlC = self.var.embed_next_scale(next_BCpp, si).repeat(self.rows // self.B, 1, 1)

    def prefill(self, inputs_BCpp: Sequence[torch.Tensor]) -> None:
        """Reads the drafted scales in one block-causal pass into the KV caches: the first-scale input and the
        inputs of scales 1..n-1 (``inputs_BCpp[s]``, (B,Cvae,pn,pn)); then scale n's input is ``inputs_BCpp[n]``."""
        var, n = self.var, len(inputs_BCpp) - 1
        repeat = self.rows // self.B
        x_BLC = torch.cat([self.x_BlC] + [var.embed_next_scale(inputs_BCpp[s], s).repeat(repeat, 1, 1)
                                          for s in range(1, n)], dim=1)
        attention = var.block_causal_attention(x_BLC.shape[1])
        for block, cache in zip(var.blocks, self.caches):
            x_BLC = block(x_BLC, self.cond, attention, kv_cache=cache, context=self.context)
        pn = var.patch_nums[n - 1]
        self.previous_BCpp = rearrange(x_BLC[:, -pn * pn:], "B (h w) C -> B C h w", h=pn)
        self.set_input(inputs_BCpp[n], n)


@torch.no_grad()
def sample_token_maps(
    var: NextScalePredictor,
    labels,
    *,
    cfg: float,
    top_k: int,
    top_p: float,
    seed: int | None = None,
    more_smooth: bool = False,
    batch_size: int | None = None,
    constraint: TokenConstraint | None = None,
    compile: bool | str = False,
    negative=None,
    cfg_until: int | None = None,
    prune: float = 1.0,
    stop_after: int | None = None,
    draft: Draft | None = None,
) -> SampleOutput:
    """Samples all K token maps scale by scale (the paper's inference loop).

    At scale k the transformer reads the (2B) inputs [cond; uncond] with a KV cache of every coarser scale
    (uncond: the null condition, or ``negative``),
    the guided logits are ``(1 + t) cond - t uncond`` with ``t = cfg * k/(K-1)``, top-k/top-p filter them,
    one multinomial draw per token picks the codes, and the codes update f_hat, whose area-down-sampled
    version is the next scale's input. The unconditional half is skipped when cfg == 0.

    The fast options change the samples (their neutral values, the defaults, change nothing):
    ``cfg_until`` n guides the first n scales only and then runs the conditional half alone (Switti, SkipVAR);
    ``draft`` lets another model sample the first scales (CoDe); ``prune`` < 1 computes only that share of the
    tokens in the later blocks of the last :data:`PRUNED_SCALES` scales (FastVAR, :func:`forward_scale_pruned`);
    ``stop_after`` n samples the first n scales only (f_hat, kept at the final latent size, is decoded as it is).
    The random stream is one multinomial draw per sampled scale, whichever model draws it.

    Args:
        labels: (B,) classes in [0, num_classes] (num_classes = null), a list, or an int with ``batch_size``;
            for a text model, prompts (a list, or a str with ``batch_size``).
        cfg, top_k, top_p: guidance at the last scale and the filters (0 disables either); no defaults here,
            the model's ``sampling`` supplies them (``VAR.generate_tokens``).
        seed: seeds a private generator on the model's device; None uses the global RNG.
        constraint: ground-truth tokens to force where ``keep`` is true (zero-shot editing).
        compile: run each scale's transformer step through ``torch.compile``: True (inductor) or a backend
            name (see :func:`compiled_transformer_step`). Worth it on GPUs for repeated sampling; the first
            call compiles one graph per scale (pruned scales run eagerly). Off by default.
        negative: the unconditional half's condition instead of the null one (negative prompts, or classes),
            one or one per image; only used with guidance (cfg > 0).
        cfg_until: guidance on scales < cfg_until only; None: every scale.
        prune: FastVAR keep ratio in (0, 1]; 1: no pruning.
        stop_after: sample scales < stop_after only (1..K); None: all K.
        draft: a :class:`Draft`: its model (same tokenizer and schedule) samples scales < ``draft.scales`` with
            the same settings.
    Returns:
        :class:`SampleOutput` (``stop_after`` token maps when given).
    """
    check_sampling_values(cfg, top_k, top_p, cfg_until, prune, stop_after)
    pns, V, Cv, device = var.patch_nums, var.vocab_size, var.code_channels, var.device
    K = len(pns)
    if stop_after is not None and stop_after > K:
        raise ValueError(f"stop_after must be in [1, {K}] (the model's scales) or null, got {stop_after}")
    drafted = 0 if draft is None else draft.scales
    if draft is not None:
        check_draft(var, draft)
    quant = var.vae.quantize
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    guided_scales = 0 if cfg == 0 else K if cfg_until is None else min(cfg_until, K)
    stop = K if stop_after is None else stop_after
    refine = _ModelRun(var, labels, batch_size, negative, guided_scales > drafted, compile) if stop > drafted else None
    drafting = _ModelRun(draft.model, labels, batch_size, negative, guided_scales > 0, compile) if drafted else None
    B = (refine or drafting).B
    first_pruned = max(1, K - PRUNED_SCALES) if prune < 1 else K + 1
    side = pns[-1]
    f_hat = torch.zeros(B, Cv, side, side, device=device, dtype=torch.float32)
    inputs = [None]  # inputs[s]: scale s's down-sampled f_hat (B,Cvae,pn,pn), s >= 1; the prefill reads them
    tokens, sampled = [], []
    for si, pn in enumerate(pns[:stop]):
        if si == drafted and drafted:
            refine.prefill(inputs)
        run = drafting if si < drafted else refine
        if run.guided and si >= guided_scales:
            run.drop_guidance()
        ratio = si / (K - 1) if K > 1 else 0.0
        logits_BlV = run.logits(si, prune if si >= first_pruned else 1.0, record=si + 1 >= first_pruned)
        if run.guided:
            t = cfg * ratio
            logits_BlV = (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]
        filter_top_k_top_p_(logits_BlV, top_k, top_p)
        probs_NV = logits_BlV.softmax(dim=-1).view(-1, V)
        tokens_Bl = torch.multinomial(probs_NV, 1, replacement=True, generator=generator).view(B, pn * pn)
        if more_smooth:
            tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
            h_BlC = gumbel_softmax(logits_BlV.mul(1 + ratio), tau, generator) @ quant.embedding.weight.unsqueeze(0)
        else:
            h_BlC = quant.embedding(tokens_Bl)
        h_BCpp = rearrange(h_BlC, "B (h w) C -> B C h w", h=pn).float()
        sampled.append(tokens_Bl)
        if constraint is not None:
            keep_B1pp = constraint.keep[si].to(device).unsqueeze(1)
            gt_BCpp = quant.embed(constraint.gt_tokens[si].to(device), pn)
            h_BCpp = torch.where(keep_B1pp, gt_BCpp, h_BCpp)
            tokens_Bl = torch.where(keep_B1pp.view(B, -1), constraint.gt_tokens[si].to(device), tokens_Bl)
        tokens.append(tokens_Bl)
        f_hat, next_BCpp = quant.accumulate(f_hat, h_BCpp, si, pns)
        if si + 1 < stop:
            inputs.append(next_BCpp)
            if si + 1 != drafted:
                run.set_input(next_BCpp, si + 1)
    return SampleOutput(tokens=tokens, sampled=sampled, f_hat=f_hat)


def check_draft(var: NextScalePredictor, draft: Draft) -> None:
    """Raises ValueError unless ``draft`` drafts 0..K scales with a model of ``var``'s tokenizer and schedule."""
    K = len(var.patch_nums)
    if isinstance(draft.scales, bool) or not isinstance(draft.scales, int) or not 0 <= draft.scales <= K:
        raise ValueError(f"draft.scales must be an integer in [0, {K}] (the model's scales), got {draft.scales!r}")
    drafter = draft.model
    if tuple(drafter.patch_nums) != tuple(var.patch_nums) or drafter.vocab_size != var.vocab_size or not torch.equal(
            drafter.vae.quantize.embedding.weight, var.vae.quantize.embedding.weight.to(drafter.device)):
        raise ValueError(f"the draft model must share the tokenizer and schedule of the model: got schedule "
                         f"{tuple(drafter.patch_nums)} and {drafter.vocab_size} codes, expected "
                         f"{tuple(var.patch_nums)} and {var.vocab_size} codes of the same codebook")
