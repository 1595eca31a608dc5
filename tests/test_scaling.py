"""Tests of varlib.evaluation.scaling: power-law fits, Pareto frontiers, run records and plots."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from varlib.evaluation import scaling as scaling_module
from varlib.evaluation.scaling import (
    SCALING_RECORD_FILENAME,
    ScalingRecord,
    fit_compute_frontier,
    fit_power_law,
    load_runs,
    pareto_frontier,
    plot_scaling_vs_compute,
    plot_scaling_vs_params,
    training_flops,
    write_scaling_record,
)
from varlib.pipelines.scaling_sweep import fit_sweep


def power_law(x, alpha, beta):
    return (beta * np.asarray(x, dtype=np.float64)) ** alpha


def test_fit_recovers_exact_power_law_decreasing_and_increasing():
    x = np.geomspace(1e7, 1e10, 9)
    fit = fit_power_law(x, power_law(x, -0.0713, 2.3e-5))
    assert fit.alpha == pytest.approx(-0.0713, rel=1e-9)
    assert fit.beta == pytest.approx(2.3e-5, rel=1e-7)
    assert fit.r == pytest.approx(-1.0, abs=1e-12)
    assert fit.num_points == 9
    np.testing.assert_allclose(fit.predict([3e8, 5e11]), power_law([3e8, 5e11], -0.0713, 2.3e-5), rtol=1e-9)

    rising = fit_power_law(x, power_law(x, 0.5, 4.0))
    assert (rising.alpha, rising.beta, rising.r) == pytest.approx((0.5, 4.0, 1.0), rel=1e-9)


def test_nearly_flat_fit_keeps_beta_in_log_space_and_stays_usable():
    # log10 y = alpha (log10 beta + log10 x) with alpha -1e-4 and y ~ 4.6: log10 beta ~ -6600, far below 1e-308.
    x = np.geomspace(1e5, 1e7, 5)
    alpha, log10_beta = -1e-4, -6600.0
    y = 10.0 ** (alpha * (log10_beta + np.log10(x)))
    fit = fit_power_law(x, y)
    assert fit.log10_beta == pytest.approx(log10_beta, rel=1e-9)
    assert fit.beta == 0.0
    np.testing.assert_allclose(fit.predict(x), y, rtol=1e-9)
    assert fit.describe("N") == "$(1.00\\cdot10^{-6600}\\,N)^{-0.0001}$, r=-1.000"
    rising = fit_power_law(x, 10.0 ** (1e-4 * (6600.0 + np.log10(x))))
    assert rising.beta == math.inf and rising.log10_beta == pytest.approx(6600.0, rel=1e-9)


def test_fit_on_noisy_data_has_correlation_below_one():
    rng = np.random.default_rng(0)
    x = np.geomspace(1e6, 1e9, 12)
    y = power_law(x, -0.1, 1e-4) * np.exp(rng.normal(0, 0.02, x.size))
    fit = fit_power_law(x, y)
    assert -1.0 < fit.r < -0.9
    assert fit.alpha == pytest.approx(-0.1, abs=0.02)


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="> 0"):
        fit_power_law([1.0, 2.0], [1.0, -1.0])
    with pytest.raises(ValueError, match="2 distinct x"):
        fit_power_law([3.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="one length"):
        fit_power_law([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="slope is 0"):
        fit_power_law([1.0, 2.0, 4.0], [5.0, 5.0, 5.0])


def test_pareto_frontier_hand_made():
    compute = [4.0, 1.0, 2.0, 3.0, 2.0, 5.0, 6.0]
    loss = [3.0, 5.0, 4.0, 3.6, 3.5, 3.0, 2.0]
    # by compute: 1 -> 5 kept; 2 -> 3.5 kept (4.0 is not the lowest at compute 2); 3 -> 3.6 > 3.5 dropped;
    # 4 -> 3.0 kept; 5 -> 3.0 is not strictly below 3.0 dropped; 6 -> 2.0 kept.
    np.testing.assert_array_equal(pareto_frontier(compute, loss), [1, 4, 0, 6])
    # a tie at equal compute and loss is not strictly below, so neither point is on the frontier
    np.testing.assert_array_equal(pareto_frontier([1.0, 2.0, 2.0], [3.0, 1.0, 1.0]), [0])
    with pytest.raises(ValueError, match="one length"):
        pareto_frontier([1.0, 2.0], [1.0])


def test_fit_compute_frontier_recovers_the_envelope_power_law():
    alpha, beta = -0.05, 1e-12
    # Frontier points lie on the law; the other points of each curve lie above it.
    run_a = ([1e15, 1e16, 1e17], power_law([1e15, 1e16, 1e17], alpha, beta) * [1.0, 1.0, 1.3])
    run_b = ([1e16, 1e17, 1e18], power_law([1e16, 1e17, 1e18], alpha, beta) * [1.2, 1.0, 1.0])
    frontier = fit_compute_frontier([run_a, run_b])
    np.testing.assert_array_equal(frontier.compute, [1e15, 1e16, 1e17, 1e18])
    assert frontier.fit.alpha == pytest.approx(alpha, rel=1e-9)
    assert frontier.fit.beta == pytest.approx(beta, rel=1e-6)
    assert frontier.fit.r == pytest.approx(-1.0, abs=1e-12)


def test_skip_fraction_leaves_each_runs_early_plateau_out_of_the_frontier():
    alpha, beta = -0.05, 1e-12
    # Each run starts on a plateau (the first 2 of 10 evaluations, at 10% and 20% of its compute), then follows the law.
    runs = []
    for final_compute in (1e16, 1e17, 1e18):
        compute = np.linspace(0.1, 1.0, 10) * final_compute
        loss = power_law(compute, alpha, beta)
        loss[:2] = 2.0 * power_law(compute[0], alpha, beta)
        runs.append((compute, loss))
    with_plateau = fit_compute_frontier(runs)
    assert with_plateau.fit.r > -0.99 and with_plateau.compute[0] == pytest.approx(1e15)
    skipped = fit_compute_frontier(runs, skip_fraction=0.25)
    assert skipped.compute.min() == pytest.approx(3e15)
    assert skipped.fit.alpha == pytest.approx(alpha, rel=1e-9) and skipped.fit.r == pytest.approx(-1.0, abs=1e-12)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="skip_fraction must be in"):
            fit_compute_frontier(runs, skip_fraction=bad)


def test_training_flops_is_six_n_d():
    assert training_flops(310e6, 680 * 1_000_000) == 6 * 310e6 * 680e6
    with pytest.raises(ValueError):
        training_flops(-1, 10)


def make_record(name: str, depth: int, params: float, scale: float, curve: bool = True) -> ScalingRecord:
    compute = np.array([1e15, 2e15, 4e15, 8e15]) * params / 1e8
    losses = power_law(compute, -0.05, 1e-12) * scale
    metrics = {
        "loss_avg": losses if curve else losses[-1:],
        "loss_last": losses * 1.1 if curve else losses[-1:] * 1.1,
        "err_avg": np.full(compute.size if curve else 1, 90.0 - depth),
        "err_last": np.full(compute.size if curve else 1, 95.0 - depth),
    }
    return ScalingRecord(name, depth, params, compute, metrics)


def test_records_round_trip_through_json_and_load_runs(tmp_path):
    records = [make_record("d8", 8, 4e7, 1.2), make_record("d4", 4, 1e7, 1.5, curve=False)]
    for record in records:
        (tmp_path / "sweep" / record.name).mkdir(parents=True)
        write_scaling_record(tmp_path / "sweep" / record.name, record)
    loaded = load_runs(tmp_path / "sweep")
    assert [run.name for run in loaded] == ["d4", "d8"]  # sorted by params
    d4, d8 = loaded
    assert d4.depth == 4 and d4.params == 1e7
    np.testing.assert_allclose(d8.points("loss_avg")[1], records[0].metrics["loss_avg"])
    compute, values = d4.points("loss_last")  # final value only: one point at the last compute
    np.testing.assert_allclose(compute, records[1].compute[-1:])
    assert values.tolist() == pytest.approx([records[1].final("loss_last")])
    assert load_runs([tmp_path / "sweep" / "d8" / SCALING_RECORD_FILENAME])[0].name == "d8"
    stored = json.loads((tmp_path / "sweep" / "d4" / SCALING_RECORD_FILENAME).read_text())
    assert set(stored) == {"name", "depth", "params", "compute", "loss_avg", "loss_last", "err_avg", "err_last"}
    with pytest.raises(ValueError, match="metric in"):
        d4.final("accuracy")


def test_load_runs_reports_or_skips_invalid_records(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    write_scaling_record(good, make_record("good", 4, 1e7, 1.0))
    bad_length = tmp_path / "bad_length"
    bad_length.mkdir()
    data = make_record("bad", 4, 1e7, 1.0).to_json_dict()
    data["loss_avg"] = data["loss_avg"][:2]
    (bad_length / SCALING_RECORD_FILENAME).write_text(json.dumps(data))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / SCALING_RECORD_FILENAME).write_text("{not json")

    with pytest.raises(ValueError, match="bad_length.*'loss_avg' must be one number or a list of 4"):
        load_runs(bad_length)
    with pytest.raises(ValueError, match="invalid scaling record .*corrupt"):
        load_runs(corrupt)
    with pytest.warns(UserWarning, match="skipped 2 invalid scaling records"):
        runs = load_runs(tmp_path, skip_invalid=True)
    assert [run.name for run in runs] == ["good"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no scaling_record.json found"):
        load_runs(tmp_path / "empty")
    with pytest.raises(ValueError, match="neither a record file nor a folder"):
        load_runs(tmp_path / "missing")


def test_missing_keys_are_named():
    with pytest.raises(ValueError, match=r"missing keys \['err_last'\]"):
        data = make_record("x", 4, 1e7, 1.0).to_json_dict()
        del data["err_last"]
        ScalingRecord.from_json_dict(data, "x")


def test_plots_write_png_with_fit_in_legend(tmp_path):
    runs = [make_record(f"d{depth}", depth, 1e6 * depth**3, 1 + 1 / depth) for depth in (2, 4, 6, 8)]
    figure = plot_scaling_vs_params(runs, "loss_last", save_path=tmp_path / "vs_params.png")
    ax = figure.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    fit = fit_power_law([run.params for run in runs], [run.final("loss_last") for run in runs])
    legend = " ".join(text.get_text() for text in ax.get_legend().get_texts())
    assert f"{fit.alpha:.4f}" in legend and f"r={fit.r:.3f}" in legend

    figure = plot_scaling_vs_compute(runs, "loss_avg", save_path=tmp_path / "plots" / "vs_compute.png")
    legend = " ".join(text.get_text() for text in figure.axes[0].get_legend().get_texts())
    assert f"{fit_compute_frontier(runs, 'loss_avg').fit.alpha:.4f}" in legend
    for name in ("vs_params.png", "plots/vs_compute.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_fit_sweep_writes_strict_json_fits_and_plots(tmp_path):
    for depth in (2, 4, 6, 8):
        write_scaling_record(tmp_path / "sweep" / f"d{depth}" / SCALING_RECORD_FILENAME,
                             make_record(f"d{depth}", depth, 1e6 * depth**3, 1 + 1 / depth))
    fits = fit_sweep([tmp_path / "sweep"], tmp_path / "out")
    stored = json.loads((tmp_path / "out" / "fits.json").read_text(), parse_constant=pytest.fail)
    assert len(fits) == 8 and all(stored["fits"][name] == pytest.approx(fit) for name, fit in fits.items())
    runs = load_runs(tmp_path / "sweep")
    direct = fit_power_law([run.params for run in runs], [run.final("loss_last") for run in runs])
    assert fits["N/loss_last"] == pytest.approx(
        {"alpha": direct.alpha, "beta": direct.beta, "log10_beta": direct.log10_beta, "r": direct.r})
    assert len(list((tmp_path / "out").glob("scaling_*.png"))) == 8
    assert stored["skip_fraction"] == 0.0
    skipped = fit_sweep([tmp_path / "sweep"], tmp_path / "skipped", skip_fraction=0.5)
    assert json.loads((tmp_path / "skipped" / "fits.json").read_text())["skip_fraction"] == 0.5
    direct = fit_compute_frontier(runs, "loss_avg", skip_fraction=0.5).fit
    assert skipped["C/loss_avg"]["alpha"] == direct.alpha != fits["C/loss_avg"]["alpha"]
    assert skipped["N/loss_avg"] == fits["N/loss_avg"]


def test_training_imports_neither_the_scaling_fits_nor_plotting():
    """The training path (``varlib-train``, the Lightning modules, ``varlib.evaluation``) leaves the scaling
    module unimported, and the scaling module imports matplotlib only to plot. (Lightning itself imports
    matplotlib through torchmetrics when it is installed; varlib adds nothing to that.)"""
    code = (
        "import sys\n"
        "import varlib.cli.train, varlib.evaluation, varlib.training.runner\n"
        "import varlib.training.var_module, varlib.training.raster_ar_module, varlib.training.tokenizer_module\n"
        "print(sorted(m for m in sys.modules if m.startswith('varlib.evaluation.scaling')))\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip() == "[]"
    source = Path(scaling_module.__file__).read_text()
    top_level = [line for line in source.splitlines() if line.startswith(("import matplotlib", "from matplotlib"))]
    assert top_level == []
