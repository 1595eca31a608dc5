"""``varlib-train``: trains any varlib LightningModule (tokenizer or VAR) from a Hydra config, then exports it.

    varlib-train experiment=tokenizer_emoji
    python -m varlib.cli.train experiment=tokenizer_emoji trainer.max_steps=200 model.optim.lr=3e-4
    varlib-train --multirun experiment=tokenizer_emoji model.optim.lr=1e-4,3e-4

A run writes to ``outputs/<task_name>/`` (multirun: ``multirun/<task_name>/<job number>/``), so running the same
command again resumes where it stopped; a command that changes the run's settings stops with the list of changes,
``resume=false`` starts afresh and ``resume=force`` continues anyway. A bad configuration (or a changed one) exits
with status 2 and one logged message, before anything is trained (:func:`~varlib.cli.entry.run_or_exit`). What a
run builds, resumes, writes and exports: :mod:`varlib.training.runner`, whose :func:`~varlib.training.runner.train`
this wraps.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from varlib.cli.entry import CONFIG_PATH, run_or_exit
from varlib.training.runner import train


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, float]:
    return run_or_exit(train, cfg)


if __name__ == "__main__":
    main()
