"""VARModule's FSDP2 sharding (configure_model) at bf16-mixed on one CPU process (gloo): the numerics of DDP under the
same autocast, i.e. an fp32 residual stream and fp32 embeddings, not FSDP2's default input casting to bf16."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from helpers.process_groups import one_process_group
from varlib.models.vqvae import MultiScaleVQVAE
from varlib.training.ema import ModelEMA
from varlib.training.var_module import VARModule


@pytest.fixture
def one_gloo_process(monkeypatch):
    """A one-process gloo group and its device mesh (what ModelParallelStrategy gives configure_model)."""
    from torch.distributed.device_mesh import init_device_mesh

    with one_process_group("gloo", monkeypatch):
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))


def var_module() -> VARModule:
    torch.manual_seed(0)
    vae = MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4))
    return VARModule(var=dict(depth=2, num_classes=3, width=64, num_heads=2, drop_path_rate=0.0, cond_drop_rate=0.0),
                     vae=vae, grid_classes=0)


def test_fsdp2_bf16_keeps_the_residual_stream_and_embeddings_fp32_like_ddp(one_gloo_process):
    plain, sharded = var_module(), var_module()
    sharded._device_mesh, sharded._trainer = one_gloo_process, SimpleNamespace(precision="bf16-mixed")
    sharded.configure_model()
    residual_dtypes, weight_dtypes = [], []
    for block in sharded.transformer.blocks:
        block.register_forward_pre_hook(lambda block, args: residual_dtypes.append(args[0].dtype))
        block.register_forward_pre_hook(lambda block, args: weight_dtypes.append(block.ffn.fc1.weight.dtype))
    generator = torch.Generator().manual_seed(1)
    labels, x_BLCv = torch.tensor([0, 2]), torch.randn(2, plain.transformer.L - 1, 8, generator=generator)
    logits = {}
    for name, module in (("plain", plain), ("sharded", sharded)):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits[name] = module.transformer(labels, x_BLCv)
    assert weight_dtypes == [torch.bfloat16] * 2  # the blocks still compute with bf16 weights gathered in bf16
    assert residual_dtypes == [torch.float32] * 2
    # what remains of the difference is the blocks' non-matmul use of bf16 weights (the per-head attention scale)
    torch.testing.assert_close(logits["sharded"], logits["plain"], rtol=0, atol=2e-2 * logits["plain"].abs().max().item())


def ema_validation_then_training(mesh) -> dict[str, float]:
    """Max |sharded - plain| of the logits of a validation forward on the EMA weights and of the training forward
    after it, and how far the EMA's logits are from the training ones."""
    plain, sharded = var_module(), var_module()
    for module in (plain, sharded):
        module.ema = ModelEMA(module.transformer, decay=0.5)
    sharded._device_mesh, sharded._trainer = mesh, SimpleNamespace(precision="32-true")
    sharded.configure_model()  # rebuilds the EMA from the sharded parameters
    with torch.no_grad():
        for module in (plain, sharded):  # an EMA apart from the weights, in the root (embeddings, head) too
            for shadow in module.ema.shadow_params.values():
                shadow.mul_(0.5)
    generator = torch.Generator().manual_seed(1)
    labels, x_BLCv = torch.tensor([0, 2]), torch.randn(2, plain.transformer.L - 1, 8, generator=generator)
    outputs = {}
    for name, module in (("plain", plain), ("sharded", sharded)):
        with torch.no_grad(), module.ema_weights():
            ema_logits = module.transformer.eval()(labels, x_BLCv)
        outputs[name] = ema_logits, module.transformer.train()(labels, x_BLCv).detach()
    return {"ema": (outputs["sharded"][0] - outputs["plain"][0]).abs().max().item(),
            "training": (outputs["sharded"][1] - outputs["plain"][1]).abs().max().item(),
            "ema_apart": (outputs["plain"][1] - outputs["plain"][0]).abs().max().item()}


def two_process_rank(rank: int, init_file: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        differences = ema_validation_then_training(init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",)))
        Path(out, f"rank{rank}.json").write_text(json.dumps(differences))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes
def test_fsdp2_training_forward_after_an_ema_validation_forward_uses_the_training_weights(tmp_path):
    """FSDP2 leaves the root gathered after a forward without backward: a validation forward on the EMA weights
    (no sample grid after it: grid_classes=0, no logger) must not leave the EMA's embeddings and head for the next
    training forward. Two gloo processes, each rank against the plain model."""
    import torch.multiprocessing as mp

    mp.spawn(two_process_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        differences = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert differences["ema_apart"] > 1e-2, rank  # the EMA weights give other logits
        assert differences["ema"] <= 1e-5 and differences["training"] <= 1e-5, (rank, differences)
