"""``make demo``: the end-to-end quickstart on the bundled emoji data, on a CPU.

    python -m varlib.cli.demo [--out outputs/demo] [--tokenizer-override KEY=VALUE ...] [--var-override ...]

Stages, each the same code path as its command:
  1. ``varlib-train experiment=demo_tokenizer``: the multi-scale tokenizer (32 px, 8x8 latent, 9 emoji categories);
  2. ``varlib-tokenize``: the train/val images into a token cache;
  3. ``varlib-train experiment=var_emoji``: a class-conditional VAR on the cache;
  4. sampling: 50 samples per category, the first ``per_class`` of each in ``samples.png``;
  5. scoring: the emoji protocol of ``varlib.evaluation.emoji_classifier`` on 50 samples per class.
Both training stages run a fixed number of steps (no clock), so a seed gives the same figures on every machine;
each shows a progress bar with an ETA. The samples come from ``varlib.load`` of the saved VAR with the model's
default sampling settings (``VAR.generate``'s defaults).

It writes ``<out>/samples.png`` (the first ``per_class`` samples of every class), ``<out>/metrics.json`` and the
models ``<out>/tokenizer/model.safetensors`` and ``<out>/var/model.safetensors``, which ``varlib.load`` opens.
``metrics.json`` holds: tokenizer ``psnr`` and ``codebook_usage``; VAR held-out ``loss_avg``, ``loss_last``,
``err_avg``, ``err_last``; ``emoji_classifier``: the samples' ``class_accuracy`` and ``feature_distance``,
the ``calibration`` points (``real``, ``blurred_8x8``, ``noise``) measured the same way with the same n, and
``halfway_progress`` (0 at the blurred point, 1 at the real one); ``seconds`` per stage.
Re-running resumes each training stage from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import torch

import varlib
from varlib.cli import tokenize as tokenize_cli
from varlib.cli import train as train_cli
from varlib.cli.common import compose_config
from varlib.data import EmojiDataModule
from varlib.evaluation.emoji_classifier import (
    calibration_points,
    emoji_scores,
    halfway_progress,
    load_emoji_classifier,
)
from varlib.images import image_grid, save_png

log = logging.getLogger(__name__)


def train_stage(experiment: str, out_dir: Path, overrides: Sequence[str]) -> dict[str, float]:
    """Runs ``varlib-train experiment=<experiment>`` writing to ``out_dir``; returns its final val metrics."""
    cfg = compose_config("train", [f"experiment={experiment}", f"paths.output_dir={out_dir}", *overrides])
    return train_cli.run(cfg)


def sample_classes(var: varlib.VAR, per_class: int, seed: int, batch_size: int = 50, **sampling) -> torch.Tensor:
    """``per_class`` samples (num_classes*per_class, 3, H, W) in [0,1] of every class, class by class; batch i of
    a class uses seed + 1000*class + i. ``sampling`` (cfg, top_k, top_p, ...) overrides ``VAR.generate``'s
    defaults."""
    images = []
    for label in range(var.num_classes):
        for i, start in enumerate(range(0, per_class, batch_size)):
            count = min(batch_size, per_class - start)
            images.append(var.generate([label] * count, seed=seed + 1000 * label + i, **sampling).cpu())
    return torch.cat(images)


def sample_rows(var: varlib.VAR, per_class: int, seed: int, **sampling) -> torch.Tensor:
    """A grid (3, H', W') with one row of ``per_class`` samples (``sample_classes``) for each class."""
    return image_grid(sample_classes(var, per_class, seed, **sampling), columns=per_class)


def score_samples(samples_BCHW: torch.Tensor, per_class: int, image_size: int, seed: int) -> dict:
    """The emoji protocol: the samples' class accuracy and feature distance beside the calibration points."""
    datamodule = EmojiDataModule(image_size=image_size)
    datamodule.setup("validate")
    classifier = load_emoji_classifier()
    reference_features, points = calibration_points(classifier, datamodule.val_set, datamodule.num_classes,
                                                    per_class, seed)
    labels_B = torch.arange(datamodule.num_classes).repeat_interleave(per_class)
    scores = emoji_scores(classifier, samples_BCHW, labels_B, reference_features)
    return {**scores, "per_class": per_class, "calibration": points,
            "halfway_progress": halfway_progress(scores, points)}


def run_demo(
    out_dir: str | Path = "outputs/demo",
    tokenizer_overrides: Sequence[str] = (),
    var_overrides: Sequence[str] = (),
    per_class: int = 8,
    seed: int = 0,
    scored_per_class: int = 50,
) -> dict:
    """Runs the four stages and returns what ``metrics.json`` holds."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}

    start = time.perf_counter()
    tok_metrics = train_stage("demo_tokenizer", out / "tokenizer", ["logger=csv", f"seed={seed}",
                                                                    *tokenizer_overrides])
    seconds["tokenizer"] = time.perf_counter() - start
    tokenizer_path = out / "tokenizer" / "model.safetensors"

    start = time.perf_counter()
    cache_dir = out / "token_cache"
    tokenize_cli.run(compose_config("tokenize", [f"tokenizer={tokenizer_path}", f"out_dir={cache_dir}",
                                                 "data.num_workers=0"]))
    seconds["tokenize"] = time.perf_counter() - start

    start = time.perf_counter()
    var_metrics = train_stage("var_emoji", out / "var", ["logger=csv", f"seed={seed}", f"data.root={cache_dir}",
                                                         f"model.tokenizer_path={tokenizer_path}", *var_overrides])
    seconds["var"] = time.perf_counter() - start

    start = time.perf_counter()
    var = varlib.load(out / "var" / "model.safetensors")
    samples_BCHW = sample_classes(var, max(per_class, scored_per_class), seed)
    rows = samples_BCHW.unflatten(0, (var.num_classes, -1))[:, :per_class].flatten(0, 1)
    save_png(image_grid(rows, columns=per_class), out / "samples.png")
    seconds["sample"] = time.perf_counter() - start

    start = time.perf_counter()
    scored = samples_BCHW.unflatten(0, (var.num_classes, -1))[:, :scored_per_class].flatten(0, 1)
    emoji = score_samples(scored, scored_per_class, samples_BCHW.shape[-1], seed)
    seconds["score"] = time.perf_counter() - start
    seconds["total"] = sum(seconds.values())

    metrics = {
        "psnr": tok_metrics["val/psnr"],
        "codebook_usage": tok_metrics["val/codebook_usage"],
        **{key: var_metrics[f"val/{key}"] for key in ("loss_avg", "loss_last", "err_avg", "err_last")},
        "emoji_classifier": emoji,
        "rows": EmojiDataModule().class_names,  # samples.png has one row per class, in this order
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "checkpoints": {"tokenizer": str(tokenizer_path), "var": str(out / "var" / "model.safetensors")},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="varlib's end-to-end CPU quickstart on the emoji data")
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument("--tokenizer-override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--var-override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--per-class", type=int, default=8, help="samples per class in samples.png")
    parser.add_argument("--seed", type=int, default=0, help="training, sampling and scoring seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    metrics = run_demo(args.out, args.tokenizer_override, args.var_override, args.per_class, args.seed)
    print(json.dumps(metrics, indent=2))
    print(f"samples: {Path(args.out) / 'samples.png'} (one row per class)")


if __name__ == "__main__":
    main()
