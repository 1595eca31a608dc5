"""``python -m varlib.cli.ablation``: the paper's Table 3 on the emoji data, next-scale (VAR) vs raster next-token
(:class:`~varlib.models.raster_ar.RasterAR`) at equal non-embedding parameters, training images and steps.

    python -m varlib.cli.ablation --out outputs/ablation --seeds 0 1 [--metric MODULE.FACTORY] [--threads 1]
        [--tokenizer-override KEY=VALUE ...] [--transformer-override KEY=VALUE ...]

Per seed, each stage through the code path of its command (VAR's half is ``make demo``'s training, so the two
share their figures):
  1. ``varlib-train experiment=demo_tokenizer``, and the same with the last scale alone (``model.vae.patch_nums``
     ``=[8]``, one phi convolution) for the baseline: the same CNN, codebook, loss and steps;
  2. ``varlib-tokenize`` of both (or, with ``--no-token-cache``, tokenisation on the fly while training, in the
     data's own class mix);
  3. ``varlib-train experiment=var_emoji`` and ``experiment=ar_emoji``: same depth and width (so equal
     non-embedding parameters, checked), batch, steps and recipe. ``trainer.max_time`` is lifted so both run
     exactly ``trainer.max_steps``;
  4. evaluation of both: the tokenizers' final-validation reconstruction figures (``psnr``, ``ssim``,
     ``codebook_usage``), ``per_class`` samples per class scored by the sample metric, and the sampling time per
     image at batch 1 and 16 (after one warm-up call, on this machine).

``--transformer-override`` keys under ``model.net.`` go to ``model.var.`` for VAR and ``model.ar.`` for the
baseline (e.g. ``model.net.depth=4``); other keys go to both as given. The sample metric is pluggable:
``--metric`` names a factory ``factory(reference_images (N,3,H,W) in [0,1], reference_labels (N,)) -> metric``,
with ``metric(images (N,3,H,W) in [0,1], labels (N,)) -> dict``; the references are the held-out images. The
default is the demo's emoji protocol (``varlib.evaluation.emoji_classifier.emoji_metric``, ``per_class`` samples
and references per class): ``class_accuracy``, ``feature_distance``, ``halfway_progress`` and the calibration
points (held-out ``real``, ``blurred_8x8``, ``noise``), which the table shows as rows of their own. Writes
``<out>/results.json`` and ``<out>/results.md``; finished training stages are reused when the command runs again.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from hydra.utils import get_object

import varlib
from varlib.cli import tokenize as tokenize_cli
from varlib.cli.demo import held_out_images
from varlib.configs import compose_config
from varlib.evaluation.emoji_classifier import emoji_metric
from varlib.images import image_grid, save_png
from varlib.training.runner import train_experiment

SampleMetric = Callable[[torch.Tensor, torch.Tensor], dict]
MetricFactory = Callable[[torch.Tensor, torch.Tensor], SampleMetric]
#: model name -> (tokenizer experiment, transformer experiment, the transformer's key under model.)
MODELS = {"var": ("demo_tokenizer", "var_emoji", "var"), "raster_ar": ("demo_tokenizer", "ar_emoji", "ar")}
TIMING_BATCHES = (1, 16)
SHOWN_PER_CLASS = 8  # samples per class in <run>/samples.png (one row per class)


def transformer_overrides(overrides: Sequence[str], key: str) -> list[str]:
    """``model.net.X=V`` -> ``model.<key>.X=V``; any other override unchanged."""
    return [f"model.{key}." + o[len("model.net."):] if o.startswith("model.net.") else o for o in overrides]


def trained_steps(run_dir: Path) -> int:
    """The global step of a finished run's last checkpoint."""
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True, mmap=True)
    return int(checkpoint["global_step"])


def train_once(experiment: str, out_dir: Path, overrides: Sequence[str]) -> dict[str, float]:
    """``varlib-train`` into ``out_dir`` unless its model and metrics are there; returns the final val metrics."""
    metrics_path = out_dir / "metrics.json"
    if (out_dir / "model.safetensors").is_file() and metrics_path.is_file():
        return json.loads(metrics_path.read_text())
    return train_experiment(experiment, out_dir, overrides)


@torch.no_grad()
def seconds_per_image(model, batch_size: int, sampling: dict, repeats: int = 1) -> float:
    """Wall seconds per image of ``model.generate`` at ``batch_size`` (tokens and decoding), after one warm-up."""
    labels = torch.arange(batch_size) % model.num_classes
    model.generate(labels, seed=0, **sampling)
    start = time.perf_counter()
    for r in range(repeats):
        model.generate(labels, seed=r + 1, **sampling)
    return (time.perf_counter() - start) / (repeats * batch_size)


