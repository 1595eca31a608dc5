"""Every code block of README.md runs here, so the manual's snippets and commands cannot rot.

The convention for README code blocks (new ones follow it; the fence's info string says how a block runs):

- ```` ```python ````: the block runs alone (``python -c``) in a fresh temporary folder holding the stand-ins.
- ```` ```bash ````: its commands run in order, in one fresh temporary folder holding the stand-ins, exactly as
  written, except that :data:`SMALL_COUNTS` (step and sample counts only) are put before the arguments of the
  ``varlib-*`` commands they name (an explicit value in the README wins). Every command must succeed.
- ```` ```bash dry-run ````: commands that need a GPU cluster, SLURM, Inception weights, hours of CPU, or that a test
  runs itself (``make test``; "Your own images" runs at a tiny size in ``tests/test_own_images_guide.py``). Each runs in its own tool's dry-run form from the repository root: ``varlib-*`` and
  ``python -m varlib.cli.*`` with ``--cfg job`` (Hydra composes and prints the config without running; a
  ``--multirun`` command its first job, see :func:`first_job`), ``torchrun ... -m MODULE ARGS`` as ``python -m
  MODULE ARGS --cfg job`` (these three call the command's Hydra entry point in the test's process, see
  :func:`~helpers.commands.hydra_entry_point`), ``pip install X`` as ``pip install --dry-run --no-index --no-build-isolation X``
  (resolved against the installed packages, nothing installed), ``make X`` as ``make -n X``.
- ```` ```text ````: not code (listings, folder layouts). No other info string is allowed.

Commands are split like a shell (``shlex``; ``\\`` continues a line, ``#`` starts a comment). A ``varlib-*`` command
runs through its Hydra entry point in the test's process (what its console script calls; ``tests/test_packaging.py``
starts a script as a user does), other programs without a shell, with one torch thread (``OMP_NUM_THREADS=1``).
The stand-ins lie at the names a user has: ``vae_ch160v4096z32.pth`` and ``var_d16.pth`` (tiny official-format files: the 256 px schedule, 1,000 classes),
``imagenet/{train,val}/<class>/*.JPEG`` (a few small JPEGs), ``cat.png``, and ``make demo``'s
``outputs/demo/{tokenizer,var}/model.safetensors`` (a tiny 32 px VAR on 9 classes).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.commands import hydra_entry_point, run_in_process

import varlib
from varlib.models.sampling import SamplingConfig
from varlib.models.transformer import VAR, VARConfig

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
INFO_STRINGS = ("python", "bash", "bash dry-run", "text")
#: Put before the README commands' own arguments: the run lengths and sample counts a test may shrink, nothing else.
SMALL_COUNTS = {
    "varlib-train": ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                     "trainer.num_sanity_val_steps=0"],
    "varlib-sample": ["per_class=1"],
    "varlib-evaluate": ["num_per_class=2"],
}
TIMEOUT_S = 900


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    info: str
    code: str

    @property
    def name(self) -> str:
        return f"L{self.line}-{self.info.replace(' ', '-')}"


def readme_blocks() -> list[Block]:
    blocks, lines = [], (REPO / "README.md").read_text().splitlines()
    index = 0
    while index < len(lines):
        opening = re.fullmatch(r"```(.*)", lines[index])
        if opening is None:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i] == "```")
        blocks.append(Block(index + 1, opening.group(1).strip(), "\n".join(lines[index + 1:end]) + "\n"))
        index = end + 1
    return blocks


def commands(code: str) -> list[list[str]]:
    """The block's commands as argument lists (continuation lines joined, comments and blank lines dropped)."""
    joined = re.sub(r"\\\n", " ", code)
    return [argv for argv in (shlex.split(line, comments=True) for line in joined.splitlines()) if argv]


def executable(argv: list[str]) -> list[str]:
    """The program of a README command in this environment: the varlib-* scripts and python of this interpreter."""
    program, *args = argv
    if program.startswith("varlib-"):
        return [str(BIN / program), *args]
    if program == "python":
        return [sys.executable, *args]
    if program == "pip":
        return [sys.executable, "-m", "pip", *args]
    return argv


def first_job(args: list[str]) -> list[str]:
    """A ``--multirun`` command's arguments for its first job: no ``--multirun``, each sweep ``key=a,b,c`` cut to
    ``key=a`` (``--cfg`` refuses ``--multirun``)."""
    if "--multirun" not in args:
        return args
    sweep = re.compile(r"([^=]+=)([^\[\]{}(),]+)(,[^\[\]{}(),]+)+")
    return [sweep.sub(r"\1\2", arg) for arg in args if arg != "--multirun"]


def call_entry_point(argv: list[str], cwd: Path) -> None:
    """A varlib command (see :func:`~helpers.commands.hydra_entry_point`) in ``cwd``, in this process: it succeeds."""
    done = run_in_process(argv, cwd)
    assert done.returncode == 0, f"{shlex.join(argv)} exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"


