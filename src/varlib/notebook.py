"""Models for the notebooks in ``notebooks/``: the ones ``make demo`` trained, or tiny ones trained on the spot.

Every notebook starts with :func:`prepare_models`. It returns the files of ``make demo``
(``<project>/outputs/demo``) when they exist; otherwise it trains a tiny 32 px tokenizer and a tiny VAR under
``<project>/outputs/notebooks``, about a minute on two CPU cores, through the same code as the command line
(``varlib.training.runner.train_experiment``). The tiny VAR tokenises its emoji batches on the fly instead of
reading a token cache: for a few dozen steps that is cheaper than tokenising the whole data set first. Finished
stages are reused, so the notebooks share that run whichever of them comes first. Pictures from the tiny run are
blurry blobs: it shows the mechanics, not the quality.

``<project>`` is ``$VARLIB_PROJECT_DIR`` when set (the notebook tests point it at a temporary folder), else the
repository root when varlib runs from a source checkout (where ``make demo`` and ``varlib-train --multirun``
write), else the current directory (an installed wheel).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import varlib
from varlib.training.runner import train_experiment

PROJECT_DIR_VARIABLE = "VARLIB_PROJECT_DIR"

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
# A depth-2, width-128 VAR (0.7 M parameters); peak lr 2e-2 * 32 / 256 = 2.5e-3.
TINY_VAR = (
    "model.var.depth=2", "model.var.width=128", "model.var.num_heads=4", "model.optim.base_lr=2.0e-2",
    "data.batch_size=32", "trainer.max_steps=90", "trainer.val_check_interval=90", "trainer.limit_val_batches=2",
)


@dataclass(frozen=True)
class ModelFiles:
    """The files of one quickstart run, in the layout of ``varlib.cli.demo``; ``kind`` is 'demo' or 'tiny'."""

    root: Path
    kind: str

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer" / "model.safetensors"

    @property
    def token_cache(self) -> Path:
        """Only ``make demo`` writes one; the tiny run tokenises on the fly."""
        return self.root / "token_cache"

    @property
    def var(self) -> Path:
        return self.root / "var" / "model.safetensors"

    def has_token_cache(self) -> bool:
        """True when the cache's index lists both the train and the val split (a finished ``varlib-tokenize``)."""
        index = self.token_cache / "index.json"
        return index.is_file() and {"train", "val"} <= set(json.loads(index.read_text()).get("splits", {}))

    def var_data_overrides(self) -> list[str]:
        """``varlib-train`` overrides for training a VAR on this tokenizer's tokens: the token cache when there
        is one, else the emoji images at the tokenizer's resolution, tokenised on the fly."""
        if self.has_token_cache():
            return [f"data.root={self.token_cache}", f"model.tokenizer_path={self.tokenizer}"]
        image_size = varlib.load(self.tokenizer).image_size
        # The VAR experiments set a token cache's root, which the emoji images have not (their class balance stays).
        return ["data=emoji", "~data.root", f"data.image_size={image_size}", f"model.tokenizer_path={self.tokenizer}"]


def project_dir() -> Path:
    """``$VARLIB_PROJECT_DIR`` when set, else the source checkout's root (the folder holding ``pyproject.toml``
    and the ``conf/`` that ``varlib.conf`` links to), else the current directory."""
    if os.environ.get(PROJECT_DIR_VARIABLE):
        return Path(os.environ[PROJECT_DIR_VARIABLE])
    checkout = Path(varlib.__file__).resolve().parents[2]
    return checkout if (checkout / "pyproject.toml").is_file() and (checkout / "conf").is_dir() else Path.cwd()


def train_once(experiment: str, out_dir: Path, overrides: Sequence[str]) -> Path:
    """``out_dir/model.safetensors``, trained first if it is missing (``varlib-train experiment=<experiment>`` with
    :data:`TINY_RUN` and ``overrides``)."""
    model_path = out_dir / "model.safetensors"
    if not model_path.is_file():
        train_experiment(experiment, out_dir, [*TINY_RUN, *overrides])
    return model_path


def prepare_models(with_var: bool = True) -> ModelFiles:
    """The demo's files when ``make demo`` wrote them, else the tiny run's, training whatever it lacks.

    ``with_var=False`` stops after the tokenizer, which is all a scaling sweep needs.
    """
    demo = ModelFiles(project_dir() / "outputs" / "demo", "demo")
    if demo.tokenizer.is_file() and (demo.var.is_file() or not with_var):
        return demo
    tiny = ModelFiles(project_dir() / "outputs" / "notebooks", "tiny")
    train_once("tokenizer_emoji", tiny.tokenizer.parent, TINY_TOKENIZER)
    if with_var:
        train_once("var_emoji", tiny.var.parent, [*tiny.var_data_overrides(), *TINY_VAR])
    return tiny

# The ablation (varlib.cli.ablation) at a tiny size: 32 px, an 8x8 latent (VAR's schedule [1,2,4,8], 85 tokens; the
# baseline's [8], 64 tokens), depth-1 transformers, a few steps, on-the-fly tokenisation.
TINY_ABLATION_TOKENIZER = (
    "data.image_size=32", "data.batch_size=8", "model.vae.vocab_size=64", "model.vae.ch=16", "model.vae.ch_mult=[1,1,2]",
    "model.vae.patch_nums=[1,2,4,8]", "model.optim.warmup_steps=2", "trainer.max_steps=6",
    "trainer.val_check_interval=6", "trainer.limit_val_batches=2", "trainer.num_sanity_val_steps=0",
)
TINY_ABLATION_TRANSFORMER = (
    "model.net.depth=1", "model.net.width=32", "model.net.num_heads=2", "data.batch_size=8", "trainer.max_steps=5",
    "trainer.val_check_interval=5", "trainer.limit_val_batches=2", "trainer.num_sanity_val_steps=0",
)
