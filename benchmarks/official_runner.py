"""Runs the official FoundationVision/VAR code side by side with varlib, on varlib's own weights.

The official ``models`` package is imported from a local checkout (never vendored). Its ``build_vae_var``
globally replaces ``reset_parameters`` of torch's Linear/Conv/norm classes with no-ops, so it is not used:
the official ``VQVAE`` and ``VAR`` are constructed directly, which patches nothing, and then receive
varlib's state dicts (the key layouts are identical, loaded strictly). The official VAR creates its
sampling generator on CUDA whenever CUDA exists; it is replaced by one on the benchmark's device.

The official code imports ``huggingface_hub`` (in ``models/var.py``); it must be installed to run it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Sequence

import torch
import torch.nn as nn

from measurements import Contender
from varlib import VAR, MultiScaleVQVAE

#: Third-party modules the official ``models`` package imports at import time (besides torch and numpy).
OFFICIAL_IMPORTS = ("huggingface_hub",)
#: The CNN the official VQVAE hard-codes (latent-diffusion vq-f16).
OFFICIAL_VQVAE_CNN = dict(ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, using_sa=True, using_mid_sa=True, in_channels=3)


class OfficialUnavailable(RuntimeError):
    """The official code cannot run here; the message says why."""


def import_official_models(repo: str | Path) -> ModuleType:
    """Imports the official ``models`` package (and its top-level ``dist`` module) from a checkout.

    The checkout is on ``sys.path`` only while importing; the modules stay in ``sys.modules`` as ``models``
    and ``dist`` afterwards. Raises OfficialUnavailable when the path is not a checkout, a dependency is
    missing, or another ``models``/``dist`` module is already imported.
    """
    repo = Path(repo).resolve()
    if not (repo / "models" / "var.py").is_file() or not (repo / "dist.py").is_file():
        raise OfficialUnavailable(
            f"{repo} is not a checkout of FoundationVision/VAR: expected models/var.py and dist.py")
    missing = [name for name in OFFICIAL_IMPORTS if importlib.util.find_spec(name) is None]
    if missing:
        raise OfficialUnavailable(
            f"the official code imports {missing}, which is not installed (pip install {' '.join(missing)})")
    for name in ("models", "dist"):
        loaded = sys.modules.get(name)
        if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(str(repo)):
            raise OfficialUnavailable(f"a different top-level module '{name}' is already imported ({loaded.__file__})")
    sys.path.insert(0, str(repo))
    try:
        return importlib.import_module("models")
    except ImportError as error:
        raise OfficialUnavailable(f"the official code at {repo} failed to import: {error}") from error
    finally:
        sys.path.remove(str(repo))


def _load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        message = f"varlib's state dict does not load strictly into the official {what}: {error}"
        raise OfficialUnavailable(message) from error


def build_official(
    models: ModuleType, vae: MultiScaleVQVAE, var: VAR, device: torch.device
) -> tuple[nn.Module, nn.Module]:
    """The official (VQVAE, VAR) with the same configuration and weights as varlib's, on ``device``.

    The official VAR gets ``cond_drop_rate=0``: its forward drops labels even in eval mode.
    Raises OfficialUnavailable when the tokenizer's CNN is not the one the official VQVAE hard-codes.
    """
    vc = vae.config
    odd = {k: vc[k] for k, v in OFFICIAL_VQVAE_CNN.items() if vc[k] != v}
    if odd:
        raise OfficialUnavailable(f"the official VQVAE hard-codes {OFFICIAL_VQVAE_CNN}; this tokenizer has {odd}")
    off_vae = models.VQVAE(
        vocab_size=vc["vocab_size"], z_channels=vc["z_channels"], ch=vc["ch"], dropout=vc["dropout"], beta=vc["beta"],
        quant_resi=vc["quant_resi"], share_quant_resi=vc["share_quant_resi"], v_patch_nums=tuple(vae.patch_nums),
        test_mode=True,
    )
    _load_strict(off_vae, vae.state_dict(), "VQVAE")
    tc = var.config
    with contextlib.redirect_stdout(io.StringIO()):  # the constructor prints a configuration banner
        off_var = models.VAR(
            off_vae, num_classes=tc["num_classes"], depth=tc["depth"], embed_dim=tc["width"], num_heads=tc["num_heads"],
            mlp_ratio=tc["mlp_ratio"], drop_rate=tc["drop_rate"], attn_drop_rate=tc["attn_drop_rate"],
            drop_path_rate=tc["drop_path_rate"], norm_eps=tc["norm_eps"], shared_aln=tc["shared_aln"],
            cond_drop_rate=0.0, attn_l2_norm=tc["attn_l2_norm"], patch_nums=tuple(var.patch_nums),
        )
    _load_strict(off_var, var.state_dict(), "VAR")
    off_vae.to(device)
    off_var.to(device)
    off_var.rng = torch.Generator(device=device)
    return off_vae, off_var


def _quietly(fn):
    """Calls ``fn`` with the official code's deprecation warnings (``torch.cuda.amp.autocast``) silenced."""
    def wrapped(*args):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return fn(*args)
    return wrapped


