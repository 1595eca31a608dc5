"""Shared fixtures: the official tiny parity bundles (made by running the official VAR code), and the torch thread
count restored after every test (a test that sets it must not change the tests after it)."""

import os
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
pytest_plugins = ["pytester"]  # test_thread_count.py runs this conftest in a pytest session of its own

# `make test` runs one pytest worker per core (pytest-xdist): each worker, and the commands its tests start, take
# their share of the cores, not all of them (oversubscribed torch threads spin and slow everything).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    WORKER_THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(WORKER_THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(WORKER_THREADS))


@pytest.fixture(autouse=True)
def restore_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def load_bundle(name: str) -> dict:
    return torch.load(DATA / f"official_{name}.pt", weights_only=True)


# The 10-scale bundle repeats each test on the official schedule: the whole suite runs it, `make test-fast` does not.
@pytest.fixture(scope="session", params=["tiny4", pytest.param("tiny10", marks=pytest.mark.slow)])
def bundle(request) -> dict:
    return load_bundle(request.param)


@pytest.fixture(scope="session")
def tiny_models(bundle):
    """(vae, var, bundle) loaded from the bundle's official state dicts, in eval mode."""
    from varlib import load_official_var, load_official_vqvae

    vae = load_official_vqvae(bundle["vqvae_state_dict"], patch_nums=bundle["config"]["patch_nums"])
    var = load_official_var(bundle["var_state_dict"], vae)
    return vae, var, bundle
