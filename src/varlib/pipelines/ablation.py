"""Next-scale (VAR) vs raster next-token prediction at equal budget on the emoji data (the paper's Table 3;
``varlib-ablation``): per seed both tokenizers and transformers train, then both are sampled, scored and timed."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch

import varlib
from varlib.configs import compose_config
from varlib.evaluation.emoji_classifier import emoji_metric
from varlib.models.sampling import sample_per_class
from varlib.pipelines.stages import (
    MetricFactory,
    RunFiles,
    class_labels,
    held_out_images,
    save_class_rows,
    tokenize_stage,
    train_stage,
)


#: model name -> (tokenizer experiment, transformer experiment); both networks are configured under model.var
ABLATION_MODELS = {"var": ("demo_tokenizer", "var_emoji"), "raster_ar": ("demo_tokenizer", "ar_emoji")}
#: the same at a tiny size (the notebook's and the tests': conf/experiment/tiny_ablation_*.yaml)
TINY_ABLATION_MODELS = {"var": ("tiny_ablation_tokenizer", "tiny_ablation_var"),
                        "raster_ar": ("tiny_ablation_tokenizer", "tiny_ablation_ar")}
TIMING_BATCHES = (1, 16)
SHOWN_PER_CLASS = 8  # samples per class in each model's samples.png (one row per class)


def trained_steps(run_dir: Path) -> int:
    """The global step of a finished run's last checkpoint."""
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True, mmap=True)
    return int(checkpoint["global_step"])


@torch.no_grad()
def seconds_per_image(model, batch_size: int, sampling: dict, repeats: int = 1) -> float:
    """Wall seconds per image of ``model.generate`` at ``batch_size`` (tokens and decoding), after one warm-up."""
    labels = torch.arange(batch_size) % model.num_classes
    model.generate(labels, seed=0, **sampling)
    start = time.perf_counter()
    for r in range(repeats):
        model.generate(labels, seed=r + 1, **sampling)
    return (time.perf_counter() - start) / (repeats * batch_size)


def train_ablation_pair(out: Path, seed: int, tokenizer_overrides: Sequence[str], net_overrides: Sequence[str],
                        use_token_cache: bool, models: Mapping[str, tuple[str, str]]) -> dict[str, dict]:
    """The training stages of both ``models`` for one seed; per model its tokenizer and transformer metrics, files
    and batch size."""
    # The baseline's tokenizer is VAR's with the last scale alone, whatever the overrides make VAR's schedule.
    var_tokenizer = models["var"][0]
    side = compose_config("train", [f"experiment={var_tokenizer}", *tokenizer_overrides]).model.vae.patch_nums[-1]
    last_scale_only = {"var": [], "raster_ar": [f"model.vae.patch_nums=[{side}]", "model.vae.share_quant_resi=1"]}
    runs = {}
    for name, (tokenizer_experiment, experiment) in models.items():
        files = RunFiles(out / f"seed{seed}" / name, name, transformer_dir="transformer")
        tokenizer_metrics = train_stage(tokenizer_experiment, files.tokenizer.parent,
                                        ["logger=csv", f"seed={seed}", "trainer.max_time=null", *tokenizer_overrides,
                                         *last_scale_only[name]])
        if use_token_cache:
            tokenize_stage(files.tokenizer, files.token_cache)
        overrides = ["logger=csv", f"seed={seed}", "trainer.max_time=null", *files.transformer_data_overrides(),
                     *net_overrides]
        net_metrics = train_stage(experiment, files.transformer.parent, overrides)
        batch_size = compose_config("train", [f"experiment={experiment}", *overrides]).data.batch_size
        runs[name] = {"tokenizer": tokenizer_metrics, "transformer": net_metrics, "files": files,
                      "batch_size": batch_size}
    return runs


def evaluate_ablation_pair(runs: dict[str, dict], per_class: int, seed: int, sampling: dict,
                           metric_factory: MetricFactory) -> dict[str, dict]:
    """Samples, scores and times both models of one seed; writes each model's ``samples.png``."""
    models = {name: varlib.load(run["files"].transformer) for name, run in runs.items()}
    sizes = {name: model.num_non_embedding_params() for name, model in models.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the transformers must have equal non-embedding parameters, got {sizes}")
    metric = metric_factory(*held_out_images(models["var"].vae.image_size))
    results = {}
    for name, model in models.items():
        run = runs[name]
        steps = trained_steps(run["files"].transformer.parent)
        images = sample_per_class(model, per_class, seed, **sampling)
        results[name] = {
            "tokenizer": {k: run["tokenizer"][f"val/{k}"] for k in ("psnr", "ssim", "codebook_usage")
                          if f"val/{k}" in run["tokenizer"]},
            "tokens_per_image": model.L,
            "non_embedding_params": sizes[name],
            "steps": steps,
            "training_images": steps * run["batch_size"],
            "val_loss_last": run["transformer"].get("val/loss_last"),
            "val_err_last": run["transformer"].get("val/err_last"),
            "sampling": model.sampling.resolve(**sampling),
            "samples": metric(images, class_labels(model.num_classes, per_class)),
            **{f"seconds_per_image_b{b}": seconds_per_image(model, b, sampling) for b in TIMING_BATCHES},
        }
        save_class_rows(images, model.num_classes, min(SHOWN_PER_CLASS, per_class), run["files"].root / "samples.png")
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


def ablation_table(results: dict[str, dict]) -> str:
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
    models: Mapping[str, tuple[str, str]] = ABLATION_MODELS,
) -> dict:
    """Trains and evaluates both models for every seed; writes ``results.json`` and ``results.md`` and returns the
    former's content (see ``conf/ablation.yaml``).

    ``sampling`` (``cfg``, ``top_k``, ``top_p``) overrides both models' own settings (their ``sampling``; the two
    experiments share them) key by key; a key left out or None keeps them. VAR ramps its guidance over the scales,
    the baseline applies it at every token. ``metric_factory`` defaults to the emoji protocol with ``per_class``
    references per class. ``models``: each model's tokenizer and transformer experiment (:data:`ABLATION_MODELS`,
    or :data:`TINY_ABLATION_MODELS`).
    """
    if metric_factory is None:
        metric_factory = functools.partial(emoji_metric, per_class=per_class)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sampling = {key: value for key, value in (sampling or {}).items() if value is not None}
    results, seconds = {}, {}
    for seed in seeds:
        start = time.perf_counter()
        runs = train_ablation_pair(out, seed, tokenizer_overrides, net_overrides, use_token_cache, models)
        results[str(seed)] = evaluate_ablation_pair(runs, per_class, seed, sampling, metric_factory)
        seconds[str(seed)] = round(time.perf_counter() - start, 1)
    report = {"results": results, "sampling": sampling, "per_class": per_class, "seconds": seconds,
              "threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(ablation_table(results))
    return report

