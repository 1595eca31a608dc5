"""What a first GPU run would hit, reproduced on CPU where torch allows: the dtypes reaching FlexAttention under
autocast, attention plans built under inference mode and reused in training, FlexAttention's recompiles, and the
compiled sampler against the eager one. tests/gpu runs the CUDA side (make gpu-check)."""

import pytest
import torch
import torch.nn.functional as F
from helpers.attention_probe import probe_attention_dtypes

from varlib import VAR, MultiScaleVQVAE, VARConfig
from varlib.models.patch_schedules import sequence_length

PATCH_NUMS = (1, 2, 3, 4)


@pytest.fixture
def tiny_var() -> VAR:
    """A fresh model per test: tests set its attention implementation."""
    torch.manual_seed(0)
    vae = MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, patch_nums=PATCH_NUMS).requires_grad_(False)
    return VAR(vae, VARConfig(depth=2, width=32, num_heads=2, num_classes=3, drop_path_rate=0.0, cond_drop_rate=0.0))


def inputs(var: VAR, length: int, batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(var.num_classes, (batch,), generator=generator)
    return labels, torch.randn(batch, length - 1, var.code_channels, generator=generator)


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
@pytest.mark.parametrize("impl", ["flex", "prefix", "dense"])
def test_attention_gets_q_k_v_in_the_autocast_dtype(tiny_var, impl, monkeypatch):
    """Under bf16 autocast F.normalize and the fp32 per-head scale leave q, k in fp32 beside a bf16 v; FlexAttention
    (no CPU backward: a no-grad forward here, training in tests/gpu) is not autocast-aware."""
    seen = probe_attention_dtypes(monkeypatch)
    tiny_var.attn_impl = impl
    labels, x_BLCv = inputs(tiny_var, tiny_var.L)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = tiny_var.eval()(labels, x_BLCv)
    assert seen == [(impl, torch.bfloat16)] * tiny_var.depth
    with torch.no_grad():
        reference = tiny_var(labels, x_BLCv)
    assert logits.dtype == torch.float32 and (logits - reference).abs().max() < 0.05 * reference.abs().max()


def plan_tensors(plan) -> list[torch.Tensor]:
    if plan.impl == "flex":
        return [t for t in plan.block_mask.as_tuple() if isinstance(t, torch.Tensor)]
    if plan.impl == "prefix":
        return [m for m in plan.masks if m is not None]
    return [plan.bias_11LL]


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
@pytest.mark.parametrize("impl", ["flex", "prefix", "dense"])
def test_attention_plans_built_under_inference_mode_serve_training(tiny_var, impl):
    """Lightning's sanity check runs validation under torch.inference_mode on GPUs: the plan it caches (the
    FlexAttention block mask) must hold normal tensors, which a training forward's autograd can save."""
    tiny_var.attn_impl = impl  # a fresh plan cache
    length = sequence_length(PATCH_NUMS[:3])  # a progressive prefix, as well as the whole sequence
    for size in (length, tiny_var.L):
        labels, x_BLCv = inputs(tiny_var, size)
        with torch.inference_mode():
            tiny_var.eval()(labels, x_BLCv)
        plan = tiny_var.block_causal_attention(size)
        tensors = plan_tensors(plan)
        assert tensors and not any(t.is_inference() for t in tensors), f"{impl} plan at length {size}"
        if impl == "flex":
            continue  # FlexAttention has no CPU backward; tests/gpu trains on this plan after a sanity check
        tiny_var.train().zero_grad(set_to_none=True)
        tiny_var(labels, x_BLCv).logsumexp(-1).mean().backward()
        assert tiny_var.block_causal_attention(size) is plan
        assert all(p.grad is not None and p.grad.isfinite().all() for p in tiny_var.blocks.parameters())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
def test_compiled_flex_attention_compiles_a_few_graphs_over_progressive_lengths_batches_and_grad_modes(tiny_var):
    """The compile options of CUDA's FlexAttention, over the 4 progressive lengths x 3 batch sizes x 2 grad modes of
    this schedule on the model's own block masks: Dynamo's graph count (backend=eager: the count is Dynamo's,
    inductor on CPU would only add compile time). Static shapes compile all 24."""
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    from varlib.models.attention import FLEX_COMPILE_OPTIONS

    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, backend="eager", **FLEX_COMPILE_OPTIONS)
    tiny_var.attn_impl = "flex"
    before = counters["stats"]["unique_graphs"]
    for grad in (True, False):
        for batch in (2, 3, 5):
            for k in range(1, len(PATCH_NUMS) + 1):
                length = sequence_length(PATCH_NUMS[:k])
                q_BHLc = torch.randn(batch, 2, length, 16)
                with torch.set_grad_enabled(grad):
                    out = compiled(q_BHLc, q_BHLc, q_BHLc, block_mask=tiny_var.block_causal_attention(length).block_mask)
                assert out.shape == q_BHLc.shape
    graphs = counters["stats"]["unique_graphs"] - before
    assert graphs <= 6, f"{graphs} graphs for 24 (grad mode, batch, length) combinations"