def official_contender(
    off_vae: nn.Module, off_var: nn.Module, cfg: float, top_k: int, top_p: float, seed: int
) -> Contender:
    """The official implementation as a :class:`Contender` (sampler arguments as for varlib)."""

    def sample(labels_B: torch.Tensor) -> torch.Tensor:
        return off_var.autoregressive_infer_cfg(labels_B.shape[0], labels_B, g_seed=seed, cfg=cfg, top_k=top_k,
                                                top_p=top_p, more_smooth=False)

    def decode(tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        return off_vae.idxBl_to_img(list(tokens), same_shape=True, last_one=True)

    return Contender(name="official", transformer=off_var, train_forward=_quietly(off_var.forward),
                     sample=_quietly(sample), encode=off_vae.img_to_idxBl, decode=decode)


@torch.no_grad()
def official_greedy(
    off_var: nn.Module, labels_B: torch.Tensor, cfg: float, num_scales: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Greedy (top_k=1) official sampling: (K token maps (B,pn^2), images (B,3,H,W) in [0,1]).

    The official sampler returns only images; with top_k=1 each token is the argmax of the guided logits,
    so the tokens are recovered from the head's outputs, captured by a forward hook on this instance.
    """
    B = labels_B.shape[0]
    head_outputs = []
    hook = off_var.head.register_forward_hook(lambda module, inputs, out: head_outputs.append(out.float()))
    sample = _quietly(off_var.autoregressive_infer_cfg)
    try:
        images = sample(B, labels_B, 0, cfg, 1, 0.0, False)  # B, label_B, g_seed, cfg, top_k, top_p, more_smooth
    finally:
        hook.remove()
    tokens = []
    for si, logits_2BlV in enumerate(head_outputs):
        t = cfg * si / (num_scales - 1)
        tokens.append(((1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]).argmax(dim=-1))
    return tokens, images


@torch.no_grad()
def check_outputs(
    var: VAR, off_vae: nn.Module, off_var: nn.Module, labels_B: torch.Tensor, x_BLCv: torch.Tensor,
    images_B3HW: torch.Tensor, cfg: float,
) -> dict[str, float | int]:
    """Compares varlib with the official code in fp32, in eval mode.

    Returns:
        logits_max_abs_diff: teacher-forced forward logits (B,L,V).
        greedy_token_mismatches / greedy_tokens: differing tokens of greedy (top_k=1) guided sampling.
        greedy_image_max_abs_diff: the two samplers' images in [0,1].
        encode_token_mismatches / encode_tokens: differing tokens of the tokenizer's encoding of ``images``.
    """
    var.eval()
    off_var.eval()
    logits_diff = (var(labels_B, x_BLCv) - _quietly(off_var.forward)(labels_B, x_BLCv)).abs().max().item()
    ours = var.generate_tokens(labels_B, cfg=cfg, top_k=1, seed=0)
    our_images = var.vae.fhat_to_img(ours.f_hat).add_(1).mul_(0.5)
    theirs, their_images = official_greedy(off_var, labels_B, cfg, len(var.patch_nums))
    our_codes, their_codes = var.vae.encode_tokens(images_B3HW), off_vae.img_to_idxBl(images_B3HW)
    return {
        "logits_max_abs_diff": logits_diff,
        "greedy_token_mismatches": sum(int((a != b).sum()) for a, b in zip(ours.tokens, theirs)),
        "greedy_tokens": sum(t.numel() for t in ours.tokens),
        "greedy_image_max_abs_diff": (our_images - their_images).abs().max().item(),
        "encode_token_mismatches": sum(int((a != b).sum()) for a, b in zip(our_codes, their_codes)),
        "encode_tokens": sum(t.numel() for t in our_codes),
    }
