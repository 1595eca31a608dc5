"""Scaling laws of the VAR paper (Sec. 5): power-law fits of loss/error vs model size N and training compute C.

A power law L = (beta * X)^alpha is fitted by least squares on log L = alpha * log X + alpha * log beta.
Against model size, each run gives one point (its final value). Against compute, the runs' curves are pooled
and only their lower envelope (the Pareto frontier, "C_min") is fitted, as in Kaplan et al. and the VAR paper.

Per-run records are JSON files named ``scaling_record.json`` (schema in ``ScalingRecord``), written by the
sweep with ``write_scaling_record`` and read back with ``load_runs``. Plots use matplotlib's ``Figure``
directly (no pyplot, no display), and can be saved as PNG.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from varlib.models.flops import flops_per_token

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SCALING_RECORD_FILENAME = "scaling_record.json"
METRICS = ("loss_avg", "loss_last", "err_avg", "err_last")
METRIC_LABELS = {
    "loss_avg": "$L_{avg}$: token cross-entropy, all scales",
    "loss_last": "$L_{last}$: token cross-entropy, last scale",
    "err_avg": "$Err_{avg}$: token error rate, all scales",
    "err_last": "$Err_{last}$: token error rate, last scale",
}


def training_flops(params_non_embedding: float, tokens: float) -> float:
    """Training compute estimate C = 6 N D in FLOPs (Kaplan et al. 2020), for runs known only by N and D.

    N: parameters excluding embeddings (token, class, position); D: tokens processed in training, i.e.
    images seen x tokens per image (680 for VAR at 256px). 2ND is the forward pass, 4ND the backward pass;
    attention-score FLOPs and the tokenizer are not counted. A model at hand is better counted by
    ``VAR.flops_per_token() * D``, the same formula with attention (:mod:`varlib.models.flops`), which is
    what :class:`~varlib.evaluation.scaling_callback.ScalingRecordCallback` records.
    """
    if params_non_embedding < 0 or tokens < 0:
        raise ValueError(f"expected non-negative params and tokens, got {params_non_embedding} and {tokens}")
    return flops_per_token(float(params_non_embedding)) * float(tokens)


def _positive_1d(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D sequence, got shape {array.shape}")
    if not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise ValueError(f"{name}: expected finite values > 0 for a log-log fit, got {array.tolist()}")
    return array


@dataclass(frozen=True)
class PowerLawFit:
    """L = (beta * X)^alpha, fitted in log-log space; r is the Pearson correlation of log X and log L.

    beta is stored as ``log10_beta``: for a slope near 0 (a flat trend) beta = 10^(intercept / alpha) leaves
    the float range, while predictions and the legend stay finite.
    """

    alpha: float
    log10_beta: float
    r: float
    num_points: int

    @property
    def beta(self) -> float:
        """10^log10_beta; inf or 0.0 when that is outside the float range."""
        try:
            return 10.0**self.log10_beta
        except OverflowError:
            return math.inf

    def predict(self, x: float | Sequence[float] | np.ndarray) -> np.ndarray:
        """(beta * x)^alpha for x > 0, same shape as x."""
        return np.power(10.0, self.alpha * (self.log10_beta + np.log10(np.asarray(x, dtype=np.float64))))

    def describe(self, variable: str = "X") -> str:
        """A mathtext legend string, e.g. ``$(2.30\\cdot10^{-5}\\,N)^{-0.0713}$, r=-0.998``."""
        exponent = math.floor(self.log10_beta)
        mantissa = f"{10.0 ** (self.log10_beta - exponent):.2f}"
        if mantissa == "10.00":
            mantissa, exponent = "1.00", exponent + 1
        return f"$({mantissa}\\cdot10^{{{exponent}}}\\,{variable})^{{{self.alpha:.4f}}}$, r={self.r:.3f}"


def fit_power_law(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> PowerLawFit:
    """Least-squares fit of log y = alpha log x + alpha log beta.

    Args: x (N,) and y (N,), positive, N >= 2, x not all equal.
    Raises ValueError for bad input or a zero slope (a constant cannot be written as (beta x)^alpha).
    """
    x, y = _positive_1d(x, "x"), _positive_1d(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"expected x and y of one length, got {x.size} and {y.size}")
    log_x, log_y = np.log(x), np.log(y)
    centered_x, centered_y = log_x - log_x.mean(), log_y - log_y.mean()
    if x.size < 2 or not np.any(centered_x):
        raise ValueError(f"need at least 2 distinct x values, got {x.tolist()}")
    alpha = float(centered_x @ centered_y / (centered_x @ centered_x))
    if alpha == 0.0:
        raise ValueError("the fitted slope is 0: y does not vary with x, so it is not a power law (beta x)^alpha")
    log_intercept = log_y.mean() - alpha * log_x.mean()
    r = float(centered_x @ centered_y / math.sqrt((centered_x @ centered_x) * (centered_y @ centered_y)))
    log10_beta = float(log_intercept / alpha / math.log(10.0))
    return PowerLawFit(alpha=alpha, log10_beta=log10_beta, r=r, num_points=int(x.size))


def pareto_frontier(compute: Sequence[float] | np.ndarray, loss: Sequence[float] | np.ndarray) -> np.ndarray:
    """Indices of the lower envelope, ordered by increasing compute.

    A point is kept iff its loss is strictly below the loss of every other point with lower or equal compute.
    (Two identical points therefore both drop out.)
    """
    compute, loss = np.asarray(compute, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    if compute.ndim != 1 or compute.shape != loss.shape:
        raise ValueError(f"expected compute and loss as 1-D arrays of one length, got {compute.shape}, {loss.shape}")
    order = np.lexsort((loss, compute))
    frontier = []
    best_loss_at_lower_compute = np.inf
    position = 0
    while position < order.size:
        group_end = position
        while group_end < order.size and compute[order[group_end]] == compute[order[position]]:
            group_end += 1
        best, group_size = order[position], group_end - position
        unique_best = group_size == 1 or loss[order[position + 1]] > loss[best]
        if loss[best] < best_loss_at_lower_compute and unique_best:
            frontier.append(best)
        best_loss_at_lower_compute = min(best_loss_at_lower_compute, loss[best])
        position = group_end
    return np.asarray(frontier, dtype=np.int64)


@dataclass
class ScalingRecord:
    """One training run of a scaling sweep; stored as ``scaling_record.json`` in the run's folder.

    JSON schema (all keys required except ``name``)::

        {
          "name": "d16",                    # optional; default: the record's folder name
          "depth": 16,                      # int, transformer depth
          "params": 310283520,              # N, the model-size axis (the sweep states which count it uses)
          "compute": [1.2e15, 2.4e15, ...], # C in FLOPs at each evaluation point, increasing (training_flops)
          "loss_avg": [5.1, 4.8, ...],      # token cross-entropy over all L tokens (nats)
          "loss_last": [5.9, 5.5, ...],     # token cross-entropy over the last scale's tokens
          "err_avg": [92.0, 90.5, ...],     # token error rate (100 - top-1 accuracy, %) over all tokens
          "err_last": [95.1, 94.0, ...]     # token error rate over the last scale's tokens
        }

    Each metric is either a list aligned with ``compute`` (a curve) or one number, the value at the end of
    training (the last ``compute``).
    """

    name: str
    depth: int
    params: float
    compute: np.ndarray
    metrics: dict[str, np.ndarray] = field(default_factory=dict)

    def final(self, metric: str) -> float:
        """The metric's value at the end of training."""
        return float(self._metric(metric)[-1])

    def points(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """(compute (T,), values (T,)): the whole curve, or the single final point if only that was recorded."""
        values = self._metric(metric)
        return (self.compute, values) if values.size == self.compute.size else (self.compute[-1:], values)

    def _metric(self, metric: str) -> np.ndarray:
        if metric not in METRICS:
            raise ValueError(f"expected a metric in {METRICS}, got {metric!r}")
        if metric not in self.metrics:
            raise ValueError(f"run {self.name!r} has no {metric!r}, only {sorted(self.metrics)}")
        return self.metrics[metric]

    def to_json_dict(self) -> dict:
        data = {"name": self.name, "depth": self.depth, "params": self.params, "compute": self.compute.tolist()}
        for metric in METRICS:
            values = self.metrics[metric]
            data[metric] = values.tolist() if values.size == self.compute.size else float(values[0])
        return data

    @classmethod
    def from_json_dict(cls, data: dict, default_name: str) -> ScalingRecord:
        """Validate a decoded record; raises ValueError naming the bad key."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        missing = [key for key in ("depth", "params", "compute", *METRICS) if key not in data]
        if missing:
            raise ValueError(f"missing keys {missing}")
        if not isinstance(data["depth"], int) or data["depth"] < 1:
            raise ValueError(f"'depth' must be a positive int, got {data['depth']!r}")
        if not isinstance(data["params"], (int, float)) or not data["params"] > 0:
            raise ValueError(f"'params' must be a positive number, got {data['params']!r}")
        compute = _finite_array(data["compute"], "compute")
        if compute.size == 0 or np.any(compute <= 0) or np.any(np.diff(compute) <= 0):
            raise ValueError(f"'compute' must be a non-empty increasing list of positive FLOPs, got {compute.tolist()}")
        metrics = {}
        for metric in METRICS:
            values = _finite_array(data[metric], metric)
            if values.size not in (1, compute.size):
                raise ValueError(
                    f"{metric!r} must be one number or a list of {compute.size} values (one per compute), "
                    f"got {values.size}"
                )
            metrics[metric] = values
        return cls(str(data.get("name", default_name)), data["depth"], float(data["params"]), compute, metrics)


def _finite_array(value: object, key: str) -> np.ndarray:
    try:
        array = np.atleast_1d(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{key!r} must be a number or a list of numbers, got {value!r}") from error
    if array.ndim != 1 or not np.all(np.isfinite(array)):
        raise ValueError(f"{key!r} must be a number or a flat list of finite numbers, got {value!r}")
    return array


def write_scaling_record(path: str | Path, record: ScalingRecord) -> Path:
    """Write ``record`` as JSON; an existing folder ``path`` gets ``scaling_record.json`` inside. Returns the file."""
    path = Path(path)
    if path.is_dir():
        path = path / SCALING_RECORD_FILENAME
    ScalingRecord.from_json_dict(record.to_json_dict(), record.name)  # same validation as reading
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record.to_json_dict(), indent=2))
    return path


def load_runs(source: str | Path | Sequence[str | Path], skip_invalid: bool = False) -> list[ScalingRecord]:
    """Read scaling records from files and/or folders (searched recursively for ``scaling_record.json``).

    Records are returned sorted by (params, name). A bad file raises ValueError naming it, or with
    ``skip_invalid`` is skipped and counted in one warning.
    """
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    files: list[Path] = []
    for entry in map(Path, sources):
        if entry.is_dir():
            found = sorted(entry.rglob(SCALING_RECORD_FILENAME))
            if not found:
                raise ValueError(f"no {SCALING_RECORD_FILENAME} found under {entry}")
            files.extend(found)
        elif entry.is_file():
            files.append(entry)
        else:
            raise ValueError(f"{entry} is neither a record file nor a folder")
    records, skipped = [], []
    for file in files:
        try:
            records.append(ScalingRecord.from_json_dict(json.loads(file.read_text()), file.parent.name))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
            if not skip_invalid:
                raise ValueError(f"invalid scaling record {file}: {error}") from error
            skipped.append(f"{file} ({error})")
    if skipped:
        warnings.warn(f"skipped {len(skipped)} invalid scaling records: " + "; ".join(skipped), stacklevel=2)
    return sorted(records, key=lambda record: (record.params, record.name))


@dataclass(frozen=True)
class FrontierFit:
    """A power law fitted to the Pareto frontier (compute (F,), loss (F,)) of pooled training curves."""

    fit: PowerLawFit
    compute: np.ndarray
    loss: np.ndarray


def fit_compute_frontier(
    runs: Sequence[ScalingRecord | tuple[Sequence[float], Sequence[float]]],
    metric: str = "loss_last",
    skip_fraction: float = 0.0,
) -> FrontierFit:
    """Pool all runs' (compute, metric) points, keep the Pareto frontier, fit L = (beta C)^alpha to it.

    ``runs`` are ScalingRecords (``metric`` selects the curve) or plain (compute (T,), loss (T,)) pairs.
    ``skip_fraction`` in [0, 1) leaves out each run's points below that fraction of its final compute: the start
    of training (warm-up, and the plateau where a model predicts the most frequent token) is a transient that
    lies on no power law, and its flat error rates would bend the frontier's fit.
    """
    if not 0.0 <= skip_fraction < 1.0:
        raise ValueError(f"skip_fraction must be in [0, 1), got {skip_fraction}")
    curves = []
    for run in runs:
        compute, loss = run.points(metric) if isinstance(run, ScalingRecord) else run
        compute, loss = np.asarray(compute, dtype=np.float64).ravel(), np.asarray(loss, dtype=np.float64).ravel()
        if compute.shape != loss.shape:
            raise ValueError(f"expected compute and loss of one length, got {compute.size} and {loss.size}")
        kept = compute >= skip_fraction * compute.max(initial=0.0)
        curves.append((compute[kept], loss[kept]))
    if not curves:
        raise ValueError("expected at least one run")
    compute = np.concatenate([c for c, _ in curves])
    loss = np.concatenate([v for _, v in curves])
    frontier = pareto_frontier(compute, loss)
    return FrontierFit(fit_power_law(compute[frontier], loss[frontier]), compute[frontier], loss[frontier])


def _new_figure() -> Figure:
    # matplotlib only here: the scaling sweep's training runs import this module for the record, not to plot
    from matplotlib.figure import Figure

    return Figure(figsize=(5, 4))


def _finish(figure: Figure, save_path: str | Path | None) -> Figure:
    figure.tight_layout()
    if save_path is not None:
        Path(save_path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(save_path, dpi=120)
    return figure


def _fit_line(ax, fit: PowerLawFit, x_min: float, x_max: float, variable: str) -> None:
    x_line = np.geomspace(x_min / 1.5, x_max * 1.5, 64)
    ax.plot(x_line, fit.predict(x_line), "k--", linewidth=1.2, label=f"fit {fit.describe(variable)}")


def plot_scaling_vs_params(
    runs: Sequence[ScalingRecord], metric: str = "loss_last", save_path: str | Path | None = None
) -> Figure:
    """Final ``metric`` of each run vs its parameter count N (log-log), with the fitted power law (paper Fig. 5).

    Returns the figure; writes a PNG if ``save_path`` is given.
    """
    if len(runs) < 2:
        raise ValueError(f"a fit against N needs at least 2 runs, got {len(runs)}")
    params = np.array([run.params for run in runs])
    finals = np.array([run.final(metric) for run in runs])
    fit = fit_power_law(params, finals)
    figure = _new_figure()
    ax = figure.add_subplot()
    for run, value in zip(runs, finals):
        ax.scatter(run.params, value, s=36, zorder=3, label=f"{run.name} (depth {run.depth})")
    _fit_line(ax, fit, params.min(), params.max(), "N")
    ax.set(xscale="log", yscale="log", xlabel="model parameters N", ylabel=METRIC_LABELS[metric])
    ax.legend(fontsize=7)
    return _finish(figure, save_path)


def plot_scaling_vs_compute(
    runs: Sequence[ScalingRecord], metric: str = "loss_last", save_path: str | Path | None = None,
    skip_fraction: float = 0.0,
) -> Figure:
    """Each run's ``metric`` curve vs training compute C (log-log), the Pareto frontier and its power-law fit
    (paper Fig. 6), the frontier taken without each run's first ``skip_fraction`` (see ``fit_compute_frontier``).
    Returns the figure; writes a PNG if ``save_path`` is given."""
    frontier = fit_compute_frontier(runs, metric, skip_fraction)
    figure = _new_figure()
    ax = figure.add_subplot()
    for run in runs:
        compute, values = run.points(metric)
        ax.plot(compute, values, marker="o", markersize=2.5, linewidth=1, alpha=0.7, label=run.name)
    ax.scatter(frontier.compute, frontier.loss, s=14, c="black", zorder=3, label="Pareto frontier")
    _fit_line(ax, frontier.fit, frontier.compute.min(), frontier.compute.max(), "C")
    ax.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", ylabel=METRIC_LABELS[metric])
    ax.legend(fontsize=7)
    return _finish(figure, save_path)