def test_label_ranges_are_checked_on_the_host_never_by_reading_device_labels(tiny_var):
    """A meta tensor stands for labels on a GPU: its values cannot be read without a host-device sync. The forward
    must not read them; the training batch is checked on the host before it moves (on_before_batch_transfer)."""
    from varlib.training.var_module import VARModule

    tiny_var.check_labels(torch.zeros(4, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\].*got values in \[0, 7\]"):
        tiny_var.check_labels(torch.tensor([0, 7]))
    module = VARModule(var=dict(depth=1, num_classes=3, width=32, num_heads=2), vae=tiny_var.vae, grid_classes=0)
    tokens = torch.zeros(2, tiny_var.L, dtype=torch.long)
    assert module.on_before_batch_transfer((tokens, torch.tensor([0, 3])), 0)[1].tolist() == [0, 3]
    with pytest.raises(ValueError, match=r"got values in \[0, 4\]"):
        module.on_before_batch_transfer((tokens, torch.tensor([0, 4])), 0)


def test_fp32_inference_precision_turns_tf32_off_in_matmuls_and_cudnn_and_restores_it():
    """varlib-tokenize promises that fp32 gives exactly the fp32 tokens: cuDNN's TF32 (on by default) would round
    the tokenizer's convolutions on Ampere and newer GPUs."""
    from varlib.inference import inference_precision

    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    try:
        with inference_precision("fp32", torch.device("cpu")) as resolved:
            assert resolved == "fp32"
            assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("highest", False)
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("high", True)
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def test_in_loop_sampling_runs_in_the_trainers_precision(tiny_var):
    """Lightning autocasts only the *_step hooks: the validation grid and the FID callback sample through
    image_generator, which must apply the trainer's bf16-mixed autocast itself (varlib-evaluate samples in bf16)."""
    import lightning as L

    from varlib.training.var_module import VARModule

    module = VARModule(var=dict(depth=1, num_classes=3, width=32, num_heads=2), vae=tiny_var.vae, grid_classes=0)
    module._trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False)
    with module.image_generator() as generate:
        images = generate(torch.tensor([0, 1]), 0)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.bfloat16


@pytest.mark.slow  # inductor compiles C++ graphs per scale and batch size: four scales, two settings here
def test_compiled_sampler_draws_the_eager_samplers_tokens_on_cpu():
    """compile=True (inductor on the CPU): the eager sampler's tokens, also with guidance stopped after a scale (a
    second graph per batch size) and pruning (the pruned scales run eagerly)."""
    torch.manual_seed(0)
    vae = MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4)).requires_grad_(False)
    var = VAR(vae, VARConfig(depth=2, width=32, num_heads=2, num_classes=3)).eval()
    for fast in (dict(), dict(cfg_until=2, prune=0.5)):
        options = dict(cfg=1.5, top_k=8, top_p=0.9, seed=0, **fast)
        eager = var.generate_tokens([0, 2, 3], **options)
        torch._dynamo.reset()
        compiled = var.generate_tokens([0, 2, 3], compile=True, **options)
        assert len(compiled.tokens) == 4
        for scale, (want, got) in enumerate(zip(eager.tokens, compiled.tokens)):
            assert torch.equal(got, want), (fast, scale)
        torch.testing.assert_close(compiled.f_hat, eager.f_hat, rtol=0, atol=1e-4)


def test_fused_adamw_on_the_recipe_groups_equals_the_unfused_one_on_cpu(tiny_var):
    """The optimiser VARModule builds on CUDA (fused AdamW over the recipe's weight-decay groups), against the
    unfused one the CPU runs: torch has a fused CPU kernel, so the CUDA choice is checked here too."""
    import copy

    from varlib.training.optim_schedules import decay_parameter_groups

    models = [copy.deepcopy(tiny_var).train() for _ in range(2)]
    optimizers = [torch.optim.AdamW(decay_parameter_groups(model, 0.05), lr=1e-2, betas=(0.9, 0.95), fused=fused)
                  for model, fused in zip(models, (True, False))]
    assert [group["weight_decay"] for group in optimizers[0].param_groups] == [0.05, 0.0]
    labels, x_BLCv = inputs(tiny_var, tiny_var.L)
    targets = torch.randint(tiny_var.vocab_size, (2, tiny_var.L), generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(labels, x_BLCv).flatten(0, 1), targets.flatten()).backward()
            optimizer.step()
    for (name, fused), unfused in zip(models[0].named_parameters(), models[1].parameters()):
        # rounding apart (a thousandth of one step of lr 1e-2): the fused kernel orders its arithmetic differently
        assert (fused - unfused).abs().max() <= 1e-5, (name, (fused - unfused).abs().max().item())
    assert not torch.equal(models[0].head.weight, tiny_var.head.weight)  # the steps changed the weights


def test_the_end_of_a_validation_builds_one_whole_weight_copy(tiny_var):
    """Under FSDP2 (or with LoRA, as here) full_weights gathers and builds a plain copy: the FID callback and the
    sample grid at the end of one validation share it; the next validation builds its own."""
    from types import SimpleNamespace

    from varlib.training.var_module import VARModule

    module = VARModule(var=dict(depth=1, num_classes=3, width=32, num_heads=2), vae=tiny_var.vae, grid_classes=0,
                       lora={"r": 2, "alpha": 4})
    builds = []
    build = module._plain_copy
    module._plain_copy = lambda: builds.append(build()) or builds[-1]
    module._trainer = SimpleNamespace(validating=True)
    copies = []
    for _ in range(2):  # the FID callback, then the grid
        with module.full_weights() as model:
            copies.append(model)
    assert len(builds) == 1 and copies[0] is copies[1] is builds[0]
    assert "_validation_copy" not in dict(module.named_children())  # not a submodule: not in the state dict
    module.on_validation_end()
    with module.full_weights() as model:
        assert model is not copies[0] and len(builds) == 2
    module.on_validation_end()
    module._trainer = SimpleNamespace(validating=False)  # outside a validation (export): a copy per use
    for _ in range(2):
        with module.full_weights():
            pass
    assert len(builds) == 4 and not any(k.startswith("_validation_copy") for k in module.state_dict())
