"""The paths that only run on CUDA: FlexAttention's backward and ``attn_impl=auto -> flex``, VAR under FSDP2's bf16
mixed-precision policy, fused AdamW on the recipe's parameter groups, and the compiled sampler.

``make test-gpu`` runs them; without CUDA they are skipped. They need torch, einops, safetensors, tqdm and numpy
(plain models, no Lightning or Hydra), except the one Lightning test, skipped where Lightning or Hydra is absent.
"""


import pytest
import torch
import torch.nn.functional as F

from helpers.process_groups import one_process_group
from varlib import VAR, MultiScaleVQVAE, VARConfig
from varlib.models.attention import resolve_attn_impl
from varlib.models.patch_schedules import PATCH_NUMS_256, sequence_length
from varlib.training.optim_schedules import decay_parameter_groups

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")


def tiny_var(patch_nums=PATCH_NUMS_256, **kwargs) -> VAR:
    """A narrow, shallow VAR (default: the official 256 px schedule, 10 scales, 680 tokens), random weights, on CUDA."""
    torch.manual_seed(0)
    vae = MultiScaleVQVAE(ch=32, patch_nums=patch_nums).requires_grad_(False)
    options = dict(depth=2, width=64, num_heads=2, num_classes=10, drop_path_rate=0.0, cond_drop_rate=0.0)
    return VAR(vae, VARConfig(**{**options, **kwargs})).to(CUDA)


