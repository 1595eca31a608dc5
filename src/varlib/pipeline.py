"""The stages behind ``varlib-demo``, ``varlib-demo-text``, ``varlib-ablation``, ``varlib-scaling`` and the
notebooks, written once.

Stages: train a tokenizer (``varlib-train``), tokenise the data into a token cache (``varlib-tokenize``), train a
transformer on it (``varlib-train``), sample every class (:func:`varlib.models.sampling.sample_per_class`: batch i of
class c uses seed + 1000*c + i), score the samples (a sample metric, by default the emoji protocol of
:mod:`varlib.evaluation.emoji_classifier`). Each stage runs the code path of its command.

A stage is done when the file it writes last is there (:func:`stage_done`): a training run's ``metrics.json`` (written
after its model), a token cache's ``index.json`` listing both splits. A done stage is reused as it is (delete its
folder to redo it); one that is not done runs, and a training stage resumes from its last checkpoint.

One run's files lie in :class:`RunFiles`' layout: ``<root>/tokenizer/model.safetensors``, ``<root>/token_cache/``,
``<root>/<transformer_dir>/model.safetensors``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

import varlib
from varlib.configs import compose_config
from varlib.data import EmojiDataModule
from varlib.data.emoji import CachedImageDataset
from varlib.evaluation.colour import COLOURS, colour_share
from varlib.evaluation.emoji_classifier import balanced_draw, emoji_metric, labelled_images
from varlib.evaluation.scaling import (
    METRICS,
    fit_compute_frontier,
    fit_power_law,
    load_runs,
    plot_scaling_vs_compute,
    plot_scaling_vs_params,
)
from varlib.images import image_grid, save_png
from varlib.models.sampling import sample_per_class, sample_prompts
from varlib.training.runner import train_experiment

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
TOKEN_CACHE_INDEX = "index.json"
TOKEN_CACHE_SPLITS = ("train", "val")
PROJECT_DIR_VARIABLE = "VARLIB_PROJECT_DIR"
TOKENIZE_MODULE = "varlib.cli.tokenize"  # varlib-tokenize

SampleMetric = Callable[[torch.Tensor, torch.Tensor], dict]
#: factory(reference_images (N,3,H,W) in [0,1], reference_labels (N,)) -> metric(images, labels) -> dict
MetricFactory = Callable[[torch.Tensor, torch.Tensor], SampleMetric]


# -- files and stages ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFiles:
    """The files of one run (tokenizer, token cache, transformer) under ``root``; ``kind`` names the run ('demo' for
    ``make demo``'s, 'tiny' for the notebooks' own, the model's name in the ablation)."""

    root: Path
    kind: str
    transformer_dir: str = "var"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer" / MODEL_FILE

    @property
    def token_cache(self) -> Path:
        return self.root / "token_cache"

    @property
    def transformer(self) -> Path:
        return self.root / self.transformer_dir / MODEL_FILE

    def transformer_data_overrides(self) -> list[str]:
        """``varlib-train`` overrides for a transformer on this tokenizer's tokens: the token cache when it is done,
        else the emoji images at the tokenizer's resolution, tokenised on the fly."""
        if stage_done(self.token_cache):
            return [f"data.root={self.token_cache}", f"model.tokenizer_path={self.tokenizer}"]
        image_size = varlib.load(self.tokenizer).image_size
        # The transformer experiments set a token cache's root, which the emoji images have not (their class
        # balance stays).
        return ["data=emoji", "~data.root", f"data.image_size={image_size}", f"model.tokenizer_path={self.tokenizer}"]


def stage_done(out_dir: str | Path) -> bool:
    """Whether a stage's folder holds the file the stage writes last: a training run's ``metrics.json`` next to
    its model, or a token cache's ``index.json`` listing both the train and the val split."""
    out = Path(out_dir)
    if (out / MODEL_FILE).is_file() and (out / METRICS_FILE).is_file():
        return True
    index = out / TOKEN_CACHE_INDEX
    return index.is_file() and set(TOKEN_CACHE_SPLITS) <= set(json.loads(index.read_text()).get("splits", {}))


def train_stage(experiment: str, out_dir: str | Path, overrides: Sequence[str] = ()) -> dict[str, float]:
    """``varlib-train experiment=<experiment> <overrides>`` into ``out_dir`` unless that stage is done; returns
    the final validation metrics (its ``metrics.json``)."""
    out = Path(out_dir)
    if stage_done(out):
        log.info("%s is done: reusing %s", experiment, out)
        return json.loads((out / METRICS_FILE).read_text())
    return train_experiment(experiment, out, overrides)


def tokenize_stage(tokenizer: str | Path, cache_dir: str | Path, overrides: Sequence[str] = ()) -> None:
    """``varlib-tokenize tokenizer=<tokenizer> out_dir=<cache_dir> <overrides>`` unless the cache is done; Hydra's
    log and config copy go into the cache folder. Raises CalledProcessError when the command fails (its log says
    why)."""
    if stage_done(cache_dir):
        log.info("the token cache %s is done: reusing it", cache_dir)
        return
    # The command runs in a child process: the pipeline sits below the command line and imports none of it.
    subprocess.run([sys.executable, "-m", TOKENIZE_MODULE, f"tokenizer={tokenizer}", f"out_dir={cache_dir}",
                    f"hydra.run.dir={cache_dir}", *overrides], check=True)


def held_out_images(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out emoji images at ``image_size``: float (N,3,H,W) in [0,1] and their labels (N,)."""
    datamodule = EmojiDataModule(image_size=image_size)
    datamodule.setup("validate")
    return labelled_images(datamodule.val_set)


def class_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """The labels (num_classes*per_class,) of :func:`sample_per_class`'s images: class by class."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def first_per_class(samples_BCHW: torch.Tensor, num_classes: int, count: int) -> torch.Tensor:
    """The first ``count`` of each class's samples in a class-by-class batch: (num_classes*count, 3, H, W)."""
    return samples_BCHW.unflatten(0, (num_classes, -1))[:, :count].flatten(0, 1)


def save_class_rows(samples_BCHW: torch.Tensor, num_classes: int, count: int, path: Path) -> Path:
    """A PNG with one row per class of its first ``count`` samples."""
    return save_png(image_grid(first_per_class(samples_BCHW, num_classes, count), columns=count), path)


# -- make demo ---------------------------------------------------------------------------------------------------


def run_demo(
    out_dir: str | Path = "outputs/demo",
    tokenizer_experiment: str = "demo_tokenizer",
    tokenizer_overrides: Sequence[str] = (),
    transformer_experiment: str = "var_emoji",
    transformer_overrides: Sequence[str] = (),
    per_class: int = 8,
    scored_per_class: int = 50,
    seed: int = 0,
) -> dict:
    """The five stages into ``out_dir``; writes and returns ``metrics.json``'s content (see ``conf/demo.yaml``).

    The samples come from ``varlib.load`` of the saved VAR with its own sampling settings; ``samples.png`` shows
    the first ``per_class`` of each class, the emoji protocol scores the first ``scored_per_class``.
    """
    files = RunFiles(Path(out_dir), "demo")
    files.root.mkdir(parents=True, exist_ok=True)
    seconds = {}

    start = time.perf_counter()
    tokenizer_metrics = train_stage(tokenizer_experiment, files.tokenizer.parent,
                                    ["logger=csv", f"seed={seed}", *tokenizer_overrides])
    seconds["tokenizer"] = time.perf_counter() - start

    start = time.perf_counter()
    tokenize_stage(files.tokenizer, files.token_cache, ["data.num_workers=0"])
    seconds["tokenize"] = time.perf_counter() - start

    start = time.perf_counter()
    var_metrics = train_stage(transformer_experiment, files.transformer.parent,
                              ["logger=csv", f"seed={seed}", *files.transformer_data_overrides(),
                               *transformer_overrides])
    seconds["var"] = time.perf_counter() - start

    start = time.perf_counter()
    var = varlib.load(files.transformer)
    samples_BCHW = sample_per_class(var, max(per_class, scored_per_class), seed)
    save_class_rows(samples_BCHW, var.num_classes, per_class, files.root / "samples.png")
    seconds["sample"] = time.perf_counter() - start

    start = time.perf_counter()
    metric = emoji_metric(*held_out_images(var.vae.image_size), scored_per_class, seed)
    scored = first_per_class(samples_BCHW, var.num_classes, scored_per_class)
    emoji = metric(scored, class_labels(var.num_classes, scored_per_class))
    seconds["score"] = time.perf_counter() - start
    seconds["total"] = sum(seconds.values())

    metrics = {
        "psnr": tokenizer_metrics["val/psnr"],
        "codebook_usage": tokenizer_metrics["val/codebook_usage"],
        **{key: var_metrics[f"val/{key}"] for key in ("loss_avg", "loss_last", "err_avg", "err_last")},
        "emoji_classifier": emoji,
        "rows": EmojiDataModule().class_names,  # samples.png has one row per class, in this order
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "checkpoints": {"tokenizer": str(files.tokenizer), "var": str(files.transformer)},
    }
    (files.root / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


# -- make demo-text -----------------------------------------------------------------------------------------------

COLOUR_SHAPES = ("heart", "circle", "square")  # Twemoji has each in every colour of varlib.evaluation.colour
NO_GUIDANCE = {"cfg": 0.0}  # varlib's guidance (1+t)*cond - t*uncond with t = cfg*k/(K-1) is off at cfg 0


def colour_prompts() -> list[tuple[str, str]]:
    """The colour test's (prompt, colour) pairs: "<colour> <shape>" for every colour and shape, colour by colour."""
    return [(f"{colour} {shape}", colour) for colour in COLOURS for shape in COLOUR_SHAPES]


def captioned_emoji(image_size: int) -> EmojiDataModule:
    """The captioned emoji at ``image_size``, set up: ``val_set`` is the held-out split the VAR never trained on."""
    datamodule = EmojiDataModule(image_size=image_size, captions=True)
    datamodule.setup("validate")
    return datamodule


def scored_captions(datamodule: EmojiDataModule, labels_N: torch.Tensor, per_class: int,
                    seed: int) -> tuple[torch.Tensor, list[str]]:
    """``make demo-text``'s scored prompts: the class-balanced draw (indices into ``datamodule.val_set``, whose
    labels are ``labels_N``) of ``per_class`` held-out emoji per category, and their captions."""
    draw = balanced_draw(labels_N, datamodule.num_classes, per_class, seed)
    val = datamodule.val_set
    return draw, [val.captions_N[val.indices[int(i)]] for i in draw]


def emoji_named(datamodule: EmojiDataModule, captions: Sequence[str]) -> torch.Tensor:
    """The emoji images (len(captions), 3, H, W) in [0,1] captioned exactly ``captions``, from either split."""
    all_captions = datamodule.val_set.captions_N
    missing = sorted(set(captions) - set(all_captions))
    if missing:
        raise ValueError(f"expected emoji captioned {missing}, found none (captions come from emoji_caption)")
    rows = [all_captions.index(caption) for caption in captions]
    val = datamodule.val_set
    named = CachedImageDataset(val.images_NHWC, val.labels_N, rows, val.transform, all_captions)
    return torch.stack([named[i][0] for i in range(len(rows))]).add(1).div(2)


def run_demo_text(
    out_dir: str | Path = "outputs/demo_text",
    demo_dir: str | Path = "outputs/demo",
    tokenizer_experiment: str = "demo_tokenizer",
    tokenizer_overrides: Sequence[str] = (),
    transformer_experiment: str = "t2i_emoji",
    transformer_overrides: Sequence[str] = (),
    prompts: Sequence[str] = ("red heart", "cat face", "pizza"),
    per_prompt: int = 8,
    scored_per_class: int = 50,
    colour_per_prompt: int = 8,
    seed: int = 0,
) -> dict:
    """``make demo-text``: the class demo's tokenizer (``<demo_dir>/tokenizer``, trained there unless done), the
    captioned token cache and a text VAR into ``out_dir``, then samples and scores; writes and returns
    ``metrics.json``'s content (see ``conf/demo_text.yaml``).

    Sampling runs at the VAR file's own settings and again without guidance (cfg 0), with the same seeds.
    ``samples.png`` has one row of ``per_prompt`` samples per prompt (model settings). The emoji classifier scores
    ``scored_per_class`` samples per category, each of the caption of a held-out emoji drawn class-balanced; the
    colour test samples ``colour_per_prompt`` images of every :func:`colour_prompts` prompt.
    """
    demo = RunFiles(Path(demo_dir), "demo")
    files = RunFiles(Path(out_dir), "text")
    files.root.mkdir(parents=True, exist_ok=True)
    seconds = {}

    start = time.perf_counter()
    train_stage(tokenizer_experiment, demo.tokenizer.parent, ["logger=csv", f"seed={seed}", *tokenizer_overrides])
    seconds["tokenizer"] = time.perf_counter() - start

    start = time.perf_counter()
    tokenize_stage(demo.tokenizer, files.token_cache, ["data.num_workers=0", "data.captions=true"])
    seconds["tokenize"] = time.perf_counter() - start

    start = time.perf_counter()
    var_metrics = train_stage(transformer_experiment, files.transformer.parent,
                              ["logger=csv", f"seed={seed}", f"data.root={files.token_cache}",
                               f"model.tokenizer_path={demo.tokenizer}", *transformer_overrides])
    seconds["var"] = time.perf_counter() - start

    start = time.perf_counter()
    var = varlib.load(files.transformer)
    datamodule = captioned_emoji(var.vae.image_size)
    held_out_N, labels_N = labelled_images(datamodule.val_set)
    draw, scored_prompts = scored_captions(datamodule, labels_N, scored_per_class, seed)
    colour_pairs = colour_prompts()
    colour_rows = [prompt for prompt, _ in colour_pairs for _ in range(colour_per_prompt)]
    settings = {"model": var.sampling.resolve(), "no_guidance": var.sampling.resolve(**NO_GUIDANCE)}
    shown = [prompt for prompt in prompts for _ in range(per_prompt)]
    samples = {name: {"shown": sample_prompts(var, shown, seed, **setting),
                      "scored": sample_prompts(var, scored_prompts, seed, **setting),
                      "colour": sample_prompts(var, colour_rows, seed, **setting)}
               for name, setting in settings.items()}
    save_png(image_grid(samples["model"]["shown"], columns=per_prompt), files.root / "samples.png")
    seconds["sample"] = time.perf_counter() - start

    start = time.perf_counter()
    metric = emoji_metric(held_out_N, labels_N, scored_per_class, seed)
    named_colours = [colour for _, colour in colour_pairs for _ in range(colour_per_prompt)]
    real_colours = [colour for _, colour in colour_pairs]
    colour_test = {"prompts": [prompt for prompt, _ in colour_pairs], "per_prompt": colour_per_prompt,
                   "real_emoji": colour_share(emoji_named(datamodule, [p for p, _ in colour_pairs]), real_colours),
                   **{name: colour_share(s["colour"], named_colours) for name, s in samples.items()}}
    emoji = {name: metric(s["scored"], labels_N[draw]) for name, s in samples.items()}
    seconds["score"] = time.perf_counter() - start
    seconds["total"] = sum(seconds.values())

    metrics = {
        **{key: var_metrics[f"val/{key}"] for key in ("loss_avg", "loss_last", "err_avg", "err_last")},
        "sampling": settings,
        "emoji_classifier": emoji,
        "colour_test": colour_test,
        "rows": list(prompts),  # samples.png has one row per prompt, in this order
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "checkpoints": {"tokenizer": str(demo.tokenizer), "var": str(files.transformer)},
    }
    (files.root / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


# -- the paper's Table 3, row by row ----------------------------------------------------------------------------------


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
        overrides = [f"model.var.adaln={str(self.adaln).lower()}", f"model.var.attn_l2_norm={str(self.attn_l2_norm).lower()}"]
        return overrides + ([f"model.var.depth={2 * base_depth}"] if self.double_depth else [])


#: The rows, each adding one design choice to the one before (the paper's FID column: Tian et al. 2024, Table 3).
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
#: tokenizer experiment, then the transformer experiments of next-scale and raster rows
ABLATION_EXPERIMENTS = {"tokenizer": "demo_tokenizer", "next_scale": "var_emoji", "raster": "ar_emoji"}
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
                          use_token_cache: bool) -> dict[str, dict]:
    """The training stages of every model the rows of :data:`ABLATION_ROWS` sample, for one seed; per model its tokenizer and transformer
    metrics, files and batch size."""
    # The baseline's tokenizer is VAR's with the last scale alone, whatever the overrides make VAR's schedule.
    tokenizer_experiment = ABLATION_EXPERIMENTS["tokenizer"]
    side = compose_config("train", [f"experiment={tokenizer_experiment}", *tokenizer_overrides]).model.vae.patch_nums[-1]
    base_depth = compose_config("train", [f"experiment={ABLATION_EXPERIMENTS['next_scale']}", *net_overrides]).model.var.depth
    runs = {}
    for row in ABLATION_ROWS:
        if row.model in runs:
            continue
        files = ablation_files(out, seed, row)
        last_scale_only = [] if row.next_scale else [f"model.vae.patch_nums=[{side}]", "model.vae.share_quant_resi=1"]
        tokenizer_metrics = train_stage(tokenizer_experiment, files.tokenizer.parent,
                                        ["logger=csv", f"seed={seed}", "trainer.max_time=null", *tokenizer_overrides,
                                         *last_scale_only])
        if use_token_cache:
            tokenize_stage(files.tokenizer, files.token_cache)
        experiment = ABLATION_EXPERIMENTS["next_scale" if row.next_scale else "raster"]
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
    the same metric, samples per class and sampling."""
    model = varlib.load(run["files"].transformer)
    row_sampling = row.sampling(model.sampling.resolve(**sampling))
    made_with = {"metric": metric_name, "per_class": per_class, "sampling": row_sampling}
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
) -> dict:
    """Trains the rows' models and samples and scores every row for every seed; writes ``results.json`` and
    ``results.md`` and returns the former's content (see ``conf/ablation.yaml``).

    ``sampling`` (``cfg``, ``top_k``, ``top_p``) overrides the models' own settings (their ``sampling``; the two
    experiments share them) key by key where a row has that setting on; a key left out or None keeps them.
    ``metric_factory`` defaults to the emoji protocol with ``per_class`` references per class.
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
        runs = train_ablation_models(out, seed, tokenizer_overrides, net_overrides, use_token_cache)
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


# -- scaling laws (the paper's Fig. 5 and 6) -------------------------------------------------------------------------


def fit_sweep(
    sources: Sequence[str | Path], out_dir: str | Path | None = None, skip_fraction: float = 0.0
) -> dict[str, dict[str, float]]:
    """Fits every metric against N and C; returns {"N/loss_last": {alpha, beta, log10_beta, r}, ...} and, with an
    ``out_dir``, writes ``fits.json`` and one PNG per (axis, metric). beta is None when a nearly flat trend puts it
    outside the float range; log10_beta is always given. ``skip_fraction``: the share of each run's training left
    out of the compute fits (``fit_compute_frontier``)."""
    runs = load_runs(list(sources), skip_invalid=True)
    if len(runs) < 2:
        raise ValueError(f"a scaling fit needs at least 2 runs with scaling_record.json, found {len(runs)} in {list(sources)}")
    fits = {}
    for metric in METRICS:
        by_params = fit_power_law([run.params for run in runs], [run.final(metric) for run in runs])
        by_compute = fit_compute_frontier(runs, metric, skip_fraction).fit
        for variable, fit in (("N", by_params), ("C", by_compute)):
            beta = fit.beta if 0.0 < fit.beta < math.inf else None
            fits[f"{variable}/{metric}"] = {"alpha": fit.alpha, "beta": beta, "log10_beta": fit.log10_beta, "r": fit.r}
        if out_dir is not None:
            plot_scaling_vs_params(runs, metric, Path(out_dir) / f"scaling_N_{metric}.png")
            plot_scaling_vs_compute(runs, metric, Path(out_dir) / f"scaling_C_{metric}.png", skip_fraction)
    if out_dir is not None:
        summary = {"runs": [{"name": r.name, "depth": r.depth, "params": r.params} for r in runs],
                   "skip_fraction": skip_fraction, "fits": fits}
        (Path(out_dir) / "fits.json").write_text(json.dumps(summary, indent=2) + "\n")
    return fits


# -- the notebooks' models ---------------------------------------------------------------------------------------

# Overrides shared by every tiny run: CSV metrics (no TensorBoard events), no sanity pass, no wall-clock limit.
TINY_RUN = ("logger=csv", "trainer.num_sanity_val_steps=0", "trainer.max_time=null")
# A 32 px tokenizer (the quickstart's ch 24-24-48 CNN, 8x8 latent, 6 scales) with a small codebook.
TINY_TOKENIZER = (
    "data.image_size=32", "data.batch_size=16",
    "model.vae.vocab_size=256", "model.vae.ch_mult=[1,1,2]", "model.vae.patch_nums=[1,2,3,4,6,8]",
    "model.vae.using_sa=false", "model.vae.using_mid_sa=false",
    "model.optim.lr=3.0e-3", "model.optim.warmup_steps=10", "model.dead_code_restart_every=20",
    "trainer.max_steps=120", "trainer.val_check_interval=120", "trainer.limit_val_batches=2",
)
# A depth-2, width-128 VAR (0.7 M parameters) at peak lr 2.5e-3.
TINY_VAR = (
    "model.var.depth=2", "model.var.width=128", "model.var.num_heads=4", "model.optim.lr=2.5e-3",
    "data.batch_size=32", "trainer.max_steps=90", "trainer.val_check_interval=90", "trainer.limit_val_batches=2",
)
# TINY_VAR conditioned on the emoji's names (t2i_emoji: an encoder over words) through a narrower one-layer encoder.
TINY_TEXT_VAR = (*TINY_VAR, "model.var.conditioning.encoder.width=64", "model.var.conditioning.encoder.depth=1")
# The ablation at a tiny size: 32 px, an 8x8 latent (VAR's schedule [1,2,4,8], 85 tokens; the baseline's [8],
# 64 tokens), depth-1 transformers, a few steps, on-the-fly tokenisation.
TINY_ABLATION_TOKENIZER = (
    "data.image_size=32", "data.batch_size=8", "model.vae.vocab_size=64", "model.vae.ch=16", "model.vae.ch_mult=[1,1,2]",
    "model.vae.patch_nums=[1,2,4,8]", "model.optim.warmup_steps=2", "trainer.max_steps=6",
    "trainer.val_check_interval=6", "trainer.limit_val_batches=2", "trainer.num_sanity_val_steps=0",
)
TINY_ABLATION_TRANSFORMER = (
    "model.var.depth=1", "model.var.width=32", "model.var.num_heads=2", "data.batch_size=8", "trainer.max_steps=5",
    "trainer.val_check_interval=5", "trainer.limit_val_batches=2", "trainer.num_sanity_val_steps=0",
)


def project_dir() -> Path:
    """Where the notebooks look for and write runs: ``$VARLIB_PROJECT_DIR`` when set (the notebook tests point it
    at a temporary folder), else the source checkout's root (the folder holding ``pyproject.toml`` and the
    ``conf/`` that ``varlib.conf`` links to, where ``make demo`` writes), else the current directory (a wheel)."""
    if os.environ.get(PROJECT_DIR_VARIABLE):
        return Path(os.environ[PROJECT_DIR_VARIABLE])
    checkout = Path(varlib.__file__).resolve().parents[2]
    return checkout if (checkout / "pyproject.toml").is_file() and (checkout / "conf").is_dir() else Path.cwd()


def prepare_models(with_var: bool = True) -> RunFiles:
    """``make demo``'s files (``<project>/outputs/demo``) when it wrote them, else a tiny run's under
    ``<project>/outputs/notebooks``, training whatever it lacks (about a minute on two CPU cores).

    The tiny VAR tokenises its emoji batches on the fly: for a few dozen steps that is cheaper than a token cache.
    Its pictures are blurry blobs: it shows the mechanics, not the quality. ``with_var=False`` stops after the
    tokenizer, which is all a scaling sweep needs.
    """
    demo = RunFiles(project_dir() / "outputs" / "demo", "demo")
    if demo.tokenizer.is_file() and (demo.transformer.is_file() or not with_var):
        return demo
    tiny = RunFiles(project_dir() / "outputs" / "notebooks", "tiny")
    train_stage("tokenizer_emoji", tiny.tokenizer.parent, [*TINY_RUN, *TINY_TOKENIZER])
    if with_var:
        train_stage("var_emoji", tiny.transformer.parent, [*TINY_RUN, *tiny.transformer_data_overrides(), *TINY_VAR])
    return tiny


def prepare_text_model() -> Path:
    """The text VAR file of ``make demo-text`` (``<project>/outputs/demo_text/var``) when it wrote one, else a tiny
    one's under ``<project>/outputs/notebooks/text_var``, trained on the emoji names (``t2i_emoji`` with
    ``TINY_TEXT_VAR``) over :func:`prepare_models`' tiny tokenizer, training whatever is missing."""
    demo_text = RunFiles(project_dir() / "outputs" / "demo_text", "text")
    if demo_text.transformer.is_file():
        return demo_text.transformer
    tiny = RunFiles(project_dir() / "outputs" / "notebooks", "tiny", transformer_dir="text_var")
    train_stage("tokenizer_emoji", tiny.tokenizer.parent, [*TINY_RUN, *TINY_TOKENIZER])
    train_stage("t2i_emoji", tiny.transformer.parent, [*TINY_RUN, *tiny.transformer_data_overrides(), *TINY_TEXT_VAR])
    return tiny.transformer
