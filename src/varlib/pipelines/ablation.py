"""The paper's Table 3 on the emoji data, row by row (``varlib-ablation``): a raster next-token baseline, then VAR
with one design choice added per row (AdaLN, top-k, guidance, attention normalisation, depth). Per seed the rows'
models train (rows that change only the sampling reuse the previous row's model), then every row is sampled with
its own settings, scored and timed."""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
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
    SampleMetric,
    class_labels,
    held_out_images,
    save_class_rows,
    tokenize_stage,
    train_stage,
)


@dataclass(frozen=True)
class AblationRow:
    """One row of the paper's Table 3 on the emoji data.

    name: the row's key; paper: its description in the paper and paper_fid its FID (ImageNet 256, as printed in
    the paper); model: the trained model it samples (rows that change only the sampling reuse the previous row's);
    next_scale: VAR (else the raster baseline); adaln, attn_l2_norm, double_depth: the model's switches;
    filters, guidance: whether the sampling's top-k/top-p filter and classifier-free guidance are on (off: 0).
    """

    name: str
    paper: str
    paper_fid: float
    model: str
    next_scale: bool = True
    adaln: bool = False
    attn_l2_norm: bool = False
    double_depth: bool = False
    filters: bool = False
    guidance: bool = False

    def sampling(self, settings: dict) -> dict:
        """This row's sampling: ``settings`` (the models' own, with the command's overrides) with the filters and
        guidance that are off set to 0."""
        off = {**({} if self.filters else {"top_k": 0, "top_p": 0.0}), **({} if self.guidance else {"cfg": 0.0})}
        return {**settings, **off}

    def model_overrides(self, base_depth: int) -> list[str]:
        """The ``varlib-train`` overrides of this row's model (its switches; twice ``base_depth`` when scaled up)."""
        overrides = [f"model.var.adaln={str(self.adaln).lower()}",
                     f"model.var.attn_l2_norm={str(self.attn_l2_norm).lower()}"]
        return overrides + ([f"model.var.depth={2 * base_depth}"] if self.double_depth else [])


#: The rows, each adding one design choice to the one before (the paper's FID column: Tian et al. 2024, arXiv
#: 2404.02905, Table 3; docs/results.md says which of its figures were checked against a stored copy).
ABLATION_ROWS = (
    AblationRow("raster_ar", "AR (raster next-token)", 18.65, "raster_ar", next_scale=False),
    AblationRow("var", "AR to VAR", 5.22, "var"),
    AblationRow("adaln", "+AdaLN", 4.95, "adaln", adaln=True),
    AblationRow("top_k", "+Top-k", 4.64, "adaln", adaln=True, filters=True),
    AblationRow("cfg", "+CFG", 3.60, "adaln", adaln=True, filters=True, guidance=True),
    AblationRow("attn_norm", "+Attn. Norm.", 3.30, "attn_norm", adaln=True, attn_l2_norm=True, filters=True,
                guidance=True),
    AblationRow("depth", "+Scale up (depth)", 1.73, "depth", adaln=True, attn_l2_norm=True, double_depth=True,
                filters=True, guidance=True),
)
#: kind -> (tokenizer experiment, transformer experiment): ``var`` for the next-scale rows, ``raster_ar`` for the
#: baseline (on the tokenizer with its last scale alone); both networks are configured under model.var
ABLATION_MODELS = {"var": ("demo_tokenizer", "var_emoji"), "raster_ar": ("demo_tokenizer", "ar_emoji")}
#: the same at a tiny size (the notebook's and the tests': conf/experiment/tiny_ablation_*.yaml)
TINY_ABLATION_MODELS = {"var": ("tiny_ablation_tokenizer", "tiny_ablation_var"),
                        "raster_ar": ("tiny_ablation_tokenizer", "tiny_ablation_ar")}
TIMING_BATCHES = (1, 16)
SHOWN_PER_CLASS = 8  # samples per class in each row's samples.png (one row per class)


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


