"""`varlib-train` for VAR end to end: SIGKILL mid-run then the same command resumes and matches an uninterrupted run,
on one process and on DDP and FSDP2 with 2 CPU processes (gloo), EMA on and off, killed at an epoch's end and in its
middle, with the logged history and the scaling record kept whole; SIGTERM to a 2-process run saves and exits
cleanly, and the same command ends like an uninterrupted run; a changed command stops before training; in-loop
FID/IS equal on 1 and 2 processes; invalid configurations fail before training.

A killed or two-rank run is a process of its own; any other run goes through the command's Hydra entry point in the
test's process (helpers.commands)."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.cli import assert_usage_error
from helpers.commands import run_in_process
from helpers.token_caches import tokenize_to_cache

import varlib
from varlib.models.vqvae import MultiScaleVQVAE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """A tiny random tokenizer and a 16-image train / 8-image val token cache."""
    tmp = tmp_path_factory.mktemp("resume")
    torch.manual_seed(0)
    vae = MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4)).eval()
    varlib.save_tokenizer(vae, tmp / "tok.safetensors")
    images, labels = torch.rand(24, 3, 64, 64) * 2 - 1, torch.arange(24) % 3
    batches = [(images[i:i + 8], labels[i:i + 8]) for i in range(0, 24, 8)]
    tokenize_to_cache(vae, batches[:2], tmp / "cache", "train", num_classes=3)
    tokenize_to_cache(vae, batches[2:], tmp / "cache", "val", num_classes=3)
    return tmp


def train_command(tmp: Path, out: str, *extra: str, experiment: str = "var_emoji") -> tuple[list[str], dict[str, str]]:
    """The command line of a tiny VAR run on the tiny cache, and its environment."""
    overrides = [
        f"experiment={experiment}", f"paths.output_dir={tmp / out}", f"data.root={tmp / 'cache'}",
        f"model.tokenizer_path={tmp / 'tok.safetensors'}", "data.batch_size=4", "model.var.depth=2",
        "model.var.num_classes=3", "model.var.width=64", "model.var.num_heads=2", "model.var.drop_path_rate=0.1",
        "model.var.cond_drop_rate=0.5", "model.var.init_adaln_gamma=1.0", "model.optim.lr=7.8125e-3",
        "trainer.max_steps=12", "trainer.max_time=null", "trainer.val_check_interval=4", "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0", "logger=csv", "trainer.enable_progress_bar=false",
        "callbacks.progress_bar=null", "trainer.log_every_n_steps=1", *extra,
    ]
    # tests/ for the helper callbacks and extractor, after whatever PYTHONPATH selects the varlib under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT / "tests")]))}
    return [sys.executable, "-m", "varlib.cli.train", *overrides], env


def train(tmp: Path, out: str, *extra: str, experiment: str = "var_emoji") -> subprocess.CompletedProcess:
    command, env = train_command(tmp, out, *extra, experiment=experiment)
    return subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)


def train_here(tmp: Path, out: str, *extra: str, experiment: str = "var_emoji") -> subprocess.CompletedProcess:
    """:func:`train`'s run in this process, for a run that needs no process of its own (one rank, not killed)."""
    command, _ = train_command(tmp, out, *extra, experiment=experiment)
    return run_in_process(command, tmp)


def logged_train_steps(run_dir: Path) -> list[int]:
    """The step of every train/loss row of metrics.csv, in file order (repeats included)."""
    rows = csv.DictReader((run_dir / "csv" / "metrics.csv").open())
    return [int(row["step"]) for row in rows if row.get("train/loss")]


def step_losses(run_dir: Path) -> dict[int, float]:
    rows = csv.DictReader((run_dir / "csv" / "metrics.csv").open())
    return {int(row["step"]): float(row["train/loss"]) for row in rows if row.get("train/loss")}