def inputs(var: VAR, length: int, batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(var.num_classes, (batch,), generator=generator)
    x_BLCv = torch.randn(batch, length - 1, var.code_channels, generator=generator)
    targets = torch.randint(var.vocab_size, (batch, length), generator=generator)
    return labels.to(CUDA), x_BLCv.to(CUDA), targets.to(CUDA)


def logits_and_grads(var: VAR, impl: str, labels, x_BLCv, targets):
    var.attn_impl = impl
    var.zero_grad(set_to_none=True)
    logits = var(labels, x_BLCv)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in var.named_parameters() if p.grad is not None}


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    """Compare in true fp32: no TF32 in the reference paths (restored afterwards)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
def test_flex_attention_logits_and_gradients_equal_the_sdpa_and_dense_paths():
    var = tiny_var().train()
    for length in (var.L, sequence_length(PATCH_NUMS_256[:4])):  # the whole sequence and a progressive prefix
        batch = inputs(var, length)
        dense_logits, dense_grads = logits_and_grads(var, "dense", *batch)
        for impl in ("prefix", "flex"):  # prefix: scaled_dot_product_attention per scale group
            logits, grads = logits_and_grads(var, impl, *batch)
            torch.testing.assert_close(logits, dense_logits, rtol=0, atol=1e-4, msg=f"{impl} at {length}")
            assert grads.keys() == dense_grads.keys() and len(grads) > 10
            for name, grad in grads.items():
                scale = dense_grads[name].abs().max().clamp_min(1.0)
                assert (grad - dense_grads[name]).abs().max() <= 1e-4 * scale, (impl, length, name)


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
def test_bf16_autocast_flex_training_gets_q_k_v_in_bf16(monkeypatch):
    """FlexAttention is not autocast-aware: under bf16 autocast q, k, v must reach it in bf16 (the dtype probe),
    on the whole sequence and a progressive prefix, forward and backward."""
    from helpers.attention_probe import probe_attention_dtypes

    seen = probe_attention_dtypes(monkeypatch)
    var = tiny_var().train()
    for length in (var.L, sequence_length(PATCH_NUMS_256[:4])):
        labels, x_BLCv, targets = inputs(var, length)
        var.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = var(labels, x_BLCv)
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()
        assert all(p.grad.isfinite().all() for p in var.blocks.parameters() if p.grad is not None)
    assert seen == [("flex", torch.bfloat16)] * (2 * var.depth)


def test_auto_attention_is_flex_on_cuda():
    assert resolve_attn_impl("auto", CUDA) == "flex"
    var = tiny_var().train()
    assert var.attn_impl == "auto" and var.block_causal_attention(var.L).impl == "flex"
    with_dropout = tiny_var(attn_drop_rate=0.1).train()  # FlexAttention has no attention dropout
    assert with_dropout.block_causal_attention(with_dropout.L).impl == "prefix"


@pytest.fixture
def nccl_group(monkeypatch):
    """A one-process NCCL group (FSDP2 needs one), destroyed afterwards."""
    with one_process_group("nccl", monkeypatch):
        yield


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
def test_bf16_fsdp2_trains_with_bf16_weights_fp32_shards_and_fp32_gradients(nccl_group):
    """The sharding and policy of TokenTransformerModule.configure_model (trainer=fsdp's default bf16-mixed): every
    block, then the root, gathered in bf16 and reduced in fp32, inside bf16 autocast as Lightning runs it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    reference = tiny_var().train()
    sharded = tiny_var().train()
    mesh = init_device_mesh("cuda", (1,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in sharded.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(sharded, mesh=mesh, mp_policy=policy)
    seen = []
    sharded.blocks[0].register_forward_pre_hook(lambda block, args: seen.append({p.dtype for p in block.parameters()}))
    labels, x_BLCv, targets = inputs(sharded, sharded.L)
    losses = []
    for model in (reference, sharded):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(labels, x_BLCv)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        losses.append(loss.item())
    assert seen == [{torch.bfloat16}]
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    for name, param in sharded.named_parameters():
        assert isinstance(param, DTensor) and param.dtype == torch.float32, name
        assert param.grad is not None and param.grad.dtype == torch.float32, name


def test_fused_adamw_on_the_recipe_groups_equals_the_unfused_one():
    models = [tiny_var().train() for _ in range(2)]
    optimizers = [torch.optim.AdamW(decay_parameter_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95), fused=fused)
                  for model, fused in zip(models, (True, False))]
    batch = inputs(models[0], models[0].L)
    for _ in range(3):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad(set_to_none=True)
            logits_and_grads(model, "prefix", *batch)
            optimizer.step()
    assert optimizers[0].defaults["fused"] is True
    for (name, fused), unfused in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(models[0].head.weight, tiny_var().head.weight)  # the steps changed the weights


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
@pytest.mark.parametrize("sharded", [False, True], ids=["one_device", "fsdp2"])
def test_the_var_module_trains_after_a_bf16_sanity_check_with_fused_adamw(tmp_path, sharded):
    """bf16-mixed on one GPU and under ModelParallelStrategy (FSDP2): the sanity check validates under
    torch.inference_mode first (caching the FlexAttention block mask), then training must run on the same cache;
    fused AdamW on CUDA."""
    L = pytest.importorskip("lightning", reason="the Lightning module needs lightning")
    pytest.importorskip("hydra", reason="the Lightning module needs hydra-core")
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from varlib.training.var_module import VARModule

    class TokenData(L.LightningDataModule):
        batch_size = 4

        def loader(self):
            tokens = torch.randint(0, 32, (8, sequence_length((1, 2, 3, 4))))
            return DataLoader(TensorDataset(tokens, torch.arange(8) % 3), batch_size=self.batch_size)

        def train_dataloader(self):
            return self.loader()

        def val_dataloader(self):
            return self.loader()

    torch.manual_seed(0)
    vae = MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4))
    module = VARModule(var=dict(depth=2, num_classes=3, width=64, num_heads=2), vae=vae, ema_decay=0.9, grid_classes=0)
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1) if sharded else "auto"
    trainer = L.Trainer(max_steps=3, accelerator="gpu", devices=1, precision="bf16-mixed", strategy=strategy,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=1, limit_val_batches=1, val_check_interval=2, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=TokenData())
    assert trainer.global_step == 3 and trainer.optimizers[0].defaults["fused"] is True
    assert module.var.block_causal_attention(module.var.L).impl == "flex"
    assert torch.isfinite(trainer.callback_metrics["val/loss_avg"])


def test_compiled_sampler_draws_the_eager_samplers_tokens():
    var = tiny_var(patch_nums=(1, 2, 3, 4)).eval()  # four scales: four graphs to compile
    options = dict(cfg=1.5, top_k=50, top_p=0.9, seed=0)
    eager = var.generate_tokens([0, 3, 7, 10], **options)
    compiled = var.generate_tokens([0, 3, 7, 10], compile=True, **options)
    assert len(eager.tokens) == len(compiled.tokens) == 4
    for scale, (want, got) in enumerate(zip(eager.tokens, compiled.tokens)):
        assert torch.equal(got, want), scale
