"""A one-process torch.distributed group for tests that need one (FSDP2's fully_shard), set up for the test only."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def one_process_group(backend: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A group of one process on ``backend`` ("gloo", "nccl"), destroyed afterwards. The address is set for the
    test only: a MASTER_PORT left in the worker's environment would send every later 2-process run to it."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
