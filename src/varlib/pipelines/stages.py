"""The stage runner behind ``varlib-demo``, ``varlib-demo-text``, ``varlib-ablation`` and the notebooks.

Stages: train a tokenizer (``varlib-train``), tokenise the data into a token cache (``varlib-tokenize``), train a
transformer on it (``varlib-train``), sample, score. Each stage runs the code path of its command.

A stage is done when the file it writes last is there (:func:`stage_done`): a training run's ``metrics.json`` (written
after its model), a token cache's ``index.json`` listing both splits. A done stage is reused as it is (delete its
folder to redo it); one that is not done runs, and a training stage resumes from its last checkpoint.

One run's files lie in :class:`RunFiles`' layout: ``<root>/tokenizer/model.safetensors``, ``<root>/token_cache/``,
``<root>/<transformer_dir>/model.safetensors``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

import varlib
from varlib.configs import compose_config
from varlib.data import EmojiDataModule
from varlib.data.tokenizing import tokenize_dataset
from varlib.evaluation.emoji_classifier import labelled_images
from varlib.images import image_grid, save_png
from varlib.training.runner import train_experiment

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
TOKEN_CACHE_INDEX = "index.json"
TOKEN_CACHE_SPLITS = ("train", "val")
PROJECT_DIR_VARIABLE = "VARLIB_PROJECT_DIR"

SampleMetric = Callable[[torch.Tensor, torch.Tensor], dict]
#: factory(reference_images (N,3,H,W) in [0,1], reference_labels (N,)) -> metric(images, labels) -> dict
MetricFactory = Callable[[torch.Tensor, torch.Tensor], SampleMetric]


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


class StageClock:
    """Wall seconds of each stage of one run: ``with clock.stage("var"): ...``; :meth:`seconds` adds the total."""

    def __init__(self) -> None:
        self.elapsed: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.elapsed[name] = time.perf_counter() - start

    def seconds(self) -> dict[str, float]:
        """Each stage's seconds and their ``total``, to 0.1 s."""
        totals = {**self.elapsed, "total": sum(self.elapsed.values())}
        return {name: round(value, 1) for name, value in totals.items()}


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
    """``varlib-tokenize tokenizer=<tokenizer> out_dir=<cache_dir> <overrides>`` unless the cache is done."""
    if stage_done(cache_dir):
        log.info("the token cache %s is done: reusing it", cache_dir)
        return
    tokenize_dataset(compose_config("tokenize", [f"tokenizer={tokenizer}", f"out_dir={cache_dir}", *overrides]))


def write_metrics(out_dir: Path, metrics: dict) -> dict:
    """Writes ``metrics`` as ``<out_dir>/metrics.json`` and returns them."""
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def held_out_images(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out emoji images at ``image_size``: float (N,3,H,W) in [0,1] and their labels (N,)."""
    datamodule = EmojiDataModule(image_size=image_size)
    datamodule.setup("validate")
    return labelled_images(datamodule.val_set)


def class_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """The labels (num_classes*per_class,) of :func:`~varlib.models.sampling.sample_per_class`'s images: class by
    class."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def first_per_class(samples_BCHW: torch.Tensor, num_classes: int, count: int) -> torch.Tensor:
    """The first ``count`` of each class's samples in a class-by-class batch: (num_classes*count, 3, H, W)."""
    return samples_BCHW.unflatten(0, (num_classes, -1))[:, :count].flatten(0, 1)


def save_class_rows(samples_BCHW: torch.Tensor, num_classes: int, count: int, path: Path) -> Path:
    """A PNG with one row per class of its first ``count`` samples."""
    return save_png(image_grid(first_per_class(samples_BCHW, num_classes, count), columns=count), path)


def project_dir() -> Path:
    """Where the notebooks look for and write runs: ``$VARLIB_PROJECT_DIR`` when set (the notebook tests point it
    at a temporary folder), else the source checkout's root (the folder holding ``pyproject.toml`` and the
    ``conf/`` that ``varlib.conf`` links to, where ``make demo`` writes), else the current directory (a wheel)."""
    if os.environ.get(PROJECT_DIR_VARIABLE):
        return Path(os.environ[PROJECT_DIR_VARIABLE])
    checkout = Path(varlib.__file__).resolve().parents[2]
    return checkout if (checkout / "pyproject.toml").is_file() and (checkout / "conf").is_dir() else Path.cwd()