def ablation_files(out: Path, seed: int, row: AblationRow) -> RunFiles:
    """A row's files: next-scale models share ``seed<s>/next_scale/`` (one tokenizer), the raster baseline has
    ``seed<s>/next_token/``; the transformer lies in the folder of the row that trains it."""
    return RunFiles(out / f"seed{seed}" / ("next_scale" if row.next_scale else "next_token"), row.model,
                    transformer_dir=row.model)


def train_ablation_models(out: Path, seed: int, tokenizer_overrides: Sequence[str], net_overrides: Sequence[str],
                          use_token_cache: bool, models: Mapping[str, tuple[str, str]]) -> dict[str, dict]:
    """The training stages of every model the rows of :data:`ABLATION_ROWS` sample, for one seed, from ``models``'
    experiments; per model its tokenizer and transformer metrics, files and batch size."""
    # The baseline's tokenizer is VAR's with the last scale alone, whatever the overrides make VAR's schedule.
    var_tokenizer, var_experiment = models["var"]
    side = compose_config("train", [f"experiment={var_tokenizer}", *tokenizer_overrides]).model.vae.patch_nums[-1]
    base_depth = compose_config("train", [f"experiment={var_experiment}", *net_overrides]).model.var.depth
    runs = {}
    for row in ABLATION_ROWS:
        if row.model in runs:
            continue
        files = ablation_files(out, seed, row)
        tokenizer_experiment, experiment = models["var" if row.next_scale else "raster_ar"]
        last_scale_only = [] if row.next_scale else [f"model.vae.patch_nums=[{side}]", "model.vae.share_quant_resi=1"]
        tokenizer_metrics = train_stage(tokenizer_experiment, files.tokenizer.parent,
                                        ["logger=csv", f"seed={seed}", "trainer.max_time=null", *tokenizer_overrides,
                                         *last_scale_only])
        if use_token_cache:
            tokenize_stage(files.tokenizer, files.token_cache)
        overrides = ["logger=csv", f"seed={seed}", "trainer.max_time=null", *files.transformer_data_overrides(),
                     *net_overrides, *row.model_overrides(base_depth)]
        net_metrics = train_stage(experiment, files.transformer.parent, overrides)
        batch_size = compose_config("train", [f"experiment={experiment}", *overrides]).data.batch_size
        runs[row.model] = {"tokenizer": tokenizer_metrics, "transformer": net_metrics, "files": files,
                           "batch_size": batch_size}
    return runs