def compose_job(argv: list[str]) -> None:
    """``argv --cfg job`` through the command's own Hydra entry point, in this process: the config composes."""
    program, *args = argv
    call_entry_point([program, *first_job(args), "--cfg", "job"], REPO)


def run_command(argv: list[str], cwd: Path) -> None:
    """A ``bash`` block's command as written: a varlib command through its Hydra entry point in this process (as
    its console script calls it), another program as a subprocess."""
    if hydra_entry_point(argv) is None:
        run(executable(argv), cwd)
    else:
        call_entry_point(argv, cwd)


def dry_run(argv: list[str]) -> list[str]:
    """The dry-run form of a command that is not a varlib command (see :func:`~helpers.commands.hydra_entry_point`)."""
    program, *args = argv
    if program == "pip" and args[:1] == ["install"]:
        return executable(["pip", "install", "--dry-run", "--no-index", "--no-build-isolation", *args[1:]])
    if program == "make":
        return ["make", "-n", *args]
    raise AssertionError(f"no dry-run form for {argv}: extend dry_run() and the module docstring")


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert completed.returncode == 0, f"{shlex.join(argv)} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}"
    return completed


# -- stand-ins ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> Path:
    """A folder with every file the README's blocks expect a user to have, tiny (see the module docstring)."""
    root = tmp_path_factory.mktemp("stand_ins")
    torch.manual_seed(0)
    # official-format files: plain state dicts whose shapes the loader infers (256 px, 10 scales, 1,000 classes)
    vae = varlib.MultiScaleVQVAE(vocab_size=4096, z_channels=32, ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1,
                                 using_sa=False, using_mid_sa=False)
    torch.save(vae.state_dict(), root / "vae_ch160v4096z32.pth")
    torch.save(VAR(vae, VARConfig(depth=1, width=64, num_heads=1, num_classes=1000)).state_dict(), root / "var_d16.pth")
    # make demo's files: a 32 px tokenizer (8x8 latent) and a VAR on the 9 emoji categories
    demo_vae = varlib.MultiScaleVQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1,
                                      using_sa=False, using_mid_sa=False, patch_nums=(1, 2, 4, 8))
    demo_var = VAR(demo_vae, VARConfig(depth=1, width=32, num_heads=1, num_classes=9))
    demo_var.sampling = SamplingConfig(cfg=2.0, top_k=50, top_p=0.75)
    (root / "outputs" / "demo" / "tokenizer").mkdir(parents=True)
    (root / "outputs" / "demo" / "var").mkdir(parents=True)
    varlib.save_tokenizer(demo_vae, root / "outputs" / "demo" / "tokenizer" / "model.safetensors")
    varlib.save_var(demo_var, root / "outputs" / "demo" / "var" / "model.safetensors")
    # an image folder of two classes and a picture to edit
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("n01440764", "n01443537"):
            (root / "imagenet" / split / name).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (300, 280, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "imagenet" / split / name / f"{name}_{i}.JPEG")
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(root / "cat.png")
    return root


@pytest.fixture
def workdir(stand_ins, tmp_path) -> Path:
    cwd = tmp_path / "cwd"
    shutil.copytree(stand_ins, cwd)
    return cwd


# -- the tests ---------------------------------------------------------------------------------------------------

BLOCKS = readme_blocks()


def test_every_block_follows_the_convention():
    assert BLOCKS, "README.md has no code blocks"
    wrong = [(block.line, block.info) for block in BLOCKS if block.info not in INFO_STRINGS]
    assert not wrong, f"code blocks need one of the info strings {INFO_STRINGS} (see tests/test_readme.py): {wrong}"
    for block in BLOCKS:
        if block.info.startswith("bash"):
            for argv in commands(block.code):
                assert argv[0] in ("varlib-train", "varlib-tokenize", "varlib-sample", "varlib-edit", "varlib-evaluate",
                                   "varlib-reference", "varlib-demo", "varlib-ablation", "varlib-scaling", "varlib-app", "python",
                                   "pip", "make", "torchrun"), f"README line {block.line}: unknown program {argv[0]}"
                if block.info == "bash dry-run" and hydra_entry_point(argv) is None:
                    dry_run(argv)  # every command has a dry-run form


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.info != "text"], ids=lambda b: b.name)
def test_readme_block_runs(block, workdir):
    if block.info == "python":
        run([sys.executable, "-c", block.code], workdir)
    elif block.info == "bash":
        for argv in commands(block.code):
            run_command([argv[0], *SMALL_COUNTS.get(argv[0], []), *argv[1:]], workdir)
    else:
        for argv in commands(block.code):
            if hydra_entry_point(argv) is not None:
                compose_job(argv)
            else:
                run(dry_run(argv), REPO)
