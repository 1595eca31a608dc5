"""Fine-tuning transfer on the bundled emoji: how fast a pretrained VAR learns classes it has never seen.

    python benchmarks/transfer.py --cache outputs/demo/token_cache --tokenizer outputs/demo/tokenizer/model.safetensors \
        --out outputs/transfer --seed 0

1. Two token caches from the demo's (``make demo``; the same tokenizer for every run): the 6 pretraining
   categories and the 3 new ones (``--new``), each relabelled from 0.
2. Pretraining: the demo's VAR recipe (``experiment=var_emoji``, 900 steps) on the 6 categories.
3. On the 3 new categories, ``--steps`` (900) steps, checkpoints at every ``--eval-at`` step (100, 300) and the
   end: ``full`` (``experiment=var_finetune`` from the pretrained file, every weight trained), ``lora``
   (the same with ``model.lora``) and ``scratch`` (``experiment=var_emoji`` with 3 classes).
4. Each checkpoint samples 50 images per new class with the model's defaults; the shipped emoji classifier scores
   them among the new classes only (``class_accuracy``: argmax over the 3 new categories, balanced;
   ``feature_distance`` to 50 held-out images per new class), beside the calibration points of held-out real,
   8x8-blurred and noise images of those classes, the same n.

Every training run uses one thread (``cpu_threads=1``) and a fixed step count; step times are wall-clock on
whatever else the machine runs (say so when reporting). Re-running resumes finished and interrupted stages, so the
methods can run as parallel processes (``--methods scratch``, ``--methods full``, ...; the pretraining is shared).
Writes ``<out>/seed<seed>/<method>/results.json`` and prints a Markdown table (all finished runs: ``--report``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import varlib
from varlib.pipelines.stages import held_out_images
from varlib.data import EmojiDataModule
from varlib.data.token_cache import read_index
from varlib.evaluation.emoji_classifier import emoji_metric, load_emoji_classifier
from varlib.training.runner import train_experiment

log = logging.getLogger(__name__)
CATEGORIES = EmojiDataModule().class_names
DEFAULT_NEW = ["Animals & Nature", "Food & Drink", "Travel & Places"]
#: the LoRA run's adapters (model.lora; peft's default target modules of varlib.training.finetune.LoraSpec)
LORA = {"r": 16, "alpha": 16, "target_modules": ["proj", "fc1", "fc2"]}


class SubsetClassifier(torch.nn.Module):
    """The emoji classifier with its decision restricted to ``classes`` (indices into its categories), which
    become classes 0..len-1; its features are unchanged."""

    def __init__(self, classifier, classes: list[int]):
        super().__init__()
        self.classifier, self.classes, self.num_classes = classifier, classes, len(classes)

    def classify(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features_BD, probs_BK = self.classifier.classify(images_BCHW)
        return features_BD, probs_BK[:, self.classes]


def subset_cache(source: Path, out: Path, classes: list[int]) -> Path:
    """A token cache of the rows of ``classes`` (old label classes[i] -> new label i) of every split."""
    if (out / "index.json").is_file():
        return out
    index = read_index(source)
    final, out = out, out.with_name(f"{out.name}.{os.getpid()}.partial")  # parallel runs: whole caches only
    out.mkdir(parents=True, exist_ok=True)
    mapping = torch.full((int(index["num_classes"]),), -1, dtype=torch.long)
    mapping[torch.tensor(classes)] = torch.arange(len(classes))
    splits = {}
    for split, shards in index["splits"].items():
        parts = [load_file(source / name) for name in shards]
        merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        keep = mapping[merged["labels"]] >= 0
        rows = {k: v[keep] for k, v in merged.items()}
        rows["labels"] = mapping[rows["labels"]]
        save_file({k: v.contiguous() for k, v in rows.items()}, out / f"{split}-00000.safetensors")
        splits[split] = [f"{split}-00000.safetensors"]
    (out / "index.json").write_text(json.dumps({**index, "num_classes": len(classes), "splits": splits,
                                                "skipped": {}}, indent=1))
    try:
        out.rename(final)
    except OSError:  # another run finished the same cache first
        shutil.rmtree(out)
    return final


def step_checkpoints(run_dir: Path) -> dict[int, Path]:
    """The run's step checkpoints (``step=N.ckpt``) by step."""
    found = {}
    for path in (run_dir / "checkpoints").glob("*step=*.ckpt"):
        found[int(path.stem.split("step=")[1].split("-")[0])] = path
    return found


def train_stage(experiment: str, run_dir: Path, overrides: list[str], eval_every: int) -> None:
    """Runs (or resumes) one training stage with checkpoints every ``eval_every`` steps."""
    if not (run_dir / "model.safetensors").is_file():
        train_experiment(experiment, run_dir, [
            "logger=csv", "cpu_threads=1", "+callbacks.model_checkpoint.every_n_train_steps=" + str(eval_every),
            "callbacks.model_checkpoint.save_top_k=-1", "+callbacks.model_checkpoint.filename='{step}'",
            "callbacks.progress_bar.refresh_rate=100", *overrides])


def seconds_per_step(run_dir: Path) -> float:
    """Wall-clock seconds per step between the run's first and last step checkpoints (from the start of the run,
    its CSV log's hparams.yaml, when it has one checkpoint)."""
    checkpoints = step_checkpoints(run_dir)
    if not checkpoints:
        return float("nan")
    first, last = min(checkpoints), max(checkpoints)
    if first == last:
        start = run_dir / "csv" / "hparams.yaml"
        return (checkpoints[last].stat().st_mtime - start.stat().st_mtime) / last
    return (checkpoints[last].stat().st_mtime - checkpoints[first].stat().st_mtime) / (last - first)


