"""``make demo``: the end-to-end quickstart on the bundled emoji data, on a CPU.

    python -m varlib.cli.demo [--out outputs/demo] [--tokenizer-override KEY=VALUE ...] [--var-override ...]

Stages, each the same code path as its command:
  1. ``varlib-train experiment=demo_tokenizer``: the multi-scale tokenizer (32 px, 8x8 latent, 9 emoji categories);
  2. ``varlib-tokenize``: the train/val images into a token cache;
  3. ``varlib-train experiment=var_emoji``: a class-conditional VAR on the cache;
  4. sampling: one row of samples per category.
It writes ``<out>/samples.png``, ``<out>/metrics.json`` (tokenizer ``psnr`` and ``codebook_usage``; VAR held-out
``loss_avg``, ``loss_last``, ``err_avg``, ``err_last``; ``seconds`` per stage) and the models
``<out>/tokenizer/model.safetensors`` and ``<out>/var/model.safetensors``, which ``varlib.load`` opens.
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
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

import varlib
from varlib.cli import tokenize as tokenize_cli
from varlib.cli import train as train_cli
from varlib.cli.common import CONFIG_MODULE
from varlib.data import EmojiDataModule
from varlib.images import image_grid, save_png

log = logging.getLogger(__name__)


def compose_config(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """A config from the packaged ``conf/`` composed as the command line would, for use outside ``@hydra.main``."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def train_stage(experiment: str, out_dir: Path, overrides: Sequence[str]) -> dict[str, float]:
    """Runs ``varlib-train experiment=<experiment>`` writing to ``out_dir``; returns its final val metrics."""
    cfg = compose_config("train", [f"experiment={experiment}", f"paths.output_dir={out_dir}", *overrides])
    return train_cli.run(cfg)


def sample_rows(var: varlib.VAR, per_class: int, seed: int, cfg: float = 3.0, top_k: int = 200,
                top_p: float = 0.95) -> torch.Tensor:
    """A grid (3, H', W') with one row of ``per_class`` samples for each class (the official demo's
    visual settings: strong guidance and a truncated distribution)."""
    rows = [var.generate([c] * per_class, cfg=cfg, top_k=top_k, top_p=top_p, seed=seed + c).cpu()
            for c in range(var.num_classes)]
    return image_grid(torch.cat(rows), columns=per_class)


def run_demo(
    out_dir: str | Path = "outputs/demo",
    tokenizer_overrides: Sequence[str] = (),
    var_overrides: Sequence[str] = (),
    per_class: int = 8,
    seed: int = 0,
) -> dict:
    """Runs the four stages and returns what ``metrics.json`` holds."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}

    start = time.perf_counter()
    tok_metrics = train_stage("demo_tokenizer", out / "tokenizer", ["logger=csv", *tokenizer_overrides])
    seconds["tokenizer"] = time.perf_counter() - start
    tokenizer_path = out / "tokenizer" / "model.safetensors"

    start = time.perf_counter()
    cache_dir = out / "token_cache"
    tokenize_cli.run(compose_config("tokenize", [f"tokenizer={tokenizer_path}", f"out_dir={cache_dir}",
                                                 "data.num_workers=0"]))
    seconds["tokenize"] = time.perf_counter() - start

    start = time.perf_counter()
    var_metrics = train_stage("var_emoji", out / "var", [
        "logger=csv", f"data.root={cache_dir}", f"model.tokenizer_path={tokenizer_path}", *var_overrides])
    seconds["var"] = time.perf_counter() - start

    start = time.perf_counter()
    var = varlib.load(out / "var" / "model.safetensors")
    save_png(sample_rows(var, per_class, seed), out / "samples.png")
    seconds["sample"] = time.perf_counter() - start
    seconds["total"] = sum(seconds.values())

    metrics = {
        "psnr": tok_metrics["val/psnr"],
        "codebook_usage": tok_metrics["val/codebook_usage"],
        **{key: var_metrics[f"val/{key}"] for key in ("loss_avg", "loss_last", "err_avg", "err_last")},
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
    parser.add_argument("--per-class", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    metrics = run_demo(args.out, args.tokenizer_override, args.var_override, args.per_class)
    print(json.dumps(metrics, indent=2))
    print(f"samples: {Path(args.out) / 'samples.png'} (one row per class)")


if __name__ == "__main__":
    main()
