"""Quickstart figures: trains the ``tokenizer_emoji`` experiment through the CLI and prints the held-out PSNR,
the last-scale codebook usage and the wall time (issue target on a 2-core CPU: >= 24 dB, >= 60 %, <= 6 min).

    python benchmarks/tokenizer_quickstart.py                      # fresh run in a temporary folder
    python benchmarks/tokenizer_quickstart.py cpu_threads=1        # extra Hydra overrides

"Held-out" is the emoji validation split (5 % of the images, hashed by file name), never used for training.
The wall time covers the whole command: start-up, data decoding, training, validation and export.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PSNR_TARGET_DB, USAGE_TARGET, TIME_TARGET_S = 24.0, 0.60, 360.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=None, help="output directory (default: a new temporary one)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. trainer.max_steps=50")
    args = parser.parse_args()
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="tokenizer_quickstart_"))
    command = [sys.executable, "-m", "varlib.cli.train", "experiment=tokenizer_emoji", "resume=false",
               f"hydra.run.dir={run_dir}", *args.overrides]

    load_before = os.getloadavg()
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall_s = time.perf_counter() - start
    load_after = os.getloadavg()

    metrics = json.loads((run_dir / "metrics.json").read_text())
    steps = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    psnr, usage = metrics["val/psnr"], metrics["val/codebook_usage"]
    print(f"command            : {' '.join(command)}")
    print(f"CPU cores          : {os.cpu_count()}")
    print(f"load average       : {load_before[0]:.2f} before, {load_after[0]:.2f} after (1-minute)")
    print(f"training steps     : {steps}")
    print(f"held-out PSNR      : {psnr:.2f} dB   (target >= {PSNR_TARGET_DB:g}: {'met' if psnr >= PSNR_TARGET_DB else 'MISSED'})")
    print(f"held-out SSIM      : {metrics['val/ssim']:.3f}")
    print(f"last-scale usage   : {usage:.1%}   (target >= {USAGE_TARGET:.0%}: {'met' if usage >= USAGE_TARGET else 'MISSED'})")
    print(f"wall time          : {wall_s:.0f} s   (target <= {TIME_TARGET_S:.0f}: {'met' if wall_s <= TIME_TARGET_S else 'MISSED'})")
    print(f"exported tokenizer : {run_dir / 'model.safetensors'}")


if __name__ == "__main__":
    main()
