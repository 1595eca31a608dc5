"""``varlib-ablation``: the paper's Table 3 on the emoji data, row by row (raster AR, VAR bare, +AdaLN, +top-k,
+guidance, +attention normalisation, +depth) at equal budget.

    varlib-ablation [out_dir=outputs/ablation] [seeds=[0,1]] [cpu_threads=1] ['sampling={cfg: 2, top_k: 100}']

The stages are :func:`varlib.pipelines.ablation.run_ablation`'s; the keys: ``conf/ablation.yaml`` (``varlib-ablation --help``).
"""

from __future__ import annotations

import hydra
import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from varlib.cli.entry import CONFIG_PATH, run_or_exit
from varlib.pipelines.ablation import ablation_table, run_ablation


def run(cfg: DictConfig) -> dict:
    """Runs the ablation from a composed ``ablation`` config and prints its table."""
    tokenizer_overrides, net_overrides = list(cfg.tokenizer_overrides), list(cfg.transformer_overrides)
    if cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
        tokenizer_overrides.append(f"cpu_threads={cfg.cpu_threads}")
        net_overrides.append(f"cpu_threads={cfg.cpu_threads}")
    factory = get_object(cfg.metric) if cfg.metric else None
    report = run_ablation(cfg.out_dir, list(cfg.seeds), tokenizer_overrides, net_overrides, cfg.per_class,
                          OmegaConf.to_container(cfg.sampling), factory, cfg.token_cache,
                          {name: tuple(experiments) for name, experiments in cfg.models.items()})
    print(ablation_table(report["results"]))
    return report


@hydra.main(config_path=CONFIG_PATH, config_name="ablation", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