@torch.no_grad()
def class_samples(model, per_class: int, seed: int, sampling: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` samples of every class: (images (C*per_class,3,H,W) in [0,1], labels)."""
    labels = torch.arange(model.num_classes).repeat_interleave(per_class)
    images = torch.cat([model.generate(chunk, seed=seed + i, **sampling)
                        for i, chunk in enumerate(labels.split(per_class))])
    return images, labels


def train_pair(out: Path, seed: int, tokenizer_overrides: Sequence[str], net_overrides: Sequence[str],
               use_token_cache: bool) -> dict[str, dict]:
    """Stages 1-3 for one seed; returns per model its tokenizer metrics, transformer metrics and file paths."""
    # The baseline's tokenizer is VAR's with the last scale alone, whatever the overrides make VAR's schedule.
    var_tokenizer = MODELS["var"][0]
    side = compose_config("train", [f"experiment={var_tokenizer}", *tokenizer_overrides]).model.vae.patch_nums[-1]
    last_scale_only = {"var": [], "raster_ar": [f"model.vae.patch_nums=[{side}]", "model.vae.share_quant_resi=1"]}
    runs = {}
    for name, (tok_experiment, experiment, key) in MODELS.items():
        root = out / f"seed{seed}" / name
        tok_metrics = train_once(tok_experiment, root / "tokenizer", ["logger=csv", f"seed={seed}", "trainer.max_time=null",
                                                                      *tokenizer_overrides, *last_scale_only[name]])
        tokenizer = root / "tokenizer" / "model.safetensors"
        if use_token_cache:
            cache = root / "token_cache"
            if not (cache / "index.json").is_file():
                tokenize_cli.run(compose_config("tokenize", [f"tokenizer={tokenizer}", f"out_dir={cache}"]))
            data = [f"data.root={cache}"]
        else:
            # the emoji images take the experiment's class balance as its token cache would; they have no root
            data = ["data=emoji", "~data.root", f"data.image_size={varlib.load(tokenizer).image_size}"]
        overrides = ["logger=csv", f"seed={seed}", "trainer.max_time=null",
                     f"model.tokenizer_path={tokenizer}", *data, *transformer_overrides(net_overrides, key)]
        net_metrics = train_once(experiment, root / "transformer", overrides)
        batch_size = compose_config("train", [f"experiment={experiment}", *overrides]).data.batch_size
        runs[name] = {"tokenizer": tok_metrics, "transformer": net_metrics, "dir": root, "batch_size": batch_size}
    return runs


def evaluate(runs: dict[str, dict], per_class: int, seed: int, sampling: dict,
             metric_factory: MetricFactory) -> dict[str, dict]:
    """Stage 4: the figures of both models (see the module docstring)."""
    models = {name: varlib.load(run["dir"] / "transformer" / "model.safetensors") for name, run in runs.items()}
    sizes = {name: model.num_non_embedding_params() for name, model in models.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the transformers must have equal non-embedding parameters, got {sizes}")
    metric = metric_factory(*held_out_images(models["var"].vae.image_size))
    results = {}
    for name, model in models.items():
        run = runs[name]
        steps = trained_steps(run["dir"] / "transformer")
        images, labels = class_samples(model, per_class, seed, sampling)
        results[name] = {
            "tokenizer": {k: run["tokenizer"][f"val/{k}"] for k in ("psnr", "ssim", "codebook_usage")
                          if f"val/{k}" in run["tokenizer"]},
            "tokens_per_image": model.L,
            "non_embedding_params": sizes[name],
            "steps": steps,
            "training_images": steps * run["batch_size"],
            "val_loss_last": run["transformer"].get("val/loss_last"),
            "val_err_last": run["transformer"].get("val/err_last"),
            "samples": metric(images, labels),
            **{f"seconds_per_image_b{b}": seconds_per_image(model, b, sampling) for b in TIMING_BATCHES},
        }
        shown = images.view(model.num_classes, per_class, *images.shape[1:])[:, :SHOWN_PER_CLASS]
        save_png(image_grid(shown.flatten(0, 1), columns=shown.shape[1]), run["dir"] / "samples.png")
    return results


def sample_figures(samples: dict) -> dict[str, float]:
    """A metric's numbers for the table, one nested level flattened (``halfway_progress/class_accuracy``);
    the ``calibration`` points get rows of their own and ``per_class`` is a setting, not a figure."""
    figures = {}
    for key, value in samples.items():
        if key in ("calibration", "per_class"):
            continue
        if isinstance(value, dict):
            figures.update({f"{key}/{name}": v for name, v in value.items()})
        else:
            figures[key] = value
    return figures


def markdown_table(results: dict[str, dict]) -> str:
    """One row per seed and model: reconstruction, size, budget, sample metrics and sampling time; then, where
    the metric has them, one row per calibration point (the same figures for held-out, blurred and noise sets)."""
    metric_names = sorted({k for seed in results.values() for r in seed.values() for k in sample_figures(r["samples"])})
    header = ["seed", "model", "tokens", "rec. PSNR (dB)", "rec. SSIM", "N (non-emb.)", "steps", "images",
              *metric_names, "s/img b1", "s/img b16"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for seed, models in results.items():
        for name, r in models.items():
            tok, figures = r["tokenizer"], sample_figures(r["samples"])
            cells = [seed, name, r["tokens_per_image"], f"{tok.get('psnr', float('nan')):.2f}",
                     f"{tok.get('ssim', float('nan')):.3f}", r["non_embedding_params"], r["steps"], r["training_images"],
                     *(f"{figures.get(m, float('nan')):.4g}" for m in metric_names),
                     f"{r['seconds_per_image_b1']:.4f}", f"{r['seconds_per_image_b16']:.4f}"]
            rows.append("| " + " | ".join(map(str, cells)) + " |")
        calibration = next(iter(models.values()))["samples"].get("calibration", {})
        for point, figures in calibration.items():
            cells = [seed, f"*{point}* (calibration)", *[""] * 6,
                     *(f"{figures[m]:.4g}" if m in figures else "" for m in metric_names), "", ""]
            rows.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(rows) + "\n"


def run_ablation(
    out_dir: str | Path = "outputs/ablation",
    seeds: Sequence[int] = (0, 1),
    tokenizer_overrides: Sequence[str] = (),
    net_overrides: Sequence[str] = (),
    per_class: int = 50,
    sampling: dict | None = None,
    metric_factory: MetricFactory | None = None,
    use_token_cache: bool = True,
) -> dict:
    """Trains and evaluates both models for every seed; writes and returns ``results.json``'s content.

    ``sampling`` holds ``cfg``, ``top_k``, ``top_p`` for both models (default cfg 1.5, no filter; VAR ramps its
    guidance over the scales, the baseline applies it at every token). ``metric_factory`` defaults to the emoji
    protocol with ``per_class`` references per class.
    """
    if metric_factory is None:
        metric_factory = functools.partial(emoji_metric, per_class=per_class)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sampling = {"cfg": 1.5, "top_k": 0, "top_p": 0.0, **(sampling or {})}
    results, seconds = {}, {}
    for seed in seeds:
        start = time.perf_counter()
        runs = train_pair(out, seed, tokenizer_overrides, net_overrides, use_token_cache)
        results[str(seed)] = evaluate(runs, per_class, seed, sampling, metric_factory)
        seconds[str(seed)] = round(time.perf_counter() - start, 1)
    report = {"results": results, "sampling": sampling, "per_class": per_class, "seconds": seconds,
              "threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(results))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="VAR vs the raster next-token baseline at equal budget (emoji data)")
    parser.add_argument("--out", default="outputs/ablation")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.0)
    parser.add_argument("--metric", default=None, metavar="MODULE.FACTORY",
                        help="factory(reference_images, reference_labels) -> metric(images, labels) -> dict "
                             "(default: the demo's emoji classifier protocol)")
    parser.add_argument("--no-token-cache", action="store_true", help="tokenise on the fly instead of caching")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1 on a shared CPU)")
    parser.add_argument("--tokenizer-override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--transformer-override", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tokenizer_overrides = list(args.tokenizer_override)
    net_overrides = list(args.transformer_override)
    if args.threads is not None:
        tokenizer_overrides.append(f"cpu_threads={args.threads}")
        net_overrides.append(f"cpu_threads={args.threads}")
    factory = get_object(args.metric) if args.metric else None
    report = run_ablation(args.out, args.seeds, tokenizer_overrides, net_overrides, args.per_class,
                          {"cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p}, factory, not args.no_token_cache)
    print(markdown_table(report["results"]))


if __name__ == "__main__":
    main()
