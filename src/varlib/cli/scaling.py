"""``varlib-scaling``: fits and plots the power laws of a depth sweep (the paper's Fig. 5 and 6).

    varlib-train --multirun experiment=var_emoji_scaling model.var.depth=1,2,3,4,5
    varlib-scaling sources=multirun/var_emoji_scaling out_dir=outputs/scaling skip_fraction=0.2

The fits are :func:`varlib.pipelines.scaling_sweep.fit_sweep`'s; the keys: ``conf/scaling.yaml`` (``varlib-scaling --help``).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, ListConfig

from varlib.cli.entry import CONFIG_PATH, run_or_exit
from varlib.pipelines.scaling_sweep import fit_sweep


def run(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Fits the sweep of a composed ``scaling`` config and prints one line per fit."""
    sources = list(cfg.sources) if isinstance(cfg.sources, ListConfig) else [cfg.sources]
    fits = fit_sweep(sources, cfg.out_dir, cfg.skip_fraction)
    for name, fit in fits.items():
        print(f"{name:14s} alpha={fit['alpha']:+.4f} beta=10^{fit['log10_beta']:.2f} r={fit['r']:+.4f}")
    return fits


@hydra.main(config_path=CONFIG_PATH, config_name="scaling", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
