"""``varlib-demo``: the end-to-end quickstart on the bundled emoji data, on a CPU (what ``make demo`` runs).

    varlib-demo [out_dir=outputs/demo] [seed=0] ['var.overrides=["trainer.max_steps=300"]']

The stages are :func:`varlib.pipelines.class_demo.run_demo`'s; the keys and what ``metrics.json`` holds: ``conf/demo.yaml``
(``varlib-demo --help``).
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

from varlib.cli.entry import CONFIG_PATH, run_or_exit
from varlib.pipelines.class_demo import run_demo


def run(cfg: DictConfig) -> dict:
    """Runs the demo from a composed ``demo`` config and prints its metrics."""
    metrics = run_demo(cfg.out_dir, cfg.tokenizer.experiment, list(cfg.tokenizer.overrides), cfg.var.experiment,
                       list(cfg.var.overrides), cfg.per_class, cfg.scored_per_class, cfg.seed)
    print(json.dumps(metrics, indent=2))
    print(f"samples: {cfg.out_dir}/samples.png (one row per class, in the order of metrics.json's rows)")
    return metrics


@hydra.main(config_path=CONFIG_PATH, config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