def trainable_parameters(var, lora: dict | None) -> int:
    """Parameters a run trains: all of the transformer's, or with LoRA the adapters' (r x (in + out) per layer) and
    the class embedding."""
    if lora is None:
        return sum(p.numel() for p in var.parameters())
    return var.class_emb.weight.numel() + sum(
        lora["r"] * (m.in_features + m.out_features) for name, m in var.named_modules()
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in lora["target_modules"])


def score(model_path: Path, metric, per_class: int, seed: int) -> dict:
    """The new classes' figures of the model at ``model_path``: ``per_class`` samples per class (the model's
    sampling defaults, seed + 1000 * class)."""
    var = varlib.load(model_path)
    images = torch.cat([var.generate([c] * per_class, seed=seed + 1000 * c) for c in range(var.num_classes)])
    scores = metric(images, torch.arange(var.num_classes).repeat_interleave(per_class))
    return {"class_accuracy": scores["class_accuracy"], "feature_distance": scores["feature_distance"],
            "calibration": scores["calibration"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("outputs/demo/token_cache"))
    parser.add_argument("--tokenizer", type=Path, default=Path("outputs/demo/tokenizer/model.safetensors"))
    parser.add_argument("--out", type=Path, default=Path("outputs/transfer"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--new", nargs=3, default=DEFAULT_NEW, help="the three categories held out of pretraining")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--pretrain-steps", type=int, default=900)
    parser.add_argument("--eval-at", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--methods", nargs="+", default=["scratch", "full", "lora"])
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--report", action="store_true", help="print the table of the finished runs and exit")
    parser.add_argument("--no-train", action="store_true",
                        help="score the checkpoints the runs have written so far (e.g. while they still train)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    new = [CATEGORIES.index(name) for name in args.new]
    old = [i for i in range(len(CATEGORIES)) if i not in new]
    out = args.out / f"seed{args.seed}"
    if args.report:
        print(markdown_table({"runs": {m: json.loads((out / m / "results.json").read_text()) for m in args.methods
                                       if (out / m / "results.json").is_file()}}))
        return
    old_cache = subset_cache(args.cache, args.out / "cache_pretrain", old)
    new_cache = subset_cache(args.cache, args.out / "cache_new", new)
    common = [f"seed={args.seed}", f"model.tokenizer_path={args.tokenizer}"]
    eval_every = min(args.eval_at)

    pretrained = out / "pretrain" / "model.safetensors"
    if ("full" in args.methods or "lora" in args.methods) and not args.no_train:
        train_stage("var_emoji", out / "pretrain", [*common, f"data.root={old_cache}", "model.var.num_classes=6",
                                                    f"trainer.max_steps={args.pretrain_steps}",
                                                    f"model.class_names={json.dumps([CATEGORIES[i] for i in old])}"],
                    args.pretrain_steps)
    names = json.dumps([CATEGORIES[i] for i in new])
    recipes = {
        "scratch": ("var_emoji", ["model.var.num_classes=3"]),
        "full": ("var_finetune", [f"model.init_from={pretrained}"]),
        "lora": ("var_finetune", [f"model.init_from={pretrained}", f"model.lora={{r: {LORA['r']}, alpha: {LORA['alpha']}}}"]),
    }
    images, labels = held_out_images(32)
    keep = torch.isin(labels, torch.tensor(new))
    relabel = {c: i for i, c in enumerate(new)}
    metric = emoji_metric(images[keep], torch.tensor([relabel[int(c)] for c in labels[keep]]), args.per_class,
                          args.seed, SubsetClassifier(load_emoji_classifier(), new))
    for method in args.methods:
        experiment, overrides = recipes[method]
        run_dir = out / method
        if not args.no_train:
            train_stage(experiment, run_dir, [*common, f"data.root={new_cache}", f"trainer.max_steps={args.steps}",
                                              f"model.class_names={names}", *overrides], eval_every)
        checkpoints = step_checkpoints(run_dir)
        if (run_dir / "model.safetensors").is_file():
            checkpoints[args.steps] = run_dir / "model.safetensors"
        run = {"seconds_per_step": seconds_per_step(run_dir)}
        for step in sorted({*args.eval_at, args.steps} & checkpoints.keys()):
            run.setdefault("trainable_parameters", trainable_parameters(
                varlib.load(checkpoints[step]), LORA if method == "lora" else None))
            run[str(step)] = score(checkpoints[step], metric, args.per_class, args.seed)
        (run_dir / "results.json").write_text(json.dumps({"seed": args.seed, "new": args.new, **run}, indent=2) + "\n")
        print(markdown_table({"runs": {method: run}}))


def markdown_table(results: dict) -> str:
    """The runs' figures and the calibration points as a Markdown table."""
    rows = ["| run | steps | class accuracy (new 3) | feature distance | trainable parameters | s/step |",
            "|---|---|---|---|---|---|"]
    calibration = {}
    for method, run in results["runs"].items():
        for step, figures in run.items():
            if step.isdigit():
                calibration = figures["calibration"]
                rows.append(f"| {method} | {step} | {figures['class_accuracy']:.2f} | {figures['feature_distance']:.1f} "
                            f"| {run['trainable_parameters']:,} | {run['seconds_per_step']:.2f} |")
    for name, figures in calibration.items():
        rows.append(f"| calibration: {name} | | {figures['class_accuracy']:.2f} | {figures['feature_distance']:.1f} | | |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