def evaluate_ablation_row(row: AblationRow, run: dict, per_class: int, seed: int, sampling: dict,
                          metric: SampleMetric, metric_name: str) -> dict:
    """Samples, scores and times one row's model with the row's sampling; writes ``<row>.png`` (the samples) and
    ``<row>.json`` under ``seed<s>/rows/`` and returns the latter's content, which is reused when it was made with
    the same metric, samples per class and sampling from a model with the same final validation metrics (a
    retrained model is scored again)."""
    model = varlib.load(run["files"].transformer)
    # the rows compare exact samplers: the fast options (next-scale only, a raster model takes none) stay off
    exact = {key: value for key, value in model.sampling.resolve(**sampling).items() if key in ("cfg", "top_k", "top_p")}
    row_sampling = row.sampling(exact)
    made_with = {"metric": metric_name, "per_class": per_class, "sampling": row_sampling,
                 "model_metrics": run["transformer"]}
    rows_dir = run["files"].root.parent / "rows"
    done = rows_dir / f"{row.name}.json"
    if done.is_file() and json.loads(done.read_text())["made_with"] == made_with:
        return json.loads(done.read_text())
    steps = trained_steps(run["files"].transformer.parent)
    images = sample_per_class(model, per_class, seed, **row_sampling)
    result = {
        "model": row.model,
        "tokenizer": {k: run["tokenizer"][f"val/{k}"] for k in ("psnr", "ssim", "codebook_usage")
                      if f"val/{k}" in run["tokenizer"]},
        "tokens_per_image": model.L,
        "depth": model.depth,
        "non_embedding_params": model.num_non_embedding_params(),
        "steps": steps,
        "training_images": steps * run["batch_size"],
        "val_loss_last": run["transformer"].get("val/loss_last"),
        "sampling": row_sampling,
        "samples": metric(images, class_labels(model.num_classes, per_class)),
        **{f"seconds_per_image_b{b}": seconds_per_image(model, b, row_sampling) for b in TIMING_BATCHES},
        "made_with": made_with,
    }
    rows_dir.mkdir(parents=True, exist_ok=True)
    save_class_rows(images, model.num_classes, min(SHOWN_PER_CLASS, per_class), rows_dir / f"{row.name}.png")
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def spread(values: Sequence[float]) -> str:
    """``mean (min-max)`` over the seeds; one seed: the value alone."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{sum(values) / len(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def ablation_table(results: dict[str, dict]) -> str:
    """The rows in the paper's order beside its FID column: each row's switches, size and sampling, the sample
    metric's figures (mean and min-max over the seeds; the emoji protocol's class_accuracy and feature_distance)
    and seconds per image at batch 1; then the metric's calibration points where it has them (held-out real and
    8x8-blurred images)."""
    seeds = list(results)
    samples = results[seeds[0]][ABLATION_ROWS[0].name]["samples"]
    figures = [k for k, v in samples.items() if isinstance(v, (int, float)) and k != "per_class"]
    header = ["row", "paper", "paper FID", "tokens", "AdaLN", "attn. norm", "depth", "N (non-emb.)", "top-k / top-p",
              "cfg", *(f"{name} ({len(seeds)} seeds)" for name in figures), "s/img b1"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    yes_no = {True: "yes", False: "-"}
    for row in ABLATION_ROWS:
        runs = [results[seed][row.name] for seed in seeds]
        first, sampling = runs[0], runs[0]["sampling"]
        cells = [row.name, row.paper, f"{row.paper_fid:.2f}", first["tokens_per_image"], yes_no[row.adaln],
                 yes_no[row.attn_l2_norm], first["depth"], f"{first['non_embedding_params']:,}",
                 f"{sampling['top_k']} / {sampling['top_p']:g}" if row.filters else "off",
                 f"{sampling['cfg']:g}" if row.guidance else "off",
                 *(spread([r["samples"][name] for r in runs]) for name in figures),
                 spread([r["seconds_per_image_b1"] for r in runs])]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    for point, values in samples.get("calibration", {}).items():
        if point != "noise":
            cells = [f"*{point}* (calibration)", *[""] * 9, *(f"{values[name]:.3f}" for name in figures), ""]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


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
    """Trains the rows' models and samples and scores every row for every seed; writes ``results.json`` and
    ``results.md`` and returns the former's content (see ``conf/ablation.yaml``).

    ``sampling`` (``cfg``, ``top_k``, ``top_p``) overrides the models' own settings (their ``sampling``; the two
    experiments share them) key by key where a row has that setting on; a key left out or None keeps them.
    ``metric_factory`` defaults to the emoji protocol with ``per_class`` references per class. ``models``: the
    tokenizer and transformer experiment of the next-scale rows and of the baseline (:data:`ABLATION_MODELS`, or
    :data:`TINY_ABLATION_MODELS`).
    """
    if metric_factory is None:
        metric_factory = functools.partial(emoji_metric, per_class=per_class)
    factory = getattr(metric_factory, "func", metric_factory)
    metric_name = f"{factory.__module__}.{factory.__qualname__}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sampling = {key: value for key, value in (sampling or {}).items() if value is not None}
    results, seconds = {}, {}
    for seed in seeds:
        start = time.perf_counter()
        runs = train_ablation_models(out, seed, tokenizer_overrides, net_overrides, use_token_cache, models)
        image_size = varlib.load(runs["var"]["files"].tokenizer).image_size
        metric = metric_factory(*held_out_images(image_size))
        results[str(seed)] = {row.name: evaluate_ablation_row(row, runs[row.model], per_class, seed, sampling, metric,
                                                              metric_name)
                              for row in ABLATION_ROWS}
        seconds[str(seed)] = round(time.perf_counter() - start, 1)
    report = {"results": results, "sampling": sampling, "per_class": per_class, "seconds": seconds,
              "threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(ablation_table(results))
    return report
