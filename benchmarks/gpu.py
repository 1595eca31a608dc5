"""One command for a lent GPU (about 5 minutes on an H100/H200): VAR-d16 and d30 training, d16 sampling.

Prints, for varlib and (given ``--official-repo``) the official code on the same random weights, in bf16:

- training of d16 and d30 at 256px: tokens/s, MFU, peak memory (``--train-batches``, one per depth);
- d16 sampling images/s at batch 1, 8 and 64 (``--sample-batches``; cfg 1.5, top-k 900, top-p 0.96);
- the largest d16 training batch that fits, for each implementation (``--max-batch``, a doubling search);
- output checks: varlib's FlexAttention logits and gradients against its dense reference (fp32), and
  with the official code the fp32 logits and greedy samples of :func:`official_runner.check_outputs`;
- varlib/official ratios and the issue's GPU targets (d16 training tokens/s >= 2x, MFU >= 45%, sampling
  at batch 64 >= 2x, largest batch >= 1.5x).

Every figure comes from :mod:`speed` (same timing loop, same FLOP count). Usage, from the repository root::

    python benchmarks/gpu.py --official-repo /tmp/official_var --json gpu.json
    python benchmarks/gpu.py --depths 16 --sample-batches 64 --steps 5     # a quicker subset
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import torch
import torch.nn.functional as F

from measurements import RunSettings, synchronize, training_step
from speed import build_models, make_inputs, varlib_contender
import speed

#: The issue's GPU targets: figure -> minimum of varlib/official (MFU: an absolute minimum).
TARGETS = {"d16 train tokens/s": 2.0, "d16 train MFU": 0.45, "d16 sampling images/s @64": 2.0, "d16 max train batch": 1.5}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses and validates the command line; a bad value is a usage error naming expected vs got."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (cpu only for a smoke run)")
    parser.add_argument("--depths", default="16,30", help="training depths, comma-separated")
    parser.add_argument("--train-batches", default="64,16", help="training batch per depth, comma-separated")
    parser.add_argument("--sample-batches", default="1,8,64", help="d16 sampling batches, comma-separated")
    parser.add_argument("--max-batch", type=int, default=1024,
                        help="upper bound of the largest-batch search (0 skips the search)")
    parser.add_argument("--vae-ch", type=int, default=160)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default by GPU name)")
    parser.add_argument("--official-repo", default=None, help="local checkout of FoundationVision/VAR")
    parser.add_argument("--json", default=None, help="also write every result to this JSON file")
    args = parser.parse_args(argv)
    try:
        args.depths = _positive_ints(args.depths)
        args.train_batches = _positive_ints(args.train_batches)
        args.sample_batches = _positive_ints(args.sample_batches)
    except ValueError as error:
        parser.error(str(error))
    if len(args.train_batches) != len(args.depths):
        parser.error(f"--train-batches needs one batch per depth ({len(args.depths)}), got {len(args.train_batches)}")
    if args.max_batch < 0 or args.steps < 1 or args.warmup < 0:
        parser.error(f"expected --max-batch >= 0, --steps >= 1, --warmup >= 0; got {args.max_batch}, "
                     f"{args.steps}, {args.warmup}")
    return args


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"expected comma-separated positive integers, got {text!r}")
    return values


def speed_runs(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(label, :func:`speed.main` arguments) of every timed run: training per depth, then d16 sampling."""
    common = ["--device", args.device, "--vae-ch", str(args.vae_ch), "--steps", str(args.steps),
              "--warmup", str(args.warmup)]
    common += ["--official-repo", args.official_repo] if args.official_repo else []
    common += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
    runs = [(f"d{depth} train", ["--depth", str(depth), "--train-batch", str(batch), "--batch", "1",
                                 "--skip", "sampling,tokenizer", *common])
            for depth, batch in zip(args.depths, args.train_batches)]
    runs += [(f"d16 sampling @{batch}", ["--depth", "16", "--batch", str(batch), "--train-batch", "1",
                                         "--skip", "train,tokenizer", *common])
             for batch in args.sample_batches]
    return runs


