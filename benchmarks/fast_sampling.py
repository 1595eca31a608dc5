"""The fast sampling options against the exact sampler: speed (images/s) and the emoji classifier's quality.

    .venv/bin/python benchmarks/fast_sampling.py --checkpoint outputs/demo/var/model.safetensors \
        [--drafter outputs/var_emoji_d6/model.safetensors] [--d16] --json fast_sampling.json

Settings: the exact sampler, each option alone (``cfg_until``, ``stop_after``, ``prune``, ``draft``,
``compile=True``) and combinations (``--settings`` names them, see ``SETTINGS``). For each:

- speed: ``var.generate`` (all sampled scales and the decoder) of 1 image and of ``--batch`` images of one class,
  the settings' calls interleaved ``--repeats`` times after a warm-up (compiling, for ``compile``), so every
  setting sees the same machine load; printed as images/s (median) and the median of the per-repeat ratios to the
  exact sampler's time. ``--d16``: the same ratios at batch 1 on the official 256 px d16 shape (random weights,
  the official sampling settings).
- quality (``--checkpoint`` only): ``--per-class`` samples of every class (``sample_per_class``, as ``make demo``
  samples) per seed of ``--seeds``, scored with the shipped emoji classifier (class accuracy, feature distance
  against the held-out draw, ``varlib.evaluation.emoji_classifier``).

Without ``--checkpoint`` the demo's shape is built with random weights (speed only). ``draft`` settings need a
drafter (``--drafter``, or ``--random-drafter-depth`` for speed only): the drafter samples the first scales, the
checkpoint's model the rest, so their speed is compared with the drafter's own exact sampler as well. Writes a
plot of speed against quality (``--plot``) when quality was measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

import varlib
from varlib.configs import compose_config
from varlib.evaluation.emoji_classifier import emoji_metric
from varlib.models.sampling import Draft, sample_per_class
from varlib.pipelines.stages import class_labels, held_out_images

# name -> generate options; "draft" is replaced by Draft(drafter, scales)
SETTINGS = {
    "exact": {},
    "compile": {"compile": True},
    "cfg_until=4": {"cfg_until": 4},
    "cfg_until=3": {"cfg_until": 3},
    "stop_after=5": {"stop_after": 5},
    "prune=0.5": {"prune": 0.5},
    "prune=0.25": {"prune": 0.25},
    "draft=4": {"draft": 4},
    "stop_after=4": {"stop_after": 4},
    "cfg_until=4,stop_after=5": {"cfg_until": 4, "stop_after": 5},
    "cfg_until=3,stop_after=5": {"cfg_until": 3, "stop_after": 5},
    "cfg_until=3,prune=0.5": {"cfg_until": 3, "prune": 0.5},
    "compile,cfg_until=4,stop_after=5": {"compile": True, "cfg_until": 4, "stop_after": 5},
}
D16_SETTINGS = {  # the same ideas on the 10-scale schedule (1..16)
    "exact": {},
    "cfg_until=8": {"cfg_until": 8},
    "stop_after=9": {"stop_after": 9},
    "prune=0.5": {"prune": 0.5},
    "cfg_until=8,prune=0.5": {"cfg_until": 8, "prune": 0.5},
    "cfg_until=8,stop_after=9": {"cfg_until": 8, "stop_after": 9},
    "cfg_until=6,stop_after=9,prune=0.5": {"cfg_until": 6, "stop_after": 9, "prune": 0.5},
}


def demo_shape(depth: int | None = None, vae: varlib.MultiScaleVQVAE | None = None) -> varlib.VAR:
    """The demo's VAR shape (``experiment=var_emoji``; ``depth``: the scaling sweep's shape at that depth) with
    random weights and the demo's sampling settings, on ``vae`` (default: the demo's tokenizer shape,
    ``experiment=demo_tokenizer``, random weights)."""
    torch.manual_seed(0)
    if vae is None:
        tokenizer = compose_config("train", ["experiment=demo_tokenizer"]).model
        vae = varlib.MultiScaleVQVAE(**OmegaConf.to_container(tokenizer.vae, resolve=True))
    overrides = ["experiment=var_emoji"] if depth is None else ["experiment=var_emoji_scaling",
                                                                 f"model.var.depth={depth}"]
    model = compose_config("train", overrides).model
    var = varlib.VAR(vae, varlib.VARConfig.from_dict(OmegaConf.to_container(model.var, resolve=True))).eval()
    var.sampling = var.sampling.from_dict(OmegaConf.to_container(model.sampling, resolve=True))
    return var


def d16_shape() -> varlib.VAR:
    """The official 256 px d16 shape (tokenizer ch 160, 4096 codes, 10 scales) with random weights."""
    torch.manual_seed(0)
    vae = varlib.MultiScaleVQVAE()
    return varlib.VAR(vae, varlib.VARConfig(depth=16, num_classes=1000)).eval()


def options_of(setting: dict, drafter: varlib.VAR | None) -> dict:
    options = dict(setting)
    if "draft" in options:
        options["draft"] = Draft(drafter, options["draft"])
    return options


@torch.no_grad()
def speed(var: varlib.VAR, settings: dict[str, dict], drafter: varlib.VAR | None, batch: int, repeats: int,
          reference: varlib.VAR | None = None) -> dict[str, dict]:
    """images/s and time ratios to ``exact`` of each setting, calls interleaved; ``reference`` (the drafter) also
    times its own exact sampler as ``drafter exact``."""
    calls = {name: (lambda o=options_of(s, drafter): var.generate([0] * batch, seed=0, **o))
             for name, s in settings.items()}
    if reference is not None:
        calls["drafter exact"] = lambda: reference.generate([0] * batch, seed=0)
    for call in calls.values():  # warm-up (and compiling)
        call()
    seconds = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
    result = {}
    for name, times in seconds.items():
        ratios = [exact / own for exact, own in zip(seconds["exact"], times)]
        result[name] = {"images_per_s": round(batch / statistics.median(times), 2),
                        "speedup_median": round(statistics.median(ratios), 3),
                        "speedup_min": round(min(ratios), 3)}
        if reference is not None:
            result[name]["speedup_vs_drafter_exact"] = round(statistics.median(
                [d / own for d, own in zip(seconds["drafter exact"], times)]), 3)
    return result


@torch.no_grad()
def quality(var: varlib.VAR, settings: dict[str, dict], drafter: varlib.VAR | None, seeds: list[int],
            per_class: int) -> dict[str, dict]:
    """Class accuracy and feature distance of each setting's samples, per sampling seed (the reference draw and
    calibration of seed 0, as ``make demo``)."""
    metric = emoji_metric(*held_out_images(var.vae.image_size), per_class, 0)
    labels = class_labels(var.num_classes, per_class)
    result = {}
    for name, setting in settings.items():
        if "compile" in setting:  # the same samples as without it (tests/test_fast_sampling.py)
            continue
        options = options_of(setting, drafter)
        scores = {}
        for seed in seeds:
            images = sample_per_class(var, per_class, seed, **options)
            out = metric(images, labels)
            scores[f"seed{seed}"] = {k: round(out[k], 4) for k in ("class_accuracy", "feature_distance")}
        result[name] = scores
    return result


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, scores in results["quality"].items():
        x = results["speed_b1"][name]["speedup_median"]
        for seed, marker in zip(scores, "os"):
            axes[0].scatter(x, scores[seed]["class_accuracy"], marker=marker, color="C0" if name == "exact" else "C1")
            axes[1].scatter(x, scores[seed]["feature_distance"], marker=marker,
                            color="C0" if name == "exact" else "C1")
        axes[0].annotate(name, (x, scores["seed" + str(results["seeds"][0])]["class_accuracy"]), fontsize=7)
        axes[1].annotate(name, (x, scores["seed" + str(results["seeds"][0])]["feature_distance"]), fontsize=7)
    for axis, label in zip(axes, ("class accuracy (higher is better)", "feature distance (lower is better)")):
        axis.set_xlabel("speed-up over the exact sampler, batch 1 (median ratio)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    figure.suptitle("Fast sampling on the demo VAR: speed against quality (o: seed 0, s: seed 1)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="the demo's VAR file; left out: the demo's shape, random weights")
    parser.add_argument("--drafter", help="a deeper VAR file of the same tokenizer (draft settings)")
    parser.add_argument("--random-drafter-depth", type=int, default=6,
                        help="without --drafter: a random drafter of the scaling sweep's shape at this depth")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--d16", action="store_true", help="also the ratios on the official d16 shape, batch 1")
    parser.add_argument("--d16-repeats", type=int, default=3)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--plot", default="benchmarks/figures/fast_sampling.png")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    var = varlib.load(args.checkpoint).eval() if args.checkpoint else demo_shape()
    if args.drafter:
        drafter = varlib.load(args.drafter).eval()
    else:  # speed only: a random drafter on the same tokenizer
        drafter = demo_shape(args.random_drafter_depth, var.vae)
    settings = {name: SETTINGS[name] for name in args.settings}
    results = {"settings": settings, "threads": args.threads, "seeds": args.seeds,
               "model": args.checkpoint or "demo shape, random weights", "drafter": args.drafter or
               f"depth {args.random_drafter_depth}, random weights",
               "drafter_params": sum(p.numel() for p in drafter.parameters()),
               "model_params": sum(p.numel() for p in var.parameters())}
    results["speed_b1"] = speed(var, settings, drafter, 1, args.repeats, reference=drafter)
    print(json.dumps({"speed_b1": results["speed_b1"]}), flush=True)
    results[f"speed_b{args.batch}"] = speed(var, settings, drafter, args.batch, max(2, args.repeats // 2),
                                            reference=drafter)
    print(json.dumps({f"speed_b{args.batch}": results[f"speed_b{args.batch}"]}), flush=True)
    if args.d16:
        results["d16_speed_b1"] = speed(d16_shape(), D16_SETTINGS, None, 1, args.d16_repeats)
        print(json.dumps({"d16_speed_b1": results["d16_speed_b1"]}), flush=True)
    if args.checkpoint and not args.skip_quality:
        drafter_for_quality = drafter if args.drafter else None
        chosen = {n: s for n, s in settings.items() if "draft" not in s or drafter_for_quality is not None}
        results["quality"] = quality(var, chosen, drafter_for_quality, args.seeds, args.per_class)
        print(json.dumps({"quality": results["quality"]}), flush=True)
        plot(results, Path(args.plot))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
