"""`varlib-evaluate` in shards: several processes (torchrun, gloo on CPU) and killed runs give the files of one
uninterrupted process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import varlib
from varlib.cli.entry import run_or_exit
from varlib.evaluation import sampling_eval
from varlib.evaluation.sampling_eval import evaluate_samples
from varlib.configs import compose_config
from varlib.evaluation import load_adm_npz, write_adm_npz

TESTS = Path(__file__).parent
NUM_CLASSES, NUM_PER_CLASS, BATCH_SIZE = 3, 4, 2  # 12 images in 6 batches: rank 1 of 2 samples batches 1, 3, 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A random 32px VAR with 3 classes and an ADM reference batch of 10 random images."""
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    vae = varlib.MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, patch_nums=(1, 2, 4, 8, 16), ch_mult=(1, 1),
                                 num_res_blocks=1, using_sa=False, using_mid_sa=False)
    var = varlib.VAR(vae, varlib.VARConfig(depth=2, num_classes=NUM_CLASSES, width=64, num_heads=2))
    varlib.save_var(var, root / "var.safetensors")
    reference_NHWC = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    write_adm_npz(root / "reference.npz", reference_NHWC)
    return {"root": root, "model": root / "var.safetensors", "reference": root / "reference.npz"}


def overrides(setup: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [f"checkpoint={setup['model']}", f"num_per_class={NUM_PER_CLASS}", f"batch_size={BATCH_SIZE}", "seed=3",
            "num_is_splits=2", "device=cpu", f"out_dir={out}", f"reference_npz={setup['reference']}",
            "~inception", "+inception._target_=helpers.extractors.KillableExtractor", f"hydra.run.dir={out}/hydra",
            *extra]


def evaluate_in_subprocess(setup: dict[str, Path], out: Path, processes: int,
                           kill: str | None = None) -> subprocess.CompletedProcess:
    """The command line, alone or under torchrun; ``kill='rank:n'`` SIGKILLs that rank at its batch n + 1."""
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    env.pop("KILL_EXTRACTOR", None)
    if kill is not None:
        env["KILL_EXTRACTOR"] = kill
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone",
                                          f"--nproc_per_node={processes}"]
    command = [sys.executable, *launcher, "-m", "varlib.cli.evaluate", *overrides(setup, out)]
    return subprocess.run(command, cwd=setup["root"], env=env, capture_output=True, text=True, timeout=900)


def outputs(out: Path) -> tuple[np.ndarray, dict]:
    return load_adm_npz(out / "samples.npz"), json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def one_process(setup) -> tuple[np.ndarray, dict]:
    out = setup["root"] / "one"
    completed = evaluate_in_subprocess(setup, out, 1)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return outputs(out)


def assert_same_evaluation(out: Path, expected: tuple[np.ndarray, dict], processes: int) -> None:
    samples_NHWC, record = outputs(out)
    np.testing.assert_array_equal(samples_NHWC, expected[0])
    assert record["metrics"] == expected[1]["metrics"]  # exactly: the same features in the same order
    assert set(record["metrics"]) == {"is_mean", "is_std", "fid", "precision", "recall"}
    assert record["processes"] == processes and expected[1]["processes"] == 1
    assert not (out / "shards").exists()  # deleted after the merge


@pytest.mark.slow  # three processes
def test_two_processes_write_the_npz_and_metrics_of_one(setup, one_process):
    out = setup["root"] / "two"
    completed = evaluate_in_subprocess(setup, out, 2)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert_same_evaluation(out, one_process, processes=2)


@pytest.mark.slow  # five processes
def test_killed_two_process_evaluation_resumes_from_its_shards(setup, one_process):
    out = setup["root"] / "killed"
    killed = evaluate_in_subprocess(setup, out, 2, kill="1:2")  # rank 1 dies while it samples batch 5
    assert killed.returncode != 0
    shards = sorted(p.name for p in (out / "shards").iterdir() if p.suffix == ".safetensors")
    assert {"batch-000001.safetensors", "batch-000003.safetensors"} <= set(shards)
    assert "batch-000005.safetensors" not in shards and len(shards) < 6
    assert not (out / "samples.npz").exists() and not (out / "metrics.json").exists()

    resumed = evaluate_in_subprocess(setup, out, 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "rank 1: 2 of its 3 batches were already sampled" in resumed.stdout + resumed.stderr
    assert_same_evaluation(out, one_process, processes=2)


class Interrupted(Exception):
    """Stands for a kill after some shards were written."""


def test_interrupted_evaluation_resumes_and_refuses_other_settings(setup, tmp_path, monkeypatch, caplog):
    def config(*extra: str):
        return compose_config("evaluate", overrides(setup, tmp_path, *extra))

    uninterrupted = evaluate_samples(config("out_dir=" + str(tmp_path / "whole")))
    write_shard, written = sampling_eval.write_shard, []

    def write_two_shards(path, tensors, signature):
        if len(written) == 2:
            raise Interrupted
        write_shard(path, tensors, signature)
        written.append(path.name)

    monkeypatch.setattr(sampling_eval, "write_shard", write_two_shards)
    with pytest.raises(Interrupted):
        evaluate_samples(config())
    monkeypatch.undo()
    assert written == ["batch-000000.safetensors", "batch-000001.safetensors"]

    with pytest.raises(SystemExit):
        run_or_exit(evaluate_samples, config("seed=4"))
    assert "batch-000000.safetensors was written by an evaluation with other settings (seed: 3 -> 4)" in caplog.text

    (tmp_path / "shards" / "batch-000001.safetensors").write_bytes(b"cut short")
    with pytest.raises(SystemExit):
        run_or_exit(evaluate_samples, config())
    assert "batch-000001.safetensors: expected an evaluation shard, got an unreadable file" in caplog.text

    (tmp_path / "shards" / "batch-000001.safetensors").unlink()
    caplog.clear()
    with caplog.at_level("INFO"):
        resumed = evaluate_samples(config())
    assert "rank 0: 1 of its 6 batches were already sampled" in caplog.text
    np.testing.assert_array_equal(load_adm_npz(resumed.npz_path), load_adm_npz(uninterrupted.npz_path))
    assert resumed.metrics == uninterrupted.metrics and len(resumed.metrics) == 5
    assert not (tmp_path / "shards").exists()
