"""``varlib-evaluate``: generate the evaluation set (the paper's protocol) and score it, on one or several processes.

    varlib-evaluate checkpoint=outputs/var/model.safetensors reference_npz=VIRTUAL_imagenet256_labeled.npz
    torchrun --nproc-per-node 8 -m varlib.cli.evaluate official.vae=vae_ch160v4096z32.pth official.var=var_d16.pth

The shards, their merge into an ADM ``.npz`` and the metrics: :mod:`varlib.evaluation.sampling_eval`, whose
:func:`~varlib.evaluation.sampling_eval.evaluate_samples` this wraps. Configuration: ``conf/evaluate.yaml``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from varlib.cli.entry import CONFIG_PATH, run_or_exit
from varlib.evaluation.sampling_eval import evaluate_samples


@hydra.main(config_path=CONFIG_PATH, config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(evaluate_samples, cfg)


if __name__ == "__main__":
    main()
