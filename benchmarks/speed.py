"""Speed benchmark of varlib: sampling, a training step and the tokenizer, optionally beside the official code.

Figures (each the median over ``--steps`` timed calls after ``--warmup`` untimed ones, CUDA synchronised;
with the official code, the two implementations' calls alternate, so both see the same machine load):

- ``sampling_images_per_s``, ``sampling_latency_s``: ``var.generate(labels, cfg=1.5, top_k=900, top_p=0.96,
  seed=0)`` on ``--batch`` labels, i.e. all K scales with the KV cache, guidance (2B rows) and the
  tokenizer's decoder; latency is seconds per batch.
- ``train_tokens_per_s``, ``train_step_s``: one step of forward + cross-entropy + backward + AdamW on
  ``--train-batch`` sequences of L tokens (tokens/s = B*L / step seconds). The teacher-forcing input is
  precomputed from random tokens (``vae.teacher_forcing_input``), so the tokenizer is not timed here.
- ``train_peak_mem_mib``: how far tensor memory rose above its level before training (gradients, AdamW
  state, activations) during the warm-up steps (at least two): the CUDA allocator's peak, or on CPU the peak
  of the live tensor bytes (see :class:`measurements.PeakMemory`).
- ``train_mfu``: model FLOPs utilisation against the device's dense bf16 peak (``--peak-tflops``; known
  defaults for H100/H200/A100); the FLOP count is :mod:`varlib.models.flops`'s. Printed on CUDA, or wherever
  ``--peak-tflops`` is given.
- ``encode_images_per_s``, ``decode_images_per_s``: ``vae.encode_tokens`` (image -> K token maps, always
  fp32) and ``vae.decode_tokens`` (K token maps -> image, in ``--dtype``) on ``--batch`` random images.

Weights are random (seed 0) unless ``--vae-ckpt``/``--var-ckpt`` name official checkpoints. With
``--official-repo PATH`` (a local checkout of github.com/FoundationVision/VAR) the official models receive
the same weights, run the same measurements, and the script prints varlib/official ratios and checks that
both give the same logits and greedy samples (see :mod:`official_runner`).

Usage (from the repository root)::

    python benchmarks/speed.py --depth 2 --batch 2 --train-batch 4 --vae-ch 32 --steps 3 --warmup 1
    python benchmarks/speed.py --depth 16 --official-repo ../VAR --json speed.json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import torch

from measurements import (
    Contender,
    RunSettings,
    default_peak_tflops,
    measure_sampling,
    measure_tokenizer,
    measure_training,
)
from official_runner import (
    OfficialUnavailable,
    build_official,
    check_outputs,
    import_official_models,
    official_contender,
)
import varlib
from varlib import VAR, MultiScaleVQVAE, VARConfig
from varlib.models.attention import ATTN_IMPLS
from varlib.models.flops import per_token_linear_params, visible_keys_per_query
from varlib.models.patch_schedules import PRESETS, sequence_length, validate_patch_nums

MEASUREMENTS = ("sampling", "train", "tokenizer")
#: The sampler settings timed (the paper's ImageNet 256 evaluation settings).
SAMPLER = dict(cfg=1.5, top_k=900, top_p=0.96, seed=0)
#: (key, printed name) of every figure, in printing order.
FIGURES = (
    ("sampling_images_per_s", "sampling images/s"),
    ("sampling_latency_s", "sampling s/batch"),
    ("train_tokens_per_s", "train tokens/s"),
    ("train_step_s", "train s/step"),
    ("train_peak_mem_mib", "train peak mem MiB"),
    ("train_mfu", "train MFU"),
    ("encode_images_per_s", "encode images/s"),
    ("decode_images_per_s", "decode images/s"),
)


# -- arguments ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses and validates the command line; exits with a usage error naming expected vs got."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                        help="bf16 runs under autocast (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--depth", type=int, default=16, help="VAR depth (width 64*depth); ignored with --var-ckpt")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--attn-impl", choices=ATTN_IMPLS, default="auto",
                        help="varlib's teacher-forced attention (auto: flex on CUDA, prefix on CPU; dense = reference)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="varlib recomputes each block in the backward (the official code cannot)")
    parser.add_argument("--batch", type=int, default=8, help="images per sampling / tokenizer batch")
    parser.add_argument("--train-batch", type=int, default=32, help="sequences per training step")
    parser.add_argument("--resolution", type=int, choices=(256, 512), default=256, help="patch schedule preset")
    parser.add_argument("--patch-nums", default=None, help="a custom schedule instead, e.g. 1,2,3,4 (64px images)")
    parser.add_argument("--vae-ch", type=int, default=160, help="tokenizer base width (official 160; a multiple of 32)")
    parser.add_argument("--steps", type=int, default=10, help="timed calls per figure")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    parser.add_argument("--skip", default="",
                        help=f"comma-separated measurements to skip, among {','.join(MEASUREMENTS)}")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device's dense bf16 peak for MFU (default by GPU name: H100/H200 989, A100 312)")
    parser.add_argument("--vae-ckpt", default=None, help="official tokenizer checkpoint (vae_ch160v4096z32.pth)")
    parser.add_argument("--var-ckpt", default=None, help="official VAR checkpoint (var_d16.pth, ...)")
    parser.add_argument("--official-repo", default=None, help="local checkout of FoundationVision/VAR to compare with")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    try:
        custom = args.patch_nums
        args.patch_nums = validate_patch_nums(custom.split(",")) if custom else PRESETS[args.resolution]
    except ValueError as error:
        parser.error(f"--patch-nums expects comma-separated increasing integers: {error}")
    args.skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    if not args.skip <= set(MEASUREMENTS):
        parser.error(f"--skip expects names among {MEASUREMENTS}, got {sorted(args.skip)}")
    for name in ("depth", "num_classes", "batch", "train_batch", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.vae_ch < 32 or args.vae_ch % 32:
        parser.error(f"--vae-ch must be a positive multiple of 32 (GroupNorm groups), got {args.vae_ch}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error(f"--peak-tflops must be > 0, got {args.peak_tflops}")

    try:
        args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        parser.error(f"--device expects cpu or cuda[:N]: {error}")
    if args.device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but torch sees no CUDA device")
    args.dtype = args.dtype or ("bf16" if args.device.type == "cuda" else "fp32")
    if args.peak_tflops is None and args.device.type == "cuda" and "train" not in args.skip:
        name = torch.cuda.get_device_name(args.device)
        args.peak_tflops = default_peak_tflops(name)
        if args.peak_tflops is None:
            parser.error(f"no known bf16 peak for GPU '{name}': pass --peak-tflops for the MFU figure")
    return args


# -- models and inputs ------------------------------------------------------------------------------


def build_models(args: argparse.Namespace) -> tuple[MultiScaleVQVAE, VAR]:
    """varlib's tokenizer (frozen) and transformer on ``args.device``: random (seed 0) or from checkpoints."""
    with torch.random.fork_rng(devices=[]):  # seeded weights without resetting the caller's global RNG
        torch.manual_seed(0)
        if args.vae_ckpt:
            vae = varlib.load(args.vae_ckpt, patch_nums=args.patch_nums)
        else:
            vae = MultiScaleVQVAE(ch=args.vae_ch, patch_nums=args.patch_nums)
        vae.eval().requires_grad_(False)
        if args.var_ckpt:
            var = varlib.load(args.var_ckpt, vae=vae)
        else:
            var = VAR(vae, VARConfig(depth=args.depth, num_classes=args.num_classes))
    var.attn_impl, var.activation_checkpointing = args.attn_impl, args.activation_checkpointing
    if var.patch_nums != vae.patch_nums:
        raise ValueError(f"the VAR checkpoint's schedule {var.patch_nums} is not the tokenizer's {vae.patch_nums}; "
                         f"pass the matching --resolution or --patch-nums")
    return vae, var.to(args.device)


