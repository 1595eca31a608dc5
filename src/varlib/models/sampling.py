"""VAR inference: next-scale sampling with a KV cache, classifier-free guidance (with negative conditions),
top-k/top-p and editing, for class and text models.

Reproduces the official ``autoregressive_infer_cfg`` token for token (same logits, same RNG call sequence:
one ``torch.multinomial`` per scale on a seeded private generator).

Every scale step has static shapes (the KV cache is preallocated for all L tokens; scale k writes and reads
fixed ranges) and no data-dependent Python branch, so ``compile=True`` traces the transformer part of each
step into one graph per scale (``fullgraph``: a graph break is an error, not a silent slowdown).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import torch
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
    definition of the sampling defaults.

    ``generate``, ``edit``, the validation grids and every command-line tool use them for each setting left
    out (None); model files carry them. The defaults are the official FID settings (cfg 1.5, top_k 900,
    top_p 0.96), which official checkpoints keep; a training config may store others (``model.sampling``).
    """

    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96

    def __post_init__(self) -> None:
        check_sampling_values(self.cfg, self.top_k, self.top_p)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SamplingConfig":
        """From a plain mapping (a model file's JSON, a config node); a None value keeps the default, unknown
        keys are an error naming the known ones."""
        unknown = set(values) - {"cfg", "top_k", "top_p"}
        if unknown:
            raise ValueError(f"sampling settings take cfg, top_k and top_p, got unknown keys {sorted(unknown)}")
        return cls(**{k: type(getattr(cls, k))(v) for k, v in values.items() if v is not None})

    def resolve(self, cfg: float | None = None, top_k: int | None = None, top_p: float | None = None) -> dict:
        """``{cfg, top_k, top_p}``: each given value, else this config's."""
        return dict(cfg=self.cfg if cfg is None else cfg, top_k=self.top_k if top_k is None else top_k,
                    top_p=self.top_p if top_p is None else top_p)


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


def check_sampling_values(cfg: float, top_k: int, top_p: float) -> None:
    if top_k < 0 or not 0.0 <= top_p <= 1.0 or cfg < 0:
        raise ValueError(f"expected top_k >= 0, top_p in [0, 1], cfg >= 0; got {top_k}, {top_p}, {cfg}")


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
) -> SampleOutput:
    """Samples all K token maps scale by scale (the paper's inference loop).

    At scale k the transformer reads the (2B) inputs [cond; uncond] with a KV cache of every coarser scale
    (uncond: the null condition, or ``negative``),
    the guided logits are ``(1 + t) cond - t uncond`` with ``t = cfg * k/(K-1)``, top-k/top-p filter them,
    one multinomial draw per token picks the codes, and the codes update f_hat, whose area-down-sampled
    version is the next scale's input. The unconditional half is skipped when cfg == 0.

    Args:
        labels: (B,) classes in [0, num_classes] (num_classes = null), a list, or an int with ``batch_size``;
            for a text model, prompts (a list, or a str with ``batch_size``).
        cfg, top_k, top_p: guidance at the last scale and the filters (0 disables either); no defaults here,
            the model's ``sampling`` supplies them (``VAR.generate_tokens``).
        seed: seeds a private generator on the model's device; None uses the global RNG.
        constraint: ground-truth tokens to force where ``keep`` is true (zero-shot editing).
        compile: run each scale's transformer step through ``torch.compile``: True (inductor) or a backend
            name (see :func:`compiled_transformer_step`). Worth it on GPUs for repeated sampling; the first
            call compiles one graph per scale. Off by default.
        negative: the unconditional half's condition instead of the null one (negative prompts, or classes),
            one or one per image; only used with guidance (cfg > 0).
    Returns:
        :class:`SampleOutput`.
    """
    check_sampling_values(cfg, top_k, top_p)
    conditioning = var.conditioning
    cond_B = var.prepare_condition(labels, batch_size)
    quant = var.vae.quantize
    B, pns, V, Cv = conditioning.batch_size(cond_B), var.patch_nums, var.vocab_size, var.code_channels
    device = var.device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    guided = cfg != 0
    if guided:
        negative_B = None if negative is None else var.prepare_condition(negative, B)
        cond_batch = conditioning.cat(cond_B, conditioning.unconditional(cond_B, negative_B))
    else:
        cond_batch = cond_B
    rows = conditioning.batch_size(cond_batch)

    x_BlC, cond_BD, context = var.embed_first_scale(cond_batch)
    cond = var.adaln_condition(cond_BD)
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else x_BlC.dtype
    caches = var.new_kv_caches(rows, dtype)
    side = pns[-1]
    f_hat = torch.zeros(B, Cv, side, side, device=device, dtype=torch.float32)
    if compile:
        step = compiled_transformer_step("inductor" if compile is True else compile)
        for cache in caches:  # the steps write them: static addresses let CUDA graphs keep these input mutations
            torch._dynamo.mark_static_address(cache.k_BHLc)
            torch._dynamo.mark_static_address(cache.v_BHLc)
    else:
        step = transformer_step
    tokens, sampled = [], []
    for si, pn in enumerate(pns):
        ratio = si / (len(pns) - 1) if len(pns) > 1 else 0.0
        with torch._dynamo.config.patch(recompile_limit=COMPILED_GRAPHS_LIMIT) if compile else nullcontext():
            logits_BlV = step(var, caches, x_BlC, cond, cond_BD, context)
        if guided:
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
        if si + 1 < len(pns):
            x_BlC = var.embed_next_scale(next_BCpp, si + 1).repeat(rows // B, 1, 1)
    return SampleOutput(tokens=tokens, sampled=sampled, f_hat=f_hat)
