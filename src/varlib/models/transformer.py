"""The VAR transformer: a GPT-2-style decoder with AdaLN that predicts each token map from the coarser ones.

Shapes: B batch, L = sum pn^2 tokens, C width (= D condition width), V vocabulary, Cvae code channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

import torch
import torch.nn as nn
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from varlib.models.attention import BlockCausalAttention, resolve_attn_impl
from varlib.models.conditioning import Conditioning, build_conditioning
from varlib.models.layers import AdaLNBeforeHead, AdaLNSelfAttn, KVCache, LNBeforeHead, LNSelfAttn, SharedAdaLin
from varlib.models.editing import keep_masks_per_scale, token_grid_mask
from varlib.models.flops import flops_per_token, per_token_linear_params
from varlib.models.pretrained import PretrainedMixin, load_strict
from varlib.models.patch_schedules import scale_slices, sequence_length, validate_patch_nums
from varlib.models.sampling import Draft, SampleOutput, SamplingConfig, TokenConstraint, sample_token_maps
from varlib.models.vqvae import MultiScaleVQVAE


@dataclass(frozen=True)
class VARConfig:
    """The architecture of a VAR (or of the raster-AR baseline): what builds the network, what its model file
    records (``var_config``, :meth:`to_dict`) and what the Hydra node ``model.var`` holds (:meth:`from_dict`).

    Args:
        depth: number of blocks; ``width`` (64*depth), ``num_heads`` (depth) and ``drop_path_rate`` (0.1*depth/24),
            the official depth-scaled shape, unless given.
        num_classes: number of real classes (class conditioning; a text model records 0).
        mlp_ratio, drop_rate, attn_drop_rate, norm_eps: the blocks.
        attn_l2_norm: L2-normalised queries and keys with a learned per-head scale (the paper's Table 3 row
            "+Attn. Norm."); off: the official code's plain attention, softmax scale 0.25/sqrt(head width).
        cond_drop_rate: conditional dropout probability (to the null class or null text) in training mode.
        adaln: the condition modulates every block's and the head's LayerNorm (AdaLN, Table 3 row "+AdaLN");
            off: affine LayerNorms and the condition reaches the model only through the start token (rows "AR" and
            "AR to VAR"); class conditioning only, no shared AdaLN.
        shared_aln: one shared AdaLN projection plus per-block offsets (the official 512px VAR).
        patch_nums: the token-map schedule; None: the tokenizer's.
        conditioning: None (class labels) or a conditioning spec (see
            :func:`~varlib.models.conditioning.build_conditioning`), e.g. text with an encoder; text adds a
            cross-attention to every block.
        init_adaln, init_adaln_gamma, init_head, init_std: the official initialisation (init_std < 0: sqrt(1/(3C))).
    """

    depth: int = 16
    num_classes: int = 1000
    width: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float | None = None
    norm_eps: float = 1e-6
    attn_l2_norm: bool = True
    cond_drop_rate: float = 0.1
    adaln: bool = True
    shared_aln: bool = False
    patch_nums: tuple[int, ...] | None = None
    conditioning: Mapping | None = None
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    init_head: float = 0.02
    init_std: float = -1.0

    def __post_init__(self) -> None:
        if self.depth is None or self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if not 0.0 <= self.cond_drop_rate < 1.0:
            raise ValueError(f"cond_drop_rate must be in [0, 1), got {self.cond_drop_rate}")
        conditioning_type = dict(self.conditioning or {"type": "class"}).get("type")
        if not self.adaln and (self.shared_aln or conditioning_type != "class"):
            raise ValueError(f"adaln=False takes class conditioning and no shared AdaLN, got "
                             f"shared_aln={self.shared_aln}, conditioning={self.conditioning}")
        depth_scaled = dict(width=64 * self.depth, num_heads=self.depth, drop_path_rate=0.1 * self.depth / 24)
        for name, value in depth_scaled.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.patch_nums is not None:
            object.__setattr__(self, "patch_nums", tuple(self.patch_nums))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], section: str = "model.var") -> VARConfig:
        """The config of a plain mapping (a Hydra node, a file's ``var_config``): keys left out take the defaults
        (files written before a field existed), unknown keys are a ValueError naming them and ``section``."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown {section} keys {unknown}; expected some of {known}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a mapping (the model's ``config``, its file's ``var_config``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class AdaLNTransformer(PretrainedMixin, nn.Module):
    """What VAR and the raster-AR baseline share: the architecture of a :class:`VARConfig`, the input embeddings,
    the AdaLN blocks and head, the official initialisation, the conditioning and its dropout, and the frozen tokenizer
    held by reference.

    Modules, in the official order (the random initialisation depends on it): ``word_embed`` (Cvae -> C),
    the conditioning (:mod:`varlib.models.conditioning`): ``class_emb`` (num_classes + 1 rows, the last the null
    class) or ``text_cond`` (text encoder, pooled projection, null text), ``pos_start`` (1,1,C), ``pos_1LC`` (1,L,C),
    ``lvl_embed`` (one row per scale; only with ``scale_embedding``), ``shared_ada_lin``, ``blocks``, ``head_nm``,
    ``head`` (C -> V). The tokenizer is not a submodule (so state dicts match the official ones); device and dtype
    moves are applied to it as well.

    Args:
        vae: the frozen tokenizer whose codebook defines the token space.
        config: the architecture; :attr:`var_config` is it as built (the schedule, class count and conditioning
            spec resolved), :attr:`config` its plain mapping.
        patch_nums: the token-map schedule (validated by the subclass); L = sum pn^2.
        scale_embedding: a learned embedding per scale added to every token (VAR's ``lvl_embed``).
    """

    def __init__(self, vae: MultiScaleVQVAE, config: VARConfig, patch_nums: tuple[int, ...],
                 scale_embedding: bool = False):
        super().__init__()
        width = config.width
        self._vae = (vae,)
        self.patch_nums = patch_nums
        self.L = sequence_length(patch_nums)
        self.depth, self.width, self.num_heads = config.depth, width, config.num_heads
        self.cond_drop_rate, self.adaln = config.cond_drop_rate, config.adaln
        self.vocab_size, self.code_channels = vae.vocab_size, vae.z_channels
        self.sampling = SamplingConfig()  # recommended generate() settings; model files carry them

        self.word_embed = nn.Linear(self.code_channels, width)
        cond_module = build_conditioning(config.conditioning, config.num_classes, width)
        # registered under its own name: class models keep the official key class_emb.weight
        self.add_module(cond_module.ATTRIBUTE, cond_module)
        self._conditioning_name = cond_module.ATTRIBUTE
        self.num_classes = cond_module.num_classes
        self.var_config = replace(config, num_classes=self.num_classes, patch_nums=patch_nums,
                                  conditioning=cond_module.spec)
        self.pos_start = nn.Parameter(torch.empty(1, 1, width))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, width))
        if scale_embedding:
            self.lvl_embed = nn.Embedding(len(patch_nums), width)
        self.shared_ada_lin = (nn.Sequential(nn.SiLU(), SharedAdaLin(width, 6 * width)) if config.shared_aln
                               else nn.Identity())
        self.blocks = nn.ModuleList(self._new_block(config, i, cond_module.context_dim) for i in range(config.depth))
        self.head_nm = AdaLNBeforeHead(width, width, config.norm_eps) if self.adaln else LNBeforeHead(
            width, eps=config.norm_eps)
        self.head = nn.Linear(width, self.vocab_size)
        init_std = math.sqrt(1 / width / 3) if config.init_std < 0 else config.init_std
        self.init_weights(config.init_adaln, config.init_adaln_gamma, config.init_head, init_std)

    @staticmethod
    def _new_block(config: VARConfig, index: int, context_dim: int | None) -> nn.Module:
        """Block ``index``: AdaLN (cross-attending to ``context_dim`` features when given) or, with ``adaln`` off,
        affine LayerNorms; drop-path grows linearly from 0 to ``drop_path_rate`` over the depth."""
        drop_path = config.drop_path_rate * index / (config.depth - 1) if config.depth > 1 else 0.0
        common = dict(drop=config.drop_rate, attn_drop=config.attn_drop_rate, drop_path=drop_path,
                      norm_eps=config.norm_eps, attn_l2_norm=config.attn_l2_norm)
        if config.adaln:
            return AdaLNSelfAttn(config.width, config.width, config.num_heads, config.mlp_ratio,
                                 shared_aln=config.shared_aln, cross_attn_dim=context_dim, **common)
        return LNSelfAttn(config.width, config.num_heads, config.mlp_ratio, **common)

    @property
    def config(self) -> dict[str, Any]:
        """The architecture as a plain mapping (:meth:`VARConfig.to_dict` of :attr:`var_config`)."""
        return self.var_config.to_dict()

    @property
    def vae(self) -> MultiScaleVQVAE:
        return self._vae[0]

    @property
    def conditioning(self) -> Conditioning:
        """What the model is conditioned on: its ``class_emb`` or ``text_cond``."""
        return getattr(self, self._conditioning_name)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.vae._apply(fn, recurse)
        return self

    #: one name per class (a model file carries them), or None; ``generate`` accepts them as labels
    class_names: list[str] | None = None

    @classmethod
    def from_config(cls, config: Mapping | VARConfig, state_dict: Mapping[str, torch.Tensor] | None = None, *,
                    vae: MultiScaleVQVAE, sampling: Mapping | None = None, class_names: list[str] | None = None):
        """The transformer on ``vae`` with the architecture ``config`` (a :class:`VARConfig`, or a file's
        ``var_config`` mapping) and every weight of ``state_dict`` when given; ``sampling``, the recommended settings
        as a model file's plain mapping, replaces the defaults when given, and ``class_names`` names the classes."""
        if not isinstance(config, VARConfig):
            config = VARConfig.from_dict(config, f"{cls.FILE_PREFIX}_config")
        model = cls(vae, config)
        if state_dict is not None:
            load_strict(model, state_dict, cls.__name__)
        if sampling is not None:
            model.sampling = SamplingConfig.from_dict(sampling)
        if class_names is not None:
            if len(class_names) != model.num_classes:
                raise ValueError(f"{len(class_names)} class names for a model of {model.num_classes} classes")
            model.class_names = list(class_names)
        return model

    @torch.no_grad()
    def init_weights(self, init_adaln: float, init_adaln_gamma: float, init_head: float, init_std: float) -> None:
        """The official initialisation (truncated normals, scaled-down residual projections and AdaLN); a frozen
        text encoder keeps its own weights. Without AdaLN the LayerNorms start at weight 1, bias 0."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.requires_grad:
                nn.init.trunc_normal_(m.weight, std=init_std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=init_std)
        if init_head >= 0:
            self.head.weight.mul_(init_head)
            self.head.bias.zero_()
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
        if not self.adaln:
            return
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        C = self.width
        for block in self.blocks:
            if block.shared_aln:
                block.ada_gss[:, :, 2:].mul_(init_adaln)
                block.ada_gss[:, :, :2].mul_(init_adaln_gamma)
            else:
                block.ada_lin[-1].weight[2 * C:].mul_(init_adaln)
                block.ada_lin[-1].weight[:2 * C].mul_(init_adaln_gamma)
                block.ada_lin[-1].bias.zero_()

    @property
    def device(self) -> torch.device:
        return self.pos_start.device

    def check_labels(self, labels_B: torch.Tensor) -> None:
        """Raises ValueError unless labels are a 1-D integer tensor in [0, num_classes] (num_classes = null).

        The range is checked on host tensors only: reading a device tensor's values synchronises the host with the
        device, at every training step. Training batches are checked on the host before they move to the device
        (``TokenTransformerModule.on_before_batch_transfer``), and ``generate`` checks lists and ints before moving
        them."""
        if labels_B.ndim != 1 or labels_B.dtype.is_floating_point:
            raise ValueError(f"labels must be a 1-D integer tensor, got shape {tuple(labels_B.shape)} {labels_B.dtype}")
        on_host = labels_B.device.type == "cpu"
        if labels_B.numel() and on_host and (labels_B.min() < 0 or labels_B.max() > self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = null class), "
                f"got values in [{int(labels_B.min())}, {int(labels_B.max())}]"
            )

    def new_kv_caches(self, batch_size: int, dtype: torch.dtype) -> list[KVCache]:
        """One empty KV cache per block for ``batch_size`` rows of all L tokens (inference)."""
        head_dim = self.width // self.num_heads
        return [KVCache(batch_size, self.num_heads, self.L, head_dim, self.device, dtype) for _ in self.blocks]

    def drop_condition(self, condition):
        """Conditional dropout: in training mode each row of a prepared condition (labels, text features) becomes
        the null condition with probability ``cond_drop_rate``."""
        if not self.training or self.cond_drop_rate == 0:
            return condition
        return self.conditioning.drop(condition, self.cond_drop_rate)

    def adaln_condition(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """What the blocks receive: the (B,D) condition, or the shared AdaLN's (B,1,6,C) output."""
        return self.shared_ada_lin(cond_BD)

    def get_logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Head norm (AdaLN, or an affine LayerNorm with ``adaln`` off) + linear head, in fp32: (B,L,C) -> (B,L,V)."""
        return self.head(self.head_nm(h_BLC.float(), cond_BD).float()).float()

    def num_non_embedding_params(self) -> int:
        """N of the scaling laws: parameters other than the conditioning (class embedding, text encoder and
        projection), position and scale embeddings."""
        embeddings = (self._conditioning_name, "pos_1LC", "pos_start", "lvl_embed")
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith(embeddings))


class VAR(AdaLNTransformer):
    """Visual autoregressive transformer over the token maps of a frozen :class:`MultiScaleVQVAE`.

    The condition is both the start token (scale 0's input) and the AdaLN condition: the class embedding (class
    ``num_classes`` is the null class used for classifier-free guidance and label dropout), or for a text model the
    projected pooled text feature, whose token features also feed a zero-gated cross-attention in every block (a
    learned null text plays the null class). See :mod:`varlib.models.conditioning`. Training uses a
    block-causal mask (a token sees every token of its own and coarser scales), computed by one of the exact
    implementations of :mod:`varlib.models.attention`; inference uses a KV cache.

    The tokenizer is held by reference, not as a submodule, so the state dict matches the official one;
    device and dtype moves (``.to``, ``.cuda``) are applied to it as well.

    Args:
        vae: the tokenizer whose codebook and phi convolutions define the token space.
        config: the architecture (:class:`VARConfig`; the default: VAR-d16 on ImageNet's 1000 classes, the
            tokenizer's schedule).
        attn_impl: teacher-forced attention, ``auto`` (the fastest exact one for the device: FlexAttention on
            CUDA, per-scale key prefixes elsewhere), ``dense`` (the masked reference), ``prefix`` or ``flex``;
            see :mod:`varlib.models.attention`. A runtime setting, not saved with the weights.
        activation_checkpointing: recompute each block's activations in the backward pass instead of
            storing them (training with gradients only); also a runtime setting.
    """

    FILE_KIND, FILE_PREFIX = "var", "var"

    def __init__(self, vae: MultiScaleVQVAE, config: VARConfig = VARConfig(), *, attn_impl: str = "auto",
                 activation_checkpointing: bool = False):
        patch_nums = validate_patch_nums(vae.patch_nums if config.patch_nums is None else config.patch_nums)
        if len(patch_nums) != len(vae.patch_nums):
            raise ValueError(f"the schedule {patch_nums} must have as many scales as the tokenizer's {vae.patch_nums}")
        super().__init__(vae, config, patch_nums, scale_embedding=True)
        level_1L = torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(self.patch_nums)]).view(1, self.L)
        self.register_buffer("lvl_1L", level_1L)
        # Additive block-causal mask (0 where key scale <= query scale, -inf elsewhere), kept persistent
        # under the official name so official checkpoints load strictly.
        visible = level_1L.view(self.L, 1) >= level_1L.view(1, self.L)
        mask = torch.zeros(self.L, self.L).masked_fill_(~visible, float("-inf"))
        self.register_buffer("attn_bias_for_masking", mask.view(1, 1, self.L, self.L))
        self.attn_impl = attn_impl
        self.activation_checkpointing = activation_checkpointing

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._attention_plans = {}  # they hold views of the moved mask buffers
        return self

    # -- attention ---------------------------------------------------------------------------------

    @property
    def attn_impl(self) -> str:
        return self._attn_impl

    @attn_impl.setter
    def attn_impl(self, impl: str) -> None:
        resolve_attn_impl(impl, torch.device("cpu"))  # validates the name
        self._attn_impl = impl
        self._attention_plans: dict[tuple, BlockCausalAttention] = {}

    def block_causal_attention(self, length: int) -> BlockCausalAttention:
        """The attention of a teacher-forced forward over the first ``length`` tokens (built once per
        length, device and implementation, e.g. FlexAttention's block mask)."""
        device = self.attn_bias_for_masking.device
        attn_dropout = self.training and any(block.attn.attn_drop > 0 for block in self.blocks)
        impl = resolve_attn_impl(self._attn_impl, device, attn_dropout)
        key = (length, impl, device)
        if key not in self._attention_plans:
            self._attention_plans[key] = BlockCausalAttention(
                self.patch_nums, self.attn_bias_for_masking, self.lvl_1L[0], length, impl)
        return self._attention_plans[key]

    # -- helpers shared by training and sampling ---------------------------------------------------

    def level_position_embedding(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """lvl_embed(scale of each token) + pos_1LC for tokens [start, stop): (1, stop - start, C)."""
        return self.lvl_embed(self.lvl_1L[:, start:stop]) + self.pos_1LC[:, start:stop]

    def prepare_condition(self, condition, batch_size: int | None = None):
        """The validated condition batch on the model's device (see :meth:`Conditioning.prepare`): (B,) labels
        from labels or class names, or :class:`~varlib.models.text.TextFeatures` from prompts; ``batch_size``
        repeats a single one."""
        return self.conditioning.prepare(condition, batch_size, self)

    def embed_first_scale(self, condition) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """Scale 0's input and the condition of a prepared condition batch: (B,1,C) start tokens (condition +
        pos_start + level/position embedding of token 0), the (B,D) condition ``cond_BD`` (the class embedding or
        the projected pooled text feature) and the cross-attention context (text tokens (B,T,Dt), mask (B,T); None
        for class models)."""
        cond_BD = self.conditioning(condition)
        sos_B1C = cond_BD.unsqueeze(1) + self.pos_start.expand(cond_BD.shape[0], 1, -1)
        return sos_B1C + self.level_position_embedding(0, 1), cond_BD, self.conditioning.context(condition)

    def embed_token_inputs(self, x_BlCv: torch.Tensor, start: int) -> torch.Tensor:
        """Code-vector inputs of tokens [start, start + l) to the width plus their level/position embedding:
        (B,l,Cvae) -> (B,l,C). In the weights' dtype: fp32, or bf16 under FSDP2's bf16 mixed precision."""
        x_BlCv = x_BlCv.to(self.word_embed.weight.dtype)
        return self.word_embed(x_BlCv) + self.level_position_embedding(start, start + x_BlCv.shape[1])

    def embed_next_scale(self, next_BCpp: torch.Tensor, scale_index: int) -> torch.Tensor:
        """The input of scale ``scale_index`` from its (B,Cvae,pn,pn) down-sampled f_hat: (B,pn*pn,C)."""
        start = scale_slices(self.patch_nums)[scale_index].start
        return self.embed_token_inputs(rearrange(next_BCpp, "B C h w -> B (h w) C"), start)

    def forward_scale(
        self, x_BlC: torch.Tensor, cond: torch.Tensor, cond_BD: torch.Tensor, caches: Sequence[KVCache],
        context: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One scale through every block (attending to the cached coarser scales) and the head: (B,l,V) logits.

        cond: :meth:`adaln_condition` of cond_BD, the (B,D) condition; context: the text of a text model.
        """
        for block, cache in zip(self.blocks, caches):
            x_BlC = block(x_BlC, cond, kv_cache=cache, context=context)
        return self.get_logits(x_BlC, cond_BD)

    # -- teacher-forced training forward --------------------------------------------------------------

    def forward(self, condition, x_BLCv: torch.Tensor) -> torch.Tensor:
        """Next-scale prediction with teacher forcing.

        Args:
            condition: (B,) class indices in [0, num_classes], or for a text model B prompts or their
                :class:`~varlib.models.text.TextFeatures`; in training mode each row is replaced by the null
                condition with probability ``cond_drop_rate``.
            x_BLCv: (B, L'-1, Cvae), the tokenizer's teacher-forcing input (``vae.teacher_forcing_input``);
                L' may be a shorter prefix ending at a scale boundary (progressive training).
        Returns:
            (B, L', V) logits for every token of every scale.
        """
        condition = self.prepare_condition(condition)
        rows = self.conditioning.batch_size(condition)
        B, length = x_BLCv.shape[0], x_BLCv.shape[1] + 1
        ends = [sequence_length(self.patch_nums[: k + 1]) for k in range(len(self.patch_nums))]
        if x_BLCv.ndim != 3 or x_BLCv.shape[2] != self.code_channels or length not in ends or rows != B:
            raise ValueError(
                f"expected teacher-forcing input (B={rows}, L-1={self.L - 1} or a scale prefix "
                f"{[e - 1 for e in ends]}, Cvae={self.code_channels}), got {tuple(x_BLCv.shape)}"
            )
        condition = self.drop_condition(condition)
        with torch.autocast(device_type=x_BLCv.device.type, enabled=False):
            sos_B1C, cond_BD, context = self.embed_first_scale(condition)
            x_BLC = torch.cat((sos_B1C, self.embed_token_inputs(x_BLCv, start=1)), dim=1)
        attention = self.block_causal_attention(length)
        cond = self.adaln_condition(cond_BD)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:  # per block, so that it composes with FSDP2's per-block sharding
                x_BLC = checkpoint(block, x_BLC, cond, attention, None, context, use_reentrant=False)
            else:
                x_BLC = block(x_BLC, cond, attention, context=context)
        return self.get_logits(x_BLC, cond_BD)

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), the count of :mod:`varlib.models.flops`: 6 N over
        the per-token linear layers (not the embeddings, not AdaLN, which runs once per image) plus the
        block-causal attention."""
        return flops_per_token(per_token_linear_params(self), self.depth, self.width, self.patch_nums)

    # -- inference -------------------------------------------------------------------------------

    def generate_tokens(
        self, labels, cfg: float | None = None, top_k: int | None = None, top_p: float | None = None, *,
        cfg_until: int | None = None, prune: float | None = None, stop_after: int | None = None, **kwargs
    ) -> SampleOutput:
        """Samples token maps; see :func:`varlib.models.sampling.sample_token_maps` for the arguments. The sampling
        settings (``cfg``, ``top_k``, ``top_p``, ``cfg_until``, ``prune``, ``stop_after``) left out (None) come
        from :attr:`sampling` (:meth:`SamplingConfig.resolve`)."""
        settings = self.sampling.resolve(cfg=cfg, top_k=top_k, top_p=top_p, cfg_until=cfg_until, prune=prune,
                                         stop_after=stop_after)
        return sample_token_maps(self, labels, **settings, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        labels,
        cfg: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        more_smooth: bool = False,
        batch_size: int | None = None,
        compile: bool | str = False,
        negative=None,
        cfg_until: int | None = None,
        prune: float | None = None,
        stop_after: int | None = None,
        draft: Draft | None = None,
    ) -> torch.Tensor:
        """Class- or text-conditional sampling (KV cache, guidance ramp, top-k/top-p).

        The sampling settings (``cfg``, ``top_k``, ``top_p``, ``cfg_until``, ``prune``, ``stop_after``) left out
        (None) come from :attr:`sampling`, the model's recommended settings that its file carries; given ones win.

        Args:
            labels: (B,) class indices in [0, num_classes] (num_classes = unconditional), a list, or one
                int together with ``batch_size``; class names (of :attr:`class_names`) stand for their indices.
                A text model takes prompts instead: a list of str, or one str together with ``batch_size``.
            cfg: guidance strength at the last scale; scale k uses t = cfg * k/(K-1) (0: no guidance).
            top_k, top_p: 0 disables either filter. seed: seeds a private ``torch.Generator``.
            more_smooth: Gumbel-softmax smoothing of the code embeddings (visual quality, not for FID).
            compile: compile each scale's transformer step (see :func:`varlib.models.sampling.sample_token_maps`).
            negative: what guidance steers away from instead of the null condition: negative prompts (one, or one
                per image) for a text model, classes for a class model.
            cfg_until, prune, stop_after, draft: the fast, approximate options (neutral: None, 1.0, None, None):
                guidance on the first ``cfg_until`` scales only; FastVAR's keep ratio at the last scales; decode
                after the first ``stop_after`` scales; a :class:`~varlib.models.sampling.Draft` (another VAR of
                the same tokenizer) samples the first scales. See :func:`varlib.models.sampling.sample_token_maps`.
        Returns:
            (B,3,H,W) images in [0,1].
        """
        out = self.generate_tokens(labels, cfg, top_k, top_p, seed=seed, more_smooth=more_smooth,
                                   batch_size=batch_size, compile=compile, negative=negative, cfg_until=cfg_until,
                                   prune=prune, stop_after=stop_after, draft=draft)
        return self.vae.fhat_to_img(out.f_hat).add_(1).mul_(0.5)

    @torch.no_grad()
    def edit(self, images: torch.Tensor, keep_mask: torch.Tensor, labels, seed: int | None = 0,
             **options) -> torch.Tensor:
        """Zero-shot in-painting, out-painting or class- or text-conditional editing (the official method).

        The ground-truth tokens of ``images`` are teacher-forced wherever ``keep_mask`` is 1 at every
        scale (the 1x1 scale always), and the model generates the rest conditioned on ``labels``.

        Args:
            images: (B,3,H,W) in [-1,1] at the schedule's resolution.
            keep_mask: (H',W') or (B,H',W') in [0,1], 1 = keep; at the final token grid or any multiple of
                it (e.g. the image resolution). See ``varlib.models.editing.box_keep_mask``.
            labels: classes or prompts as in :meth:`generate` (one is used for every image); ``num_classes``
                (null) for unconditional in-/out-painting.
            seed: seeds a private ``torch.Generator``.
            options: ``cfg``, ``top_k``, ``top_p``, ``more_smooth``, ``negative``, ``cfg_until``, ``prune``,
                ``stop_after``, ``draft``, as :meth:`generate` (left out: the model's :attr:`sampling`).
        Returns:
            (B,3,H,W) edited images in [0,1].
        """
        tokens = self.vae.encode_tokens(images, self.patch_nums)
        B = images.shape[0]
        grid = token_grid_mask(keep_mask.to(images.device), self.patch_nums[-1])
        if grid.shape[0] not in (1, B):
            raise ValueError(f"keep mask batch {grid.shape[0]} does not match the {B} images")
        keep = [m.expand(B, -1, -1) for m in keep_masks_per_scale(grid, self.patch_nums)]
        out = self.generate_tokens(labels, seed=seed, batch_size=B, constraint=TokenConstraint(tokens, keep),
                                   **options)
        return self.vae.fhat_to_img(out.f_hat).add_(1).mul_(0.5)
