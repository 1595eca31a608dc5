"""The command-line tools' contract for bad input: exit status 2, one clear line, no traceback, nothing written."""

import subprocess
from pathlib import Path

RUN_OUTPUTS = ("checkpoints", "model.safetensors", "metrics.json")


def assert_usage_error(result: subprocess.CompletedProcess, message: str, output_dir: Path) -> None:
    """``result`` exited with status 2, logging ``message`` as an error on exactly one line and printing no
    traceback, and left none of a training run's outputs in ``output_dir``."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    lines = [line for line in output.splitlines() if message in line]
    assert len(lines) == 1 and "ERROR" in lines[0], lines
    assert "Traceback" not in output
    assert [name for name in RUN_OUTPUTS if (output_dir / name).exists()] == []
