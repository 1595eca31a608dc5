"""The scaling laws of a depth sweep (the paper's Fig. 5 and 6; ``varlib-scaling``): power-law fits of every metric
against parameters N and compute C, with their plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from varlib.evaluation.scaling import (
    METRICS,
    fit_compute_frontier,
    fit_power_law,
    load_runs,
    plot_scaling_vs_compute,
    plot_scaling_vs_params,
)

def fit_sweep(
    sources: Sequence[str | Path], out_dir: str | Path | None = None, skip_fraction: float = 0.0
) -> dict[str, dict[str, float]]:
    """Fits every metric against N and C; returns {"N/loss_last": {alpha, beta, log10_beta, r}, ...} and, with an
    ``out_dir``, writes ``fits.json`` and one PNG per (axis, metric). beta is None when a nearly flat trend puts it
    outside the float range; log10_beta is always given. ``skip_fraction``: the share of each run's training left
    out of the compute fits (``fit_compute_frontier``)."""
    runs = load_runs(list(sources), skip_invalid=True)
    if len(runs) < 2:
        raise ValueError(f"a scaling fit needs at least 2 runs with scaling_record.json, found {len(runs)} in {list(sources)}")
    fits = {}
    for metric in METRICS:
        by_params = fit_power_law([run.params for run in runs], [run.final(metric) for run in runs])
        by_compute = fit_compute_frontier(runs, metric, skip_fraction).fit
        for variable, fit in (("N", by_params), ("C", by_compute)):
            beta = fit.beta if 0.0 < fit.beta < math.inf else None
            fits[f"{variable}/{metric}"] = {"alpha": fit.alpha, "beta": beta, "log10_beta": fit.log10_beta, "r": fit.r}
        if out_dir is not None:
            plot_scaling_vs_params(runs, metric, Path(out_dir) / f"scaling_N_{metric}.png")
            plot_scaling_vs_compute(runs, metric, Path(out_dir) / f"scaling_C_{metric}.png", skip_fraction)
    if out_dir is not None:
        summary = {"runs": [{"name": r.name, "depth": r.depth, "params": r.params} for r in runs],
                   "skip_fraction": skip_fraction, "fits": fits}
        (Path(out_dir) / "fits.json").write_text(json.dumps(summary, indent=2) + "\n")
    return fits
