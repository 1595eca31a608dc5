"""Before-training figures of a `varlib-train` run: its model as the run builds it (same config and seed), validated
untrained, for tests that compare a run's results with its own starting point."""

from collections.abc import Sequence

import lightning as L
from hydra.utils import instantiate

from varlib.configs import compose_config, datamodule_config


def untrained_validation(overrides: Sequence[str]) -> dict[str, float]:
    """The validation metrics of the untrained model of ``varlib-train <overrides>`` on its validation data (built
    in the run's order after seeding with its seed, so with its initial weights)."""
    cfg = compose_config("train", list(overrides))
    L.seed_everything(cfg.seed)
    data = instantiate(datamodule_config(cfg.data))
    model = instantiate(cfg.model)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=cfg.trainer.limit_val_batches)
    return {name: float(value) for name, value in trainer.validate(model, datamodule=data, verbose=False)[0].items()}
