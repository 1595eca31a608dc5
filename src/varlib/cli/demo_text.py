"""``varlib-demo-text``: text-to-image on the captioned emoji end to end, on a CPU (what ``make demo-text`` runs).

    varlib-demo-text [out_dir=outputs/demo_text] [demo_dir=outputs/demo] [seed=0] ['prompts=[red heart, pizza]']

The stages are :func:`varlib.pipelines.text_demo.run_demo_text`'s; the keys and what ``metrics.json`` holds:
``conf/demo_text.yaml`` (``varlib-demo-text --help``).
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

from varlib.cli.entry import CONFIG_PATH, run_or_exit
from varlib.pipelines.text_demo import run_demo_text


def run(cfg: DictConfig) -> dict:
    """Runs the text demo from a composed ``demo_text`` config and prints its metrics."""
    metrics = run_demo_text(cfg.out_dir, cfg.demo_dir, cfg.tokenizer.experiment, list(cfg.tokenizer.overrides),
                            cfg.var.experiment, list(cfg.var.overrides), list(cfg.prompts), cfg.per_prompt,
                            cfg.scored_per_class, cfg.colour_per_prompt, cfg.seed)
    print(json.dumps(metrics, indent=2))
    print(f"samples: {cfg.out_dir}/samples.png (one row per prompt, in the order of metrics.json's rows)")
    return metrics


@hydra.main(config_path=CONFIG_PATH, config_name="demo_text", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
