"""Training at scale without processes: the global batch arithmetic, the launcher configs, and the choice of
the checkpoint a re-run resumes from (complete, incomplete, corrupt)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from hydra import compose, initialize_config_module
from lightning.pytorch.strategies import DDPStrategy

from varlib.configs import CONFIG_MODULE, device_count
from varlib.evaluation import load_reference
from varlib.training.runner import apply_global_batch_size, checkpoint_problem, per_device_batch_size, resume_checkpoint
from varlib.training.tokenizer_module import TokenizerModule


def compose_train(*overrides: str, hydra_config: bool = False):
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_config)


def test_global_batch_is_split_over_devices_nodes_and_accumulation():
    assert per_device_batch_size(768, 8, 2, 1) == 48
    assert per_device_batch_size(768, 8, 2, 3) == 16
    assert per_device_batch_size(768, 1, 1, 8) == 96
    with pytest.raises(ValueError) as error:
        per_device_batch_size(1000, 8, 2, 3)
    assert str(error.value) == ("data.global_batch_size=1000 must be a positive multiple of trainer devices x num_nodes "
                                "x accumulate_grad_batches = 8 x 2 x 3 = 48")


def test_device_count_follows_lightnings_devices_argument():
    assert device_count(4, "gpu") == 4 and device_count("4", "gpu") == 4
    assert device_count([0, 2, 3], "gpu") == 3 and device_count("0,1", "gpu") == 2
    assert device_count("auto", "cpu") == 1
    with pytest.raises(ValueError, match="trainer.devices"):
        device_count(0, "cpu")


def test_two_node_experiment_sets_48_images_per_gpu_and_an_indivisible_batch_fails():
    cfg = compose_train("experiment=var_d16_imagenet256_2x8")
    apply_global_batch_size(cfg)
    assert (cfg.data.batch_size, cfg.trainer.devices, cfg.trainer.num_nodes) == (48, 8, 2)
    cfg = compose_train("experiment=var_d16_imagenet256_2x8", "trainer.accumulate_grad_batches=2")
    apply_global_batch_size(cfg)
    assert cfg.data.batch_size == 24
    cfg = compose_train("experiment=var_d16_imagenet256_2x8", "data.global_batch_size=100")
    with pytest.raises(ValueError, match=r"global_batch_size=100 .* = 8 x 2 x 1 = 16"):
        apply_global_batch_size(cfg)
    untouched = compose_train("experiment=var_emoji")  # no global batch: the per-device batch stays
    apply_global_batch_size(untouched)
    assert untouched.data.batch_size == 32


def test_single_node_experiment_uses_every_visible_gpu_and_keeps_the_global_batch(monkeypatch):
    cfg = compose_train("experiment=var_d16_imagenet256")
    assert cfg.trainer.devices == "auto" and cfg.trainer.accelerator == "gpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    apply_global_batch_size(cfg)
    assert cfg.data.batch_size == 192  # 768 / 4 visible GPUs
    cfg = compose_train("experiment=var_d16_imagenet256", "trainer.devices=2")
    apply_global_batch_size(cfg)
    assert cfg.data.batch_size == 384
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="trainer.devices='auto' with trainer.accelerator='gpu': expected a visible GPU"):
        apply_global_batch_size(compose_train("experiment=var_d16_imagenet256"))


def test_fsdp_config_is_fsdp2_over_every_process():
    cfg = compose_train("experiment=var_emoji", "trainer=fsdp", "trainer.devices=4", "trainer.num_nodes=2")
    assert cfg.trainer.strategy._target_ == "lightning.pytorch.strategies.ModelParallelStrategy"
    assert cfg.trainer.strategy.data_parallel_size == 8 and cfg.trainer.strategy.tensor_parallel_size == 1
    assert cfg.trainer.precision == "bf16-mixed"


def test_ddp_config_neither_searches_unused_parameters_nor_broadcasts_buffers():
    strategy = compose_train("experiment=var_d16_imagenet256").trainer.strategy
    assert strategy.find_unused_parameters is False and strategy.broadcast_buffers is False
    tokenizer_strategy = compose_train("experiment=tokenizer_imagenet256").trainer.strategy
    assert tokenizer_strategy.find_unused_parameters is True and tokenizer_strategy.broadcast_buffers is True


def test_tokenizer_refuses_ddp_without_unused_parameter_search_or_buffer_broadcasts(tmp_path):
    module = TokenizerModule(
        vae=dict(vocab_size=16, z_channels=4, ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, patch_nums=[1, 2, 4]),
        loss=dict(lpips_weight=0.0, disc_weight=0.1), discriminator=dict(base_channels=8, n_layers=1),
        perceptual=dict(vgg_weights_path=str(tmp_path / "no_vgg.pth"), allow_random_backbone=True))
    assert module.discriminator is not None
    module.trainer = SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=False), datamodule=None)
    with pytest.raises(ValueError, match="find_unused_parameters=true"):
        module.setup("fit")
    module.trainer = SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=True, broadcast_buffers=False),
                                     datamodule=None)
    with pytest.raises(ValueError, match="broadcast_buffers=true"):
        module.setup("fit")


def submitit_launcher_installed() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:  # no hydra_plugins namespace at all
        return False


@pytest.mark.skipif(not submitit_launcher_installed(),
                    reason="hydra-submitit-launcher (the 'cluster' extra) is not installed")
def test_slurm_launcher_config_starts_one_task_per_gpu_on_each_node():
    cfg = compose_train("experiment=var_d16_imagenet256_2x8", "hydra/launcher=slurm", hydra_config=True)
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)


# -- which checkpoint a re-run resumes from ------------------------------------------------------------------


def save_folder_checkpoint(path: Path, step: int) -> None:
    """A distributed checkpoint as ModelParallelStrategy writes it: DCP shards + .metadata, then meta.pt."""
    dcp.save({"state_dict": {"w": torch.arange(1000.0) * step}}, checkpoint_id=path)
    torch.save({"global_step": step}, path / "meta.pt")


def test_complete_checkpoints_file_or_folder_are_resumed(tmp_path):
    assert resume_checkpoint(tmp_path, resume=True) is None
    torch.save({"global_step": 3}, tmp_path / "last.ckpt")
    assert resume_checkpoint(tmp_path, resume=True) == tmp_path / "last.ckpt"
    assert resume_checkpoint(tmp_path, resume=False) is None
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_folder_checkpoint(folder / "last.ckpt", 5)
    assert resume_checkpoint(folder, resume=True) == folder / "last.ckpt"
    assert checkpoint_problem(folder / "last.ckpt") is None


@pytest.mark.parametrize("damage, problem", [
    ("truncate_shard", "is missing or shorter than its .metadata says"),
    ("drop_metadata", "has no .metadata"),
    ("drop_meta_pt", "has no meta.pt"),
])
def test_incomplete_folder_checkpoint_falls_back_to_the_newest_complete_one(tmp_path, damage, problem, caplog):
    save_folder_checkpoint(tmp_path / "epoch=0-step=4.ckpt", 4)
    save_folder_checkpoint(tmp_path / "last.ckpt", 8)
    last = tmp_path / "last.ckpt"
    if damage == "truncate_shard":
        shard = next(last.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        (last / (".metadata" if damage == "drop_metadata" else "meta.pt")).unlink()
    assert problem in checkpoint_problem(last)
    with caplog.at_level("WARNING"):
        assert resume_checkpoint(tmp_path, resume=True) == tmp_path / "epoch=0-step=4.ckpt"
    assert f"the last checkpoint {last} is incomplete or corrupt" in caplog.text
    assert f"falling back to {tmp_path / 'epoch=0-step=4.ckpt'}" in caplog.text


def test_corrupt_last_checkpoint_without_a_complete_one_is_an_error_naming_it(tmp_path):
    torch.save({"global_step": 8}, tmp_path / "last.ckpt")
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "epoch=0-step=4.ckpt").write_bytes(b"garbage")
    with pytest.raises(ValueError) as error:
        resume_checkpoint(tmp_path, resume=True)
    assert f"the last checkpoint {tmp_path / 'last.ckpt'} is incomplete or corrupt" in str(error.value)
    assert "resume=false" in str(error.value)


@pytest.mark.slow
def test_reference_command_writes_statistics_and_an_image_sample(tmp_path):
    tests_dir = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(tests_dir)]))}
    command = [sys.executable, "-m", "varlib.cli.reference", "data=emoji", "data.batch_size=8", "max_batches=3",
               "keep_images=5", f"out={tmp_path / 'ref.npz'}", "device=cpu",
               "~inception", "+inception._target_=helpers.extractors.TinyExtractor",
               f"hydra.run.dir={tmp_path / 'hydra'}"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = load_reference(tmp_path / "ref.npz")
    assert reference.mu.shape == (8,) and reference.sigma.shape == (8, 8)
    assert np.allclose(reference.sigma, reference.sigma.T) and np.linalg.eigvalsh(reference.sigma).min() > -1e-9
    assert reference.images_NHWC.shape == (5, 64, 64, 3) and reference.images_NHWC.dtype == np.uint8
    assert "8-d statistics, 5 images kept" in result.stdout + result.stderr
