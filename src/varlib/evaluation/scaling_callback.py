"""Records a VAR run's scaling-law point(s): parameters N, compute C along training, held-out metrics."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np

from varlib.evaluation.scaling import METRICS, SCALING_RECORD_FILENAME, ScalingRecord, write_scaling_record


class ScalingRecordCallback(L.Callback):
    """After every validation, appends (C, L_avg, L_last, Err_avg, Err_last) and rewrites the record.

    C = ``var.flops_per_token()`` x tokens trained so far (global batch x L x optimizer steps); N counts the
    transformer's non-embedding parameters. The record lands in ``<dirpath or trainer.default_root_dir>/
    scaling_record.json`` in the schema that ``varlib.evaluation.scaling.load_runs`` reads. The points travel in the
    checkpoint (``state_dict``), so a resumed run's record holds the points from before the resume, each once.
    """

    def __init__(self, dirpath: str | None = None, name: str | None = None):
        self.dirpath, self.name = dirpath, name
        self.points: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, list[dict[str, float]]]:
        return {"points": [dict(point) for point in self.points]}

    def load_state_dict(self, state_dict: dict[str, list[dict[str, float]]]) -> None:
        self.points = [dict(point) for point in state_dict["points"]]

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_step == 0:
            return
        logged = trainer.callback_metrics
        if any(f"val/{m}" not in logged for m in METRICS):
            return
        var = pl_module.transformer
        tokens = trainer.global_step * pl_module.global_batch_size() * var.L
        point = {"compute": var.flops_per_token() * tokens, **{m: float(logged[f"val/{m}"]) for m in METRICS}}
        if self.points and point["compute"] <= self.points[-1]["compute"]:
            return
        self.points.append(point)
        if trainer.is_global_zero:
            self.write(trainer, pl_module)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        var = pl_module.transformer
        record = ScalingRecord(
            name=self.name or f"d{var.depth}", depth=var.depth, params=float(var.num_non_embedding_params()),
            compute=np.array([p["compute"] for p in self.points]),
            metrics={m: np.array([p[m] for p in self.points]) for m in METRICS},
        )
        out = Path(self.dirpath or trainer.default_root_dir) / SCALING_RECORD_FILENAME
        return write_scaling_record(out, record)
