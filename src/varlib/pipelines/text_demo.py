"""``make demo-text`` (``varlib-demo-text``): the class demo's tokenizer, a token cache of the captioned emoji and a
text VAR, then samples at the VAR file's own settings and without guidance, scored by the emoji protocol (the
captions of held-out emoji) and the colour test ("<colour> <shape>" prompts, :mod:`varlib.evaluation.colour`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

import varlib
from varlib.data import EmojiDataModule
from varlib.evaluation.colour import COLOURS, colour_share
from varlib.evaluation.emoji_classifier import balanced_draw, emoji_metric, labelled_images
from varlib.images import image_grid, save_png
from varlib.models.sampling import sample_prompts
from varlib.pipelines.stages import RunFiles, StageClock, tokenize_stage, train_stage, write_metrics

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
    return draw, [datamodule.val_set.caption(int(i)) for i in draw]


def emoji_named(datamodule: EmojiDataModule, captions: Sequence[str]) -> torch.Tensor:
    """The emoji images (len(captions), 3, H, W) in [0,1] captioned exactly ``captions``, from either split."""
    named = datamodule.val_set.captioned(list(captions))
    return torch.stack([named[i][0] for i in range(len(named))]).add(1).div(2)


def colour_test(samples: dict[str, torch.Tensor], datamodule: EmojiDataModule, per_prompt: int) -> dict:
    """The share of each setting's colour-test samples (``samples``: setting -> the :func:`colour_prompts` rows,
    ``per_prompt`` each) in their prompt's colour, beside that of the real emoji so named."""
    pairs = colour_prompts()
    prompts, colours = [prompt for prompt, _ in pairs], [colour for _, colour in pairs]
    named_colours = [colour for colour in colours for _ in range(per_prompt)]
    return {"prompts": prompts, "per_prompt": per_prompt,
            "real_emoji": colour_share(emoji_named(datamodule, prompts), colours),
            **{name: colour_share(images, named_colours) for name, images in samples.items()}}


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
    clock = StageClock()
    with clock.stage("tokenizer"):
        train_stage(tokenizer_experiment, demo.tokenizer.parent, ["logger=csv", f"seed={seed}", *tokenizer_overrides])
    with clock.stage("tokenize"):
        tokenize_stage(demo.tokenizer, files.token_cache, ["data.num_workers=0", "data.captions=true"])
    with clock.stage("var"):
        var_metrics = train_stage(transformer_experiment, files.transformer.parent,
                                  ["logger=csv", f"seed={seed}", f"data.root={files.token_cache}",
                                   f"model.tokenizer_path={demo.tokenizer}", *transformer_overrides])
    with clock.stage("sample"):
        var = varlib.load(files.transformer)
        datamodule = captioned_emoji(var.vae.image_size)
        held_out_N, labels_N = labelled_images(datamodule.val_set)
        draw, scored_prompts = scored_captions(datamodule, labels_N, scored_per_class, seed)
        colour_rows = [prompt for prompt, _ in colour_prompts() for _ in range(colour_per_prompt)]
        settings = {"model": var.sampling.resolve(), "no_guidance": var.sampling.resolve(**NO_GUIDANCE)}
        shown = [prompt for prompt in prompts for _ in range(per_prompt)]
        samples = {name: {"shown": sample_prompts(var, shown, seed, **setting),
                          "scored": sample_prompts(var, scored_prompts, seed, **setting),
                          "colour": sample_prompts(var, colour_rows, seed, **setting)}
                   for name, setting in settings.items()}
        save_png(image_grid(samples["model"]["shown"], columns=per_prompt), files.root / "samples.png")
    with clock.stage("score"):
        metric = emoji_metric(held_out_N, labels_N, scored_per_class, seed)
        colour = colour_test({name: s["colour"] for name, s in samples.items()}, datamodule, colour_per_prompt)
        emoji = {name: metric(s["scored"], labels_N[draw]) for name, s in samples.items()}

    return write_metrics(files.root, {
        **{key: var_metrics[f"val/{key}"] for key in ("loss_avg", "loss_last", "err_avg", "err_last")},
        "sampling": settings,
        "emoji_classifier": emoji,
        "colour_test": colour,
        "rows": list(prompts),  # samples.png has one row per prompt, in this order
        "seconds": clock.seconds(),
        "checkpoints": {"tokenizer": str(demo.tokenizer), "var": str(files.transformer)},
    })