TWO_CPU_PROCESSES = ("trainer.devices=2", "trainer.accelerator=cpu", "trainer.precision=32-true")
# Killed after step 8, the end of an epoch (16 rows: 4 batches on one process, 2 per rank on two), or after step 9,
# one batch into an epoch of 2 per rank, validating (and so saving) every 3 steps.
MID_EPOCH = ("trainer.val_check_interval=3",)
# Every strategy, EMA on and off and both kill points on two processes, each pair of them at least once (a DDP run
# killed at an epoch's end, with no EMA, added nothing the others miss).
RESUME_CASES = {
    "one_process": ((), 8),
    "ddp_ema_mid_epoch": (("trainer=ddp", *TWO_CPU_PROCESSES, "model.ema_decay=0.9", *MID_EPOCH), 9),
    "fsdp_ema": (("trainer=fsdp", *TWO_CPU_PROCESSES, "model.ema_decay=0.9"), 8),
    "fsdp_mid_epoch": (("trainer=fsdp", *TWO_CPU_PROCESSES, *MID_EPOCH), 9),
}


def assert_same_export(want_dir: Path, got_dir: Path) -> None:
    want, got = load_file(want_dir / "model.safetensors"), load_file(got_dir / "model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=key)


def shorten_a_shard(checkpoint: Path) -> str:
    """Cuts the last checkpoint as a kill during its save would: a file truncated, or a folder's shard."""
    target = checkpoint if checkpoint.is_file() else sorted(checkpoint.glob("*.distcp"))[0]
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    return target.name


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_sigkill_then_same_command_resumes_and_matches_uninterrupted_run(tiny_cache, case):
    extra, kill_step = RESUME_CASES[case]
    train_whole = train_here if case == "one_process" else train  # one rank needs a process only to be killed
    reference = train_whole(tiny_cache, f"reference_{case}", *extra)
    assert reference.returncode == 0, reference.stderr[-3000:]

    resumed_dir = tiny_cache / f"resumed_{case}"
    # the same command twice: killed once (helpers.callbacks.KillAtStep), then resumed
    extra = (*extra, "+callbacks.kill._target_=helpers.callbacks.KillAtStep", f"+callbacks.kill.step={kill_step}")
    killed = train(tiny_cache, resumed_dir.name, *extra)
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = resumed_dir / "checkpoints" / "last.ckpt"
    sharded = case.startswith("fsdp")
    assert last.is_dir() == sharded  # FSDP2 writes a distributed checkpoint: a folder with one shard per rank
    meta = torch.load(last / "meta.pt" if sharded else last, weights_only=True)
    assert meta["global_step"] == kill_step
    assert not (resumed_dir / "model.safetensors").exists()
    if case != "one_process":  # a kill during the save of last.ckpt: resume from the step checkpoint beside it
        damaged = shorten_a_shard(last)
        (step_checkpoint,) = last.parent.glob(f"epoch=*-step={kill_step}.ckpt")

    resumed = train_whole(tiny_cache, resumed_dir.name, *extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    if case == "one_process":
        assert f"resuming from {last}" in output  # not a fresh (equally deterministic) run
    else:
        assert f"the last checkpoint {last} is incomplete or corrupt" in output and damaged in output
        assert f"resuming from {step_checkpoint}" in output
    # Same batches (order seeded by epoch, mid-epoch position saved with the loader), label-dropout/drop-path masks
    # (seeded by step), optimizer state and EMA.
    want_losses, got_losses = step_losses(tiny_cache / f"reference_{case}"), step_losses(resumed_dir)
    assert logged_train_steps(resumed_dir) == list(range(12))  # the history of both segments, each step once
    for step, loss in got_losses.items():
        assert loss == pytest.approx(want_losses[step], abs=1e-6), step
    assert_same_export(tiny_cache / f"reference_{case}", resumed_dir)
    # varlib.load of the last checkpoint (FSDP2's is a folder) gives the weights export wrote, EMA ones included
    exported = varlib.load(resumed_dir / "model.safetensors").state_dict()
    from_checkpoint = varlib.load(resumed_dir / "checkpoints" / "last.ckpt").state_dict()
    assert from_checkpoint.keys() == exported.keys()
    for key, tensor in exported.items():
        assert torch.equal(from_checkpoint[key], tensor), key
    reference_metrics = json.loads((tiny_cache / f"reference_{case}" / "metrics.json").read_text())
    resumed_metrics = json.loads((resumed_dir / "metrics.json").read_text())
    assert resumed_metrics["val/loss_avg"] == pytest.approx(reference_metrics["val/loss_avg"], abs=1e-6)
    assert reference_metrics["val/loss_avg"] < 3.0  # it learned (log 32 = 3.47 at init)


@pytest.mark.parametrize("override,message", [
    ("model.var.depth=0", "depth must be >= 1"),
    ("model.var.patch_nums=[1,2,3,5]", "last patch number must equal"),
    ("model.var.num_classes=2", "data has 3 classes but the model only 2"),
    ("data.batch_size=0", "batch_size must be >= 1"),
])
def test_invalid_configuration_fails_before_training(tiny_cache, override, message):
    result = train_here(tiny_cache, "invalid", override)
    assert_usage_error(result, message, tiny_cache / "invalid")


def logged_column(run_dir: Path, column: str) -> dict[int, float]:
    rows = csv.DictReader((run_dir / "csv" / "metrics.csv").open())
    return {int(row["step"]): float(row[column]) for row in rows if row.get(column)}


@pytest.mark.slow
def test_fsdp_trains_like_ddp_with_global_gradient_clipping_and_whole_export(tiny_cache):
    """Same data split, same seeds: FSDP2 (sharded weights, EMA and clipping, blocks recomputed by activation
    checkpointing) must follow DDP step by step."""
    for trainer, checkpointing in (("ddp", False), ("fsdp", True)):
        result = train(tiny_cache, f"same_{trainer}", f"trainer={trainer}", *TWO_CPU_PROCESSES, "model.ema_decay=0.5",
                       "model.optim.grad_clip=0.05", "trainer.max_steps=4", "trainer.val_check_interval=2",
                       "callbacks.model_checkpoint=null", f"model.activation_checkpointing={checkpointing}")
        assert result.returncode == 0, result.stderr[-3000:]
    ddp_norms = logged_column(tiny_cache / "same_ddp", "train/grad_norm")
    fsdp_norms = logged_column(tiny_cache / "same_fsdp", "train/grad_norm")
    assert sorted(ddp_norms) == sorted(fsdp_norms) == [0, 1, 2, 3]
    for step, norm in ddp_norms.items():  # the norm over all shards, not one rank's shard
        assert norm > 0.05 and fsdp_norms[step] == pytest.approx(norm, rel=1e-4), step
    ddp_losses, fsdp_losses = step_losses(tiny_cache / "same_ddp"), step_losses(tiny_cache / "same_fsdp")
    for step, loss in ddp_losses.items():
        assert fsdp_losses[step] == pytest.approx(loss, abs=1e-5), step
    want, got = load_file(tiny_cache / "same_ddp" / "model.safetensors"), load_file(tiny_cache / "same_fsdp" / "model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0, msg=key)
    var = varlib.load(tiny_cache / "same_fsdp" / "model.safetensors")
    assert isinstance(var, varlib.VAR) and var.depth == 2


@pytest.mark.slow  # two processes
def test_fsdp_shards_every_parameter_across_processes_and_runs_its_bf16_policy(tiny_cache):
    """trainer=fsdp at its default precision (bf16-mixed) on 2 CPU processes (gloo): every transformer parameter is an
    fp32 DTensor sharded on dim 0, each rank holding its chunk of the rows (about half of every parameter, half of
    all elements); the root and every block are FSDP units; the blocks compute with bf16 weights gathered from the
    shards, reduce gradients in fp32 and the gradients are fp32."""
    out = tiny_cache / "fsdp_shards"
    result = train(tiny_cache, "fsdp_shards", "trainer=fsdp", "trainer.devices=2", "trainer.accelerator=cpu",
                   "trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks.model_checkpoint=null",
                   "+callbacks.sharding._target_=helpers.callbacks.RecordSharding", f"+callbacks.sharding.out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((out / f"sharding_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert records[0]["params"].keys() == records[1]["params"].keys()
    for rank, record in enumerate(records):
        assert record["world_size"] == 2
        assert record["forward_dtypes"] == ["torch.bfloat16"] and record["grad_dtypes"] == ["torch.float32"]
        assert all(record["fsdp_units"]) and len(record["fsdp_units"]) > 1 and record["reduce_dtype"] == "torch.float32"
        for name, param in record["params"].items():
            assert param["dtensor"] and param["placements"] == "(Shard(dim=0),)", name
            assert param["dtype"] == "torch.float32", name
            rows = param["shape"][0]
            row_size = math.prod(param["shape"][1:])
            first = -(-rows // 2)  # torch.chunk's split of dim 0: ceil(rows / 2), then the rest
            assert param["local"] == row_size * (first if rank == 0 else rows - first), name
        local = sum(param["local"] for param in record["params"].values())
        total = sum(math.prod(param["shape"]) for param in record["params"].values())
        assert abs(local / total - 0.5) < 0.02, (rank, local, total)
    assert math.isfinite(json.loads((tiny_cache / "fsdp_shards" / "metrics.json").read_text())["val/loss_avg"])


@pytest.fixture(scope="module")
def tiny_reference(tiny_cache):
    """Reference statistics under the tiny test extractor of 24 images decoded from random tokens by the tiny
    tokenizer (what an untrained VAR makes, so precision and recall are not trivially 0), all images kept."""
    from helpers.extractors import TinyExtractor

    from varlib.evaluation import signed_float_to_uint8, write_reference

    vae = varlib.load(tiny_cache / "tok.safetensors")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        images = vae.decode_tokens([torch.randint(0, 32, (24, pn * pn), generator=generator) for pn in (1, 2, 3, 4)])
    write_reference(tiny_cache / "reference.npz", TinyExtractor(), signed_float_to_uint8(images).split(6), keep_images=24)
    return tiny_cache / "reference.npz"


@pytest.mark.slow
def test_in_loop_fid_is_identical_on_one_and_two_processes_under_ddp_and_fsdp(tiny_cache, tiny_reference):
    """The initial (seeded) weights are scored after max_steps=0: 3 classes x 4 images in batches of 5, so the
    two ranks make 2 and 1 batches; the gathered features, hence FID/IS/precision/recall, must not change."""
    fid = ("callbacks=fid", "~callbacks.generation_metrics.extractor",
           "+callbacks.generation_metrics.extractor._target_=helpers.extractors.TinyExtractor",
           f"callbacks.generation_metrics.reference={tiny_reference}",
           "callbacks.generation_metrics.num_per_class=4", "callbacks.generation_metrics.batch_size=5",
           "callbacks.generation_metrics.num_is_splits=2", "callbacks.model_checkpoint=null", "trainer.max_steps=0",
           "cpu_threads=1")  # Lightning gives each of 2 CPU processes 1 thread: the same float rounding everywhere
    metrics = {}
    for name, extra in {"one": (), "ddp": ("trainer=ddp", *TWO_CPU_PROCESSES),
                        "fsdp": ("trainer=fsdp", *TWO_CPU_PROCESSES)}.items():
        result = (train_here if name == "one" else train)(tiny_cache, f"fid_{name}", *fid, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        metrics[name] = json.loads((tiny_cache / f"fid_{name}" / "metrics.json").read_text())
    for key in ("val/fid", "val/is", "val/precision", "val/recall"):
        assert metrics["ddp"][key] == pytest.approx(metrics["one"][key], rel=1e-6, abs=1e-9), key
        assert metrics["fsdp"][key] == pytest.approx(metrics["one"][key], rel=1e-6, abs=1e-9), key
    assert metrics["one"]["val/fid"] > 0 and metrics["one"]["val/is"] >= 1.0
    assert 0 < metrics["one"]["val/precision"] <= 1 and 0 < metrics["one"]["val/recall"] <= 1


@pytest.mark.slow
def test_killed_scaling_run_keeps_every_logged_step_and_validation_point_once(tiny_cache):
    """Killed at step 7, two steps after a periodic checkpoint (every 5 steps, besides validation every 4): the resumed
    run drops what the killed one logged after its checkpoint and logs it again; the scaling record's points travel
    in the checkpoint. The record equals an uninterrupted run's."""
    scaling = ("callbacks.step_checkpoint.every_n_steps=5", "model.var.width=64", "model.var.num_heads=2")
    reference = train_here(tiny_cache, "scaling_reference", *scaling, experiment="var_emoji_scaling")
    assert reference.returncode == 0, reference.stderr[-3000:]
    resumed_dir = tiny_cache / "scaling_resumed"
    scaling = (*scaling, "+callbacks.kill._target_=helpers.callbacks.KillAtStep", "+callbacks.kill.step=7")
    killed = train(tiny_cache, resumed_dir.name, *scaling, experiment="var_emoji_scaling")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5  # periodic
    assert logged_train_steps(resumed_dir) == list(range(7))  # steps 5 and 6 were logged after the checkpoint
    resumed = train_here(tiny_cache, resumed_dir.name, *scaling, experiment="var_emoji_scaling")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert logged_train_steps(resumed_dir) == list(range(12)) == logged_train_steps(tiny_cache / "scaling_reference")
    want_losses, got_losses = step_losses(tiny_cache / "scaling_reference"), step_losses(resumed_dir)
    for step, loss in got_losses.items():
        assert loss == pytest.approx(want_losses[step], abs=1e-6), step
    want = json.loads((tiny_cache / "scaling_reference" / "scaling_record.json").read_text())
    got = json.loads((resumed_dir / "scaling_record.json").read_text())
    assert len(got["compute"]) == 3  # validations at steps 4, 8 and 12, each once
    assert got == want  # one thread (var_emoji_scaling's cpu_threads=1): the same floats, bit for bit


@pytest.mark.slow
def test_sigterm_to_a_two_process_run_saves_exits_cleanly_and_the_same_command_ends_like_an_uninterrupted_one(
        tiny_cache):
    extra = ("trainer=ddp", *TWO_CPU_PROCESSES, "trainer.max_steps=16")
    reference = train(tiny_cache, "sigterm_reference", *extra)
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tiny_cache / "sigterm_resumed"
    command, env = train_command(tiny_cache, run_dir.name, *extra)
    process = subprocess.Popen(command, cwd=tiny_cache, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "csv" / "metrics.csv"
    deadline = time.monotonic() + 900
    while not (metrics.is_file() and any(step >= 5 for step in logged_train_steps(run_dir))):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be signalled"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # rank 0, as SLURM or a spot instance would warn the job
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-3000:]
    assert "stopped by SIGTERM" in output
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 6 <= stopped_at < 16 and logged_train_steps(run_dir) == list(range(stopped_at))
    assert not (run_dir / "model.safetensors").exists()

    resumed = train(tiny_cache, run_dir.name, *extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in resumed.stdout + resumed.stderr
    assert logged_train_steps(run_dir) == list(range(16))
    assert_same_export(tiny_cache / "sigterm_reference", run_dir)


@pytest.mark.slow
def test_a_changed_command_stops_before_training_and_resume_force_or_false_go_on(tiny_cache):
    run_dir = tiny_cache / "changed"
    first = train_here(tiny_cache, run_dir.name, "trainer.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    saved = checkpoint.read_bytes()

    changed = train_here(tiny_cache, run_dir.name, "trainer.max_steps=8", "model.var.depth=3", "model.optim.lr=1e-3")
    output = changed.stdout + changed.stderr
    assert changed.returncode == 2, output[-3000:]
    assert "model.var.depth: 2 -> 3" in output and "model.optim.lr: 0.0078125 -> 0.001" in output
    assert "max_steps" not in output.split("differs from the run")[1]  # may change on resume
    assert "resume=false" in output and "resume=force" in output
    assert "Traceback" not in output and "state_dict" not in output
    assert checkpoint.read_bytes() == saved

    forced = train_here(tiny_cache, run_dir.name, "trainer.max_steps=6", "model.optim.lr=1e-3", "resume=force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "resume=force: continuing with changed settings" in forced.stdout + forced.stderr
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 6
    assert logged_train_steps(run_dir) == list(range(6))

    fresh = train_here(tiny_cache, run_dir.name, "trainer.max_steps=2", "model.var.depth=3", "resume=false")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "resuming from" not in fresh.stdout + fresh.stderr
    assert varlib.load(run_dir / "model.safetensors").depth == 3
    assert logged_train_steps(run_dir) == [0, 1]  # a fresh run's history starts again
