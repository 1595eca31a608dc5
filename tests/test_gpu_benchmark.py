"""benchmarks/gpu.py: the pieces that run without a GPU (arguments, the run plan, summaries, targets, search)."""

from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu

    return gpu


def test_default_plan_is_d16_d30_training_and_three_sampling_batches(gpu):
    args = gpu.parse_args(["--official-repo", "/tmp/official"])
    runs = dict(gpu.speed_runs(args))
    assert list(runs) == ["d16 train", "d30 train", "d16 sampling @1", "d16 sampling @8", "d16 sampling @64"]
    d30 = runs["d30 train"]
    assert d30[d30.index("--depth") + 1] == "30" and d30[d30.index("--train-batch") + 1] == "16"
    assert d30[d30.index("--skip") + 1] == "sampling,tokenizer" and "/tmp/official" in d30
    sample64 = runs["d16 sampling @64"]
    assert sample64[sample64.index("--batch") + 1] == "64" and sample64[sample64.index("--skip") + 1] == "train,tokenizer"
    speed = __import__("speed")
    for argv in runs.values():  # every planned run is a valid speed.py command line
        speed.parse_args([a if a != "cuda" else "cpu" for a in argv])


@pytest.mark.parametrize("bad", [["--depths", "16,x"], ["--depths", "16", "--train-batches", "8,8"],
                                 ["--sample-batches", "0"], ["--max-batch", "-1"]])
def test_bad_arguments_are_usage_errors(gpu, bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu.parse_args(bad)
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err


def test_summary_ratios_and_targets(gpu):
    train = {"varlib": {"train_tokens_per_s": 3000.0, "train_mfu": 0.5, "train_peak_mem_mib": 100.0},
             "official": {"train_tokens_per_s": 1000.0, "train_mfu": 0.17, "train_peak_mem_mib": 200.0},
             "ratios": {"train_tokens_per_s": 3.0, "train_mfu": 0.5 / 0.17, "train_peak_mem_mib": 0.5}}
    sample = {"varlib": {"sampling_images_per_s": 30.0}, "official": {"sampling_images_per_s": 20.0},
              "ratios": {"sampling_images_per_s": 1.5}}
    rows = gpu.summarize({"d16 train": train, "d16 sampling @64": sample})
    assert rows["d16 train tokens/s"] == {"varlib": 3000.0, "official": 1000.0, "ratio": 3.0}
    assert rows["d16 train MFU"]["varlib"] == 0.5 and rows["d16 train peak mem MiB"]["ratio"] == 0.5
    assert rows["d16 sampling images/s @64"]["ratio"] == 1.5
    verdicts = gpu.target_verdicts(rows)
    assert verdicts == {"d16 train tokens/s": True, "d16 train MFU": True, "d16 sampling images/s @64": False,
                        "d16 max train batch": None}
    text = gpu.format_summary(rows, verdicts, {})
    assert "50.0%" in text and "d16 sampling images/s @64 missed" in text and "d16 max train batch n/a" in text


def test_mfu_of_a_speed_run_is_tokens_times_flops_over_peak(gpu):
    """MFU arithmetic: 6 N + 12 depth L_eff C FLOPs per token against the given peak (tiny CPU run)."""
    speed = __import__("speed")
    result = speed.main(["--device", "cpu", "--depth", "1", "--train-batch", "2", "--vae-ch", "32", "--patch-nums",
                         "1,2,3,4", "--num-classes", "10", "--steps", "1", "--warmup", "0", "--skip",
                         "sampling,tokenizer", "--peak-tflops", "0.5"])
    s, figures = result["settings"], result["varlib"]
    L_eff = (1 * 1 + 4 * 5 + 9 * 14 + 16 * 30) / 30
    assert s["L_eff"] == pytest.approx(L_eff)
    assert s["flops_per_token"] == pytest.approx(6 * s["per_token_params"] + 12 * 1 * L_eff * 64)
    assert figures["train_mfu"] == pytest.approx(figures["train_tokens_per_s"] * s["flops_per_token"] / 0.5e12)
    rows = gpu.summarize({"d1 train": result})
    assert rows["d1 train MFU"]["varlib"] == figures["train_mfu"] and rows["d1 train MFU"]["official"] is None


def test_largest_batch_search_stops_at_the_first_out_of_memory(gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    tried = []

    def step_at(batch):
        tried.append(batch)
        if batch > 37:
            raise torch.OutOfMemoryError("fake")

    found = gpu.largest_batch(step_at, limit=1024)
    assert 35 <= found <= 37 and max(tried) <= 64 and len(tried) < 12
    assert 94 <= gpu.largest_batch(lambda b: None, limit=100) <= 100  # bisection stops within ~6%
    assert gpu.largest_batch(lambda b: (_ for _ in ()).throw(torch.OutOfMemoryError("x")), limit=8) == 0
