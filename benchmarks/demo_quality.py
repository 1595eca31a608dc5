"""Scores a ``make demo`` output folder with the shipped emoji classifier, beyond what ``metrics.json`` holds.

    .venv/bin/python benchmarks/demo_quality.py outputs/demo [--sampling cfg=1.5 --sampling cfg=3,top_k=200] [--cli]

Prints JSON: the calibration points (real held-out, 8x8-blurred, noise), the tokenizer's reconstructions of the
``real`` calibration draw (the ceiling the VAR's samples can reach through this tokenizer) and, when the folder
holds a VAR, its samples under each ``--sampling`` setting (the model's defaults when none is given). All
figures follow the emoji protocol (``varlib.evaluation.emoji_classifier``), 50 per class unless ``--per-class``.
``--cli`` also runs ``varlib-sample checkpoint=<demo>/var/model.safetensors per_class=N seed=S`` with no sampling
keys (the file's own settings), scores its PNGs the same way beside ``metrics.json``'s figures (``make demo``'s)
and says whether they equal ``sample_per_class``'s images.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import varlib
from varlib.data import EmojiDataModule
from varlib.evaluation.adm_npz import to_uint8_nhwc
from varlib.evaluation.emoji_classifier import (
    balanced_draw,
    calibration_points,
    dataset_labels,
    emoji_scores,
    halfway_progress,
    images_of,
    labelled_images,
    load_emoji_classifier,
)
from varlib.models.sampling import sample_per_class


def varlib_sample_images(checkpoint: Path, per_class: int, seed: int, threads: int | None) -> torch.Tensor:
    """``varlib-sample``'s per-class samples of ``checkpoint`` (no sampling keys), read back from its PNGs:
    (num_classes*per_class, 3, H, W) in [0,1], class by class."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with tempfile.TemporaryDirectory() as out_dir:
        subprocess.run([sys.executable, "-m", "varlib.cli.sample", f"checkpoint={checkpoint}", f"per_class={per_class}",
                        f"seed={seed}", "device=cpu", f"out_dir={out_dir}", f"hydra.run.dir={out_dir}/hydra"],
                       check=True, env=env)
        images_NHWC = np.stack([np.asarray(Image.open(path).convert("RGB"))
                                for path in sorted(Path(out_dir).glob("*_class*.png"))])
    return torch.from_numpy(images_NHWC).permute(0, 3, 1, 2).float().div(255)


def parse_sampling(text: str) -> dict[str, float | int]:
    """'cfg=3,top_k=200,top_p=0.95' -> {'cfg': 3.0, 'top_k': 200, 'top_p': 0.95}."""
    options = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in ("cfg", "top_k", "top_p"):
            raise ValueError(f"--sampling: expected keys cfg, top_k, top_p, got {key!r}")
        options[key] = int(value) if key == "top_k" else float(value)
    return options


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo_dir", type=Path)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampling", action="append", default=[], metavar="cfg=..,top_k=..,top_p=..")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared CPU)")
    parser.add_argument("--cli", action="store_true", help="also score varlib-sample's samples (see above)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    tokenizer = varlib.load(args.demo_dir / "tokenizer" / "model.safetensors")
    datamodule = EmojiDataModule(image_size=tokenizer.image_size)
    datamodule.setup("validate")
    classifier = load_emoji_classifier()
    num_classes = datamodule.num_classes
    reference_features, points = calibration_points(classifier, *labelled_images(datamodule.val_set), args.per_class,
                                                    args.seed)
    # the ``real`` draw of calibration_points, through the tokenizer
    draw = balanced_draw(dataset_labels(datamodule.val_set), num_classes, args.per_class, args.seed + 1)
    real_BCHW = images_of(datamodule.val_set, draw)
    reconstructed_BCHW = torch.cat([tokenizer.decode_tokens(tokenizer.encode_tokens(chunk.mul(2).sub(1))).add(1).div(2)
                                    for chunk in real_BCHW.split(50)])
    labels_B = dataset_labels(datamodule.val_set)[draw]
    record = {"calibration": points}
    scores = emoji_scores(classifier, reconstructed_BCHW, labels_B, reference_features)
    record["tokenizer_reconstructions"] = {**scores, "halfway_progress": halfway_progress(scores, points)}

    var_path = args.demo_dir / "var" / "model.safetensors"
    if var_path.is_file():
        var = varlib.load(var_path)
        sample_labels = torch.arange(num_classes).repeat_interleave(args.per_class)
        record["samples"] = []
        for text in args.sampling or [""]:
            options = parse_sampling(text)
            samples_BCHW = sample_per_class(var, args.per_class, args.seed, **options)
            scores = emoji_scores(classifier, samples_BCHW, sample_labels, reference_features)
            record["samples"].append({"sampling": options or "model defaults", **scores,
                                      "halfway_progress": halfway_progress(scores, points)})
        if args.cli:
            cli_BCHW = varlib_sample_images(var_path, args.per_class, args.seed, args.threads)
            scores = emoji_scores(classifier, cli_BCHW, sample_labels, reference_features)
            library_BCHW = sample_per_class(var, args.per_class, args.seed)
            demo = json.loads((args.demo_dir / "metrics.json").read_text())["emoji_classifier"]
            record["varlib_sample"] = {
                "sampling": asdict(var.sampling), **scores, "halfway_progress": halfway_progress(scores, points),
                "images_equal_sample_per_class": bool((to_uint8_nhwc(library_BCHW) == to_uint8_nhwc(cli_BCHW)).all()),
                "make_demo": {key: demo[key] for key in ("class_accuracy", "feature_distance", "halfway_progress")},
            }
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
