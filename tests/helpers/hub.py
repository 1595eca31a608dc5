"""The Hugging Face Hub switched off for one test."""

from __future__ import annotations

import pytest


def switch_hub_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub off as ``HF_HUB_OFFLINE=1`` does: the variable for whatever reads it later, and huggingface_hub's own
    flag, which the library reads once, at import (imported earlier in this process, it would try the network and
    wait for its timeouts). The module is imported before the variable is set, so the flag returns to its value
    after the test."""
    try:
        from huggingface_hub import constants
    except ImportError:  # nothing here can download
        pass
    else:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