def make_inputs(vae: MultiScaleVQVAE, var: VAR, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Random inputs (seed 0): training labels/teacher-forcing input/targets, sampling labels, images."""
    generator = torch.Generator().manual_seed(0)
    B = args.train_batch
    tokens = [torch.randint(var.vocab_size, (B, pn * pn), generator=generator).to(args.device) for pn in var.patch_nums]
    with torch.no_grad():
        x_BLCv = vae.teacher_forcing_input(tokens)
    side = vae.image_size
    return {
        "train_labels_B": torch.randint(var.num_classes, (B,), generator=generator).to(args.device),
        "x_BLCv": x_BLCv,
        "targets_BL": torch.cat(tokens, dim=1),
        "sample_labels_B": (torch.arange(args.batch) % var.num_classes).to(args.device),
        "images_B3HW": (torch.rand(args.batch, 3, side, side, generator=generator) * 2 - 1).to(args.device),
    }


def varlib_contender(vae: MultiScaleVQVAE, var: VAR) -> Contender:
    def sample(labels_B: torch.Tensor) -> torch.Tensor:
        return var.generate(labels_B, **SAMPLER)

    return Contender(name="varlib", transformer=var, train_forward=var, sample=sample,
                     encode=vae.encode_tokens, decode=vae.decode_tokens)


# -- running and reporting --------------------------------------------------------------------------


def run_measurements(
    contenders: Sequence[Contender], inputs: dict[str, torch.Tensor], run: RunSettings, skip: set[str],
    flops_per_token: float, peak_tflops: float | None,
) -> dict[str, dict[str, float | None]]:
    """Every figure of every contender (name -> figures). Training runs first, so that a CPU peak-RSS
    increase is observable."""
    measurements = {
        "train": lambda: measure_training(contenders, inputs["train_labels_B"], inputs["x_BLCv"],
                                          inputs["targets_BL"], run, flops_per_token, peak_tflops),
        "sampling": lambda: measure_sampling(contenders, inputs["sample_labels_B"], run),
        "tokenizer": lambda: measure_tokenizer(contenders, inputs["images_B3HW"], run),
    }
    figures: dict[str, dict[str, float | None]] = {c.name: {} for c in contenders}
    for name, measure in measurements.items():
        if name not in skip:
            for contender, measured in zip(contenders, measure()):
                figures[contender.name].update(measured)
    return figures


def ratios(ours: dict[str, float | None], theirs: dict[str, float | None]) -> dict[str, float]:
    """varlib / official for every figure both have (> 1: varlib's figure is larger)."""
    return {k: ours[k] / theirs[k] for k in ours if ours[k] is not None and theirs.get(k) not in (None, 0)}


def _show(key: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%}" if key == "train_mfu" else f"{value:.4g}"


def format_report(result: dict) -> str:
    """The settings line and the figures table (with the official columns when present)."""
    s = result["settings"]
    lines = [
        f"device {s['device_name']} ({s['device']}), {s['dtype']}, torch {s['torch']}",
        f"VAR depth {s['depth']} (C={s['width']}, {s['params'] / 1e6:.1f}M params), {s['resolution']}px, "
        f"L={s['L']}, L_eff={s['L_eff']:.1f}, tokenizer ch={s['vae_ch']}; batch {s['batch']}, train batch "
        f"{s['train_batch']}; median of {s['steps']} after {s['warmup']} warm-up",
        f"varlib attention {s['attn_impl']}, activation checkpointing {'on' if s['activation_checkpointing'] else 'off'}",
    ]
    official, rat = result.get("official"), result.get("ratios", {})
    header = f"{'figure':<22}{'varlib':>12}" + (f"{'official':>12}{'varlib/off.':>13}" if official else "")
    lines += ["", header, "-" * len(header)]
    for key, name in FIGURES:
        if key not in result["varlib"]:
            continue
        row = f"{name:<22}{_show(key, result['varlib'][key]):>12}"
        if official:
            row += f"{_show(key, official.get(key)):>12}" + (f"{rat[key]:>13.3f}" if key in rat else f"{'n/a':>13}")
        lines.append(row)
    if result.get("checks"):
        checks = ", ".join(f"{k}={v}" if isinstance(v, int) else f"{k}={v:.3g}" for k, v in result["checks"].items())
        lines += ["", f"output checks (fp32, eval): {checks}"]
    if result.get("official_skipped"):
        lines += ["", f"official comparison skipped: {result['official_skipped']}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark and prints its report; returns {settings, varlib, official, ratios, checks, ...}.

    Figures not measured are absent; those that cannot be known (CPU memory, MFU without a peak) are None.
    """
    args = parse_args(argv)
    vae, var = build_models(args)
    inputs = make_inputs(vae, var, args)
    run = RunSettings(args.device, torch.bfloat16 if args.dtype == "bf16" else None, args.steps, args.warmup)
    flops_per_token = var.flops_per_token()
    result: dict = {"settings": {
        "device": str(args.device), "dtype": args.dtype, "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu",
        "depth": var.depth, "width": var.width, "params": sum(p.numel() for p in var.parameters()),
        "per_token_params": per_token_linear_params(var), "flops_per_token": flops_per_token,
        "resolution": vae.image_size, "patch_nums": list(var.patch_nums), "L": sequence_length(var.patch_nums),
        "L_eff": visible_keys_per_query(var.patch_nums), "vae_ch": vae.config["ch"], "batch": args.batch,
        "train_batch": args.train_batch, "steps": args.steps, "warmup": args.warmup, "peak_tflops": args.peak_tflops,
        "sampler": SAMPLER, "attn_impl": args.attn_impl, "activation_checkpointing": args.activation_checkpointing,
    }}

    contenders = [varlib_contender(vae, var)]
    official = None
    if args.official_repo:
        try:
            off_vae, off_var = build_official(import_official_models(args.official_repo), vae, var, args.device)
            official = official_contender(off_vae, off_var, **SAMPLER)
            contenders.append(official)
        except OfficialUnavailable as reason:
            result["official_skipped"] = str(reason)

    if official is not None:  # before training changes the two models' weights differently
        n = min(2, args.batch, args.train_batch)
        result["checks"] = check_outputs(var, off_vae, off_var, inputs["train_labels_B"][:n], inputs["x_BLCv"][:n],
                                         inputs["images_B3HW"][:n], SAMPLER["cfg"])
    figures = run_measurements(contenders, inputs, run, args.skip, flops_per_token, args.peak_tflops)
    result["varlib"] = figures["varlib"]
    if official is not None:
        result["official"] = figures["official"]
        result["ratios"] = ratios(figures["varlib"], figures["official"])
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2, allow_nan=False)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
