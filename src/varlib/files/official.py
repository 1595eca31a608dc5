"""Loading the official FoundationVision/VAR checkpoints into varlib's models, strictly and safely.

Files (huggingface.co/FoundationVision/var): ``vae_ch160v4096z32.pth`` (the tokenizer shared by all models),
``var_d16/20/24/30.pth`` (256px) and ``var_d36.pth`` (512px, shared AdaLN). The architecture is inferred from
the weights and loading fails on any key mismatch. These functions take state dicts; ``varlib.load`` opens the
files (``torch.load(weights_only=True)`` or safetensors) and calls them.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from varlib.models.pretrained import load_strict
from varlib.models.patch_schedules import PRESETS, sequence_length
from varlib.models.sampling import SamplingConfig
from varlib.models.transformer import VAR, VARConfig
from varlib.models.vqvae import MultiScaleVQVAE

StateDict = Mapping[str, torch.Tensor]
# The settings the official models' FID/IS were measured with (official README): SamplingConfig's defaults.
OFFICIAL_SAMPLING = SamplingConfig()


def plain_state_dict(source: StateDict, what: str) -> StateDict:
    """``source`` when it maps names to tensors; raises TypeError for paths (files open with ``varlib.load``) and
    ValueError for other mappings."""
    if not isinstance(source, Mapping):
        raise TypeError(f"{what} takes a state dict, got a {type(source).__name__}; "
                        "open checkpoint files with varlib.load(path), which reads official files too")
    if not all(isinstance(v, torch.Tensor) for v in source.values()):
        raise ValueError(f"{what}: expected a plain state dict (a mapping of names to tensors), got other values")
    return source


def _count(prefix_pattern: str, keys) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(prefix_pattern, k))}
    return max(found) + 1 if found else 0


def vqvae_config_from_state_dict(sd: StateDict) -> dict:
    """The ``MultiScaleVQVAE`` arguments implied by an official tokenizer state dict."""
    if "quantize.embedding.weight" not in sd or "encoder.conv_in.weight" not in sd:
        raise ValueError("not a VQVAE state dict: expected keys 'quantize.embedding.weight' and 'encoder.conv_in.weight'")
    vocab_size, z_channels = sd["quantize.embedding.weight"].shape
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = _count(r"encoder\.down\.(\d+)\.", sd)
    ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    num_phi = _count(r"quantize\.quant_resi\.qresi_ls\.(\d+)\.", sd)
    num_scales = sd["quantize.ema_vocab_hit_SV"].shape[0] if "quantize.ema_vocab_hit_SV" in sd else 10
    patch_nums = next((p for p in PRESETS.values() if len(p) == num_scales), PRESETS[256])
    return dict(
        vocab_size=int(vocab_size), z_channels=int(z_channels), ch=int(ch), ch_mult=ch_mult,
        num_res_blocks=_count(r"encoder\.down\.0\.block\.(\d+)\.", sd),
        using_sa=f"encoder.down.{levels - 1}.attn.0.qkv.weight" in sd,
        using_mid_sa="encoder.mid.attn_1.qkv.weight" in sd,
        share_quant_resi=num_phi, patch_nums=patch_nums,
    )


def load_official_vqvae(source: StateDict, **overrides) -> MultiScaleVQVAE:
    """Builds the tokenizer from an official state dict, in eval mode and frozen (``varlib.load`` opens the files).

    ``overrides`` replace inferred constructor arguments (e.g. ``patch_nums``).
    """
    sd = plain_state_dict(source, "load_official_vqvae")
    vae = MultiScaleVQVAE(**{**vqvae_config_from_state_dict(sd), **overrides})
    load_strict(vae, sd, "MultiScaleVQVAE")
    return vae.eval().requires_grad_(False)


def schedules_of_length(length: int, num_scales: int) -> list[tuple[int, ...]]:
    """Every strictly increasing schedule (1, ...) of ``num_scales`` scales with L = sum pn^2 = ``length``."""
    found = []

    def extend(prefix: tuple[int, ...], remaining: int) -> None:
        left = num_scales - len(prefix)
        if left == 0:
            if remaining == 0:
                found.append(prefix)
            return
        pn = prefix[-1] + 1
        while left * pn * pn <= remaining:  # the smallest continuation still fits
            extend(prefix + (pn,), remaining - pn * pn)
            pn += 1

    if num_scales >= 1 and length >= 1:
        extend((1,), length - 1)
    return found


def var_config_from_state_dict(sd: StateDict, vae_patch_nums=None) -> dict:
    """The :class:`~varlib.models.transformer.VARConfig` fields implied by an official transformer state dict (depth,
    classes, AdaLN, schedule).

    The schedule is the tokenizer's own when its length L matches ``pos_1LC``, else the preset that does, else the
    only increasing schedule of ``lvl_embed``'s scale count with that L (a file trained at another schedule than
    its tokenizer's, which fine-tuning maps to the tokenizer's).
    """
    if "class_emb.weight" not in sd or "pos_1LC" not in sd:
        raise ValueError("not a VAR state dict: expected keys 'class_emb.weight' and 'pos_1LC'")
    depth = _count(r"blocks\.(\d+)\.", sd)
    width = sd["class_emb.weight"].shape[1]
    length = sd["pos_1LC"].shape[1]
    candidates = ([tuple(vae_patch_nums)] if vae_patch_nums else []) + list(PRESETS.values())
    schedules = [p for p in candidates if sequence_length(p) == length]
    if not schedules and "lvl_embed.weight" in sd:
        unique = schedules_of_length(length, sd["lvl_embed.weight"].shape[0])
        schedules = unique if len(unique) == 1 else []
    if not schedules:
        raise ValueError(f"no known patch schedule has L = {length} tokens (known: "
                         f"{ {r: sequence_length(p) for r, p in PRESETS.items()} }); pass patch_nums explicitly")
    return dict(
        depth=depth, num_classes=sd["class_emb.weight"].shape[0] - 1, width=width,
        num_heads=sd["blocks.0.attn.scale_mul_1H11"].shape[1] if "blocks.0.attn.scale_mul_1H11" in sd else depth,
        shared_aln="shared_ada_lin.1.weight" in sd, attn_l2_norm="blocks.0.attn.scale_mul_1H11" in sd,
        patch_nums=schedules[0],
    )


def load_official_var(source: StateDict, vae: MultiScaleVQVAE, **overrides) -> VAR:
    """Builds the VAR transformer from an official state dict on top of ``vae``, in eval mode (``varlib.load``
    opens the files).

    Depth, width, heads, classes, shared AdaLN and the patch schedule (256px or 512px) are inferred from
    the weights; ``overrides`` replace any of them. ``sampling`` is set to the official FID settings.
    """
    sd = plain_state_dict(source, "load_official_var")
    config = VARConfig.from_dict({**var_config_from_state_dict(sd, vae.patch_nums), **overrides}, "load_official_var")
    if config.width != 64 * config.depth and "width" not in overrides:
        raise ValueError(f"unexpected width {config.width} for depth {config.depth} (official: 64 * depth)")
    if sd["word_embed.weight"].shape[1] != vae.z_channels or sd["head.weight"].shape[0] != vae.vocab_size:
        raise ValueError(
            f"checkpoint expects a tokenizer with Cvae={sd['word_embed.weight'].shape[1]} and V={sd['head.weight'].shape[0]}, "
            f"got Cvae={vae.z_channels} and V={vae.vocab_size}"
        )
    var = VAR(vae, config)
    load_strict(var, sd, f"VAR(depth={config.depth})")
    var.sampling = OFFICIAL_SAMPLING
    return var.eval()