def summarize(results: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """Figure name -> {varlib, official, ratio} from the :func:`speed.main` results keyed by run label."""
    rows: dict[str, dict[str, float | None]] = {}

    def add(name: str, result: dict, key: str) -> None:
        ours, theirs = result["varlib"].get(key), result.get("official", {}).get(key)
        rows[name] = {"varlib": ours, "official": theirs, "ratio": result.get("ratios", {}).get(key)}

    for label, result in results.items():
        if label.endswith("train"):
            add(f"{label} tokens/s", result, "train_tokens_per_s")
            add(f"{label} MFU", result, "train_mfu")
            add(f"{label} peak mem MiB", result, "train_peak_mem_mib")
        else:
            add(label.replace("sampling", "sampling images/s"), result, "sampling_images_per_s")
    return rows


def target_verdicts(rows: dict[str, dict[str, float | None]]) -> dict[str, bool | None]:
    """Target name -> met (None when a figure is missing); MFU is judged on varlib's own value."""
    verdicts = {}
    for name, minimum in TARGETS.items():
        row = rows.get(name, {})
        value = row.get("varlib") if name.endswith("MFU") else row.get("ratio")
        verdicts[name] = None if value is None else value >= minimum
    return verdicts


def largest_batch(step_at: callable, limit: int) -> int:
    """The largest batch <= limit whose training step runs without running out of memory (doubling, then
    bisection); 0 when even batch 1 does not fit."""
    def fits(batch: int) -> bool:
        try:
            step_at(batch)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    low, high = 0, 1
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > max(1, low // 16):  # within ~6%
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def max_batches(args: argparse.Namespace) -> dict[str, int]:
    """The largest d16 training batch for varlib (and the official code) in bf16."""
    namespace = speed.parse_args(["--device", args.device, "--depth", "16", "--vae-ch", str(args.vae_ch)])
    vae, var = build_models(namespace)
    contenders = [varlib_contender(vae, var)]
    if args.official_repo:
        from official_runner import build_official, import_official_models, official_contender

        off_vae, off_var = build_official(import_official_models(args.official_repo), vae, var, namespace.device)
        contenders.append(official_contender(off_vae, off_var, **speed.SAMPLER))
    run = RunSettings(namespace.device, torch.bfloat16, steps=1, warmup=0)
    found = {}
    for contender in contenders:
        def step_at(batch: int, contender=contender) -> None:
            namespace.train_batch = batch
            inputs = make_inputs(vae, var, namespace)
            training_step(contender, inputs["train_labels_B"], inputs["x_BLCv"], inputs["targets_BL"], run)()
            synchronize(run.device)

        contender.transformer.train()
        found[contender.name] = largest_batch(step_at, args.max_batch)
        contender.transformer.cpu()  # leave the GPU to the next contender
    return found


def flex_gradient_check(device: torch.device) -> dict[str, float]:
    """Max |flex - dense| of a d4 model's fp32 logits and gradients at 256px (the CPU tests cover prefix)."""
    namespace = speed.parse_args(["--device", str(device), "--depth", "4", "--vae-ch", "32", "--train-batch", "2"])
    vae, var = build_models(namespace)
    inputs = make_inputs(vae, var, namespace)
    var.train()
    outputs = {}
    for impl in ("dense", "flex"):
        var.attn_impl = impl
        var.zero_grad(set_to_none=True)
        logits = var(inputs["train_labels_B"], inputs["x_BLCv"])
        F.cross_entropy(logits.flatten(0, 1), inputs["targets_BL"].flatten()).backward()
        outputs[impl] = (logits.detach(), [p.grad.clone() for p in var.parameters() if p.grad is not None])
    (dense_logits, dense_grads), (flex_logits, flex_grads) = outputs["dense"], outputs["flex"]
    return {"flex_logits_max_abs_diff": (flex_logits - dense_logits).abs().max().item(),
            "flex_grad_max_abs_diff": max((a - b).abs().max().item() for a, b in zip(flex_grads, dense_grads))}


def _show(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%}" if percent else f"{value:.4g}"


def format_summary(rows: dict, verdicts: dict, extra: dict) -> str:
    """The summary table, the extra checks and the target verdicts."""
    lines = [f"{'figure':<30}{'varlib':>12}{'official':>12}{'varlib/off.':>13}", "-" * 67]
    for name, row in rows.items():
        percent = name.endswith("MFU")
        lines.append(f"{name:<30}{_show(row['varlib'], percent):>12}{_show(row['official'], percent):>12}"
                     f"{_show(row['ratio']):>13}")
    for key, value in extra.items():
        lines.append(f"{key}: {value}")
    lines += ["", "targets: " + ", ".join(f"{k} {'met' if v else 'missed' if v is False else 'n/a'}"
                                          for k, v in verdicts.items())]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    results = {label: speed.main(run_argv) for label, run_argv in speed_runs(args)}
    rows = summarize(results)
    extra: dict = {}
    if args.max_batch:
        found = max_batches(args)
        rows["d16 max train batch"] = {"varlib": found["varlib"], "official": found.get("official"),
                                       "ratio": found["varlib"] / found["official"] if found.get("official") else None}
    if torch.device(args.device).type == "cuda":
        extra["flex attention vs dense (fp32)"] = flex_gradient_check(torch.device(args.device))
    verdicts = target_verdicts(rows)
    print("\n" + format_summary(rows, verdicts, extra))
    summary = {"runs": results, "summary": rows, "targets": verdicts, **extra}
    if args.json:
        with open(args.json, "w") as out:
            json.dump(summary, out, indent=2, default=str)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
