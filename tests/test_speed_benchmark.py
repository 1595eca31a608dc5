"""The speed benchmark: a smoke run on the tiniest shapes, its FLOP accounting and its argument checks.

Set VARLIB_OFFICIAL_REPO to a checkout of FoundationVision/VAR to also run the side-by-side comparison.
"""

import math
import os
from pathlib import Path

import pytest
import torch

from varlib import VAR, MultiScaleVQVAE, VARConfig
from varlib.models.flops import per_token_linear_params, visible_keys_per_query
from varlib.models.patch_schedules import PATCH_NUMS_256, PATCH_NUMS_512

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--depth", "1", "--batch", "1", "--train-batch", "2", "--vae-ch", "32", "--patch-nums", "1,2,3,4",
        "--num-classes", "10", "--steps", "1", "--warmup", "0", "--device", "cpu"]
OFFICIAL_REPO = os.environ.get("VARLIB_OFFICIAL_REPO")


@pytest.fixture
def bench(monkeypatch):
    """The benchmark's modules (they import each other as siblings, as when run as a script)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import measurements
    import speed

    return speed, measurements


@pytest.mark.parametrize("patch_nums", [(1, 2, 3, 4), PATCH_NUMS_256, PATCH_NUMS_512])
def test_visible_keys_per_query_counts_the_block_causal_mask(patch_nums):
    level_L = torch.cat([torch.full((pn * pn,), k) for k, pn in enumerate(patch_nums)])
    visible_LL = level_L[:, None] >= level_L[None, :]
    expected = visible_LL.sum().item() / level_L.numel()
    assert visible_keys_per_query(patch_nums) == pytest.approx(expected, rel=1e-12)


def test_flops_per_token_counts_per_token_linears_only():
    vae = MultiScaleVQVAE(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 3))
    var = VAR(vae, VARConfig(depth=2, num_classes=10, width=32, num_heads=2))
    C, V, Cv, depth = 32, 64, 8, 2
    per_block = (3 * C * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)  # qkv (no bias), proj, fc1, fc2
    expected_N = (Cv * C + C) + depth * per_block + (C * V + V)  # word_embed, blocks, head
    assert per_token_linear_params(var) == expected_N
    L_eff = visible_keys_per_query((1, 2, 3))
    assert var.flops_per_token() == pytest.approx(
        6 * expected_N + 12 * depth * L_eff * C)


def test_cpu_peak_memory_counts_live_tensor_bytes_created_inside(bench):
    _, measurements = bench
    before = torch.zeros(1 << 20)  # 4 MiB alive at entry: not a rise
    with measurements.PeakMemory(torch.device("cpu")) as peak:
        temporary = torch.ones(2 << 20)  # 8 MiB, freed before the next allocation
        temporary.mul_(2).view(-1, 2).add_(before.view(-1, 2)[:1])  # in place and views: no new storage
        del temporary
        kept = torch.ones(1 << 20)  # 4 MiB
    assert peak.increase_bytes == 8 << 20
    with measurements.PeakMemory(torch.device("cpu")) as peak:
        both = [torch.ones(1 << 20), torch.ones(1 << 20)]
    assert peak.increase_bytes == 8 << 20 and len(both) == 2 and kept.numel() == 1 << 20


def test_default_peak_tflops_by_device_name(bench):
    _, measurements = bench
    assert measurements.default_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert measurements.default_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert measurements.default_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert measurements.default_peak_tflops("Tesla T4") is None


def test_main_reports_positive_finite_figures(bench, tmp_path, capsys):
    speed, _ = bench
    out = tmp_path / "speed.json"
    result = speed.main(TINY + ["--peak-tflops", "1", "--json", str(out)])
    figures = result["varlib"]
    expected = {key for key, _ in speed.FIGURES}
    assert set(figures) == expected
    for key, value in figures.items():
        assert value is not None and math.isfinite(value) and value > 0, (key, value)
    assert figures["sampling_images_per_s"] == pytest.approx(1 / figures["sampling_latency_s"])
    L = 1 + 4 + 9 + 16
    assert figures["train_tokens_per_s"] == pytest.approx(2 * L / figures["train_step_s"])
    mfu = figures["train_tokens_per_s"] * result["settings"]["flops_per_token"] / 1e12
    assert figures["train_mfu"] == pytest.approx(mfu)
    printed = capsys.readouterr().out
    assert "sampling images/s" in printed and "train tokens/s" in printed
    assert out.is_file() and '"train_tokens_per_s"' in out.read_text()


def test_skip_leaves_out_measurements_and_mfu_needs_a_peak_on_cpu(bench):
    speed, _ = bench
    result = speed.main(TINY + ["--skip", "sampling,tokenizer"])
    assert set(result["varlib"]) == {"train_tokens_per_s", "train_step_s", "train_peak_mem_mib", "train_mfu"}
    assert result["varlib"]["train_mfu"] is None


def test_missing_official_checkout_is_skipped_with_a_reason(bench, tmp_path, capsys):
    speed, _ = bench
    result = speed.main(TINY + ["--skip", "sampling,train,tokenizer", "--official-repo", str(tmp_path)])
    assert result["varlib"] == {} and "official" not in result and "not a checkout of FoundationVision/VAR" in result["official_skipped"]
    assert "official comparison skipped" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--skip", "sampling,fid"], ["--vae-ch", "48"], ["--steps", "0"],
                                 ["--patch-nums", "4,2"], ["--device", "mps"], ["--device", "gpu0"]])
def test_bad_arguments_are_usage_errors(bench, bad, capsys):
    speed, _ = bench
    with pytest.raises(SystemExit) as exit_info:
        speed.parse_args(bad)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.skipif(not OFFICIAL_REPO, reason="set VARLIB_OFFICIAL_REPO to an official checkout")
def test_official_comparison_matches_outputs(bench):
    speed, _ = bench
    result = speed.main(TINY + ["--official-repo", OFFICIAL_REPO])
    assert "official_skipped" not in result, result.get("official_skipped")
    checks = result["checks"]
    assert checks["logits_max_abs_diff"] < 1e-5
    assert checks["greedy_token_mismatches"] == 0 and checks["greedy_tokens"] == 30
    assert checks["encode_token_mismatches"] == 0
    assert checks["greedy_image_max_abs_diff"] < 1e-4
    assert set(result["ratios"]) >= {"sampling_images_per_s", "train_tokens_per_s", "encode_images_per_s"}
    assert all(math.isfinite(r) and r > 0 for r in result["ratios"].values())
