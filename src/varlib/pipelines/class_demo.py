"""``make demo`` (``varlib-demo``): a tokenizer, its token cache and a class-conditional VAR on the emoji, then
samples of every class (:func:`varlib.models.sampling.sample_per_class`: batch i of class c uses seed + 1000*c + i)
scored by the emoji protocol of :mod:`varlib.evaluation.emoji_classifier`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import varlib
from varlib.data import EmojiDataModule
from varlib.evaluation.emoji_classifier import emoji_metric
from varlib.models.sampling import sample_per_class
from varlib.pipelines.stages import (
    RunFiles,
    StageClock,
    class_labels,
    first_per_class,
    held_out_images,
    save_class_rows,
    tokenize_stage,
    train_stage,
    write_metrics,
)


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
    clock = StageClock()
    with clock.stage("tokenizer"):
        tokenizer_metrics = train_stage(tokenizer_experiment, files.tokenizer.parent,
                                        ["logger=csv", f"seed={seed}", *tokenizer_overrides])
    with clock.stage("tokenize"):
        tokenize_stage(files.tokenizer, files.token_cache, ["data.num_workers=0"])
    with clock.stage("var"):
        var_metrics = train_stage(transformer_experiment, files.transformer.parent,
                                  ["logger=csv", f"seed={seed}", *files.transformer_data_overrides(),
                                   *transformer_overrides])
    with clock.stage("sample"):
        var = varlib.load(files.transformer)
        samples_BCHW = sample_per_class(var, max(per_class, scored_per_class), seed)
        save_class_rows(samples_BCHW, var.num_classes, per_class, files.root / "samples.png")
    with clock.stage("score"):
        metric = emoji_metric(*held_out_images(var.vae.image_size), scored_per_class, seed)
        scored = first_per_class(samples_BCHW, var.num_classes, scored_per_class)
        emoji = metric(scored, class_labels(var.num_classes, scored_per_class))

    return write_metrics(files.root, {
        "psnr": tokenizer_metrics["val/psnr"],
        "codebook_usage": tokenizer_metrics["val/codebook_usage"],
        **{key: var_metrics[f"val/{key}"] for key in ("loss_avg", "loss_last", "err_avg", "err_last")},
        "emoji_classifier": emoji,
        "rows": EmojiDataModule().class_names,  # samples.png has one row per class, in this order
        "seconds": clock.seconds(),
        "checkpoints": {"tokenizer": str(files.tokenizer), "var": str(files.transformer)},
    })
