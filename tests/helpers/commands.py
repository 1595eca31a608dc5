"""varlib's commands run in the test's process, through the Hydra entry point that their console scripts call.

A subprocess spends about 6 s of CPU importing torch, Lightning and torchmetrics before it reads its first argument,
so a test starts one only where a process of its own is what it checks: a kill, two ranks, a console script, the
imports of a fresh interpreter. :func:`run_in_process` returns what ``subprocess.run(..., capture_output=True,
text=True)`` would (exit status, standard output and error), and leaves the process as it found it: arguments,
working directory, environment and the root logger's handlers.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from importlib.metadata import entry_points
from io import StringIO
from pathlib import Path
from typing import Callable


def hydra_entry_point(argv: list[str]) -> tuple[Callable[[], None], list[str]] | None:
    """The Hydra ``main`` of a varlib command (``varlib-*``, ``python -m varlib.cli.X``, ``torchrun ... -m
    varlib.cli.X``; any Python interpreter's path) and its arguments, or None for other programs."""
    program, *args = argv
    if program.startswith("varlib-"):
        (entry,) = entry_points(group="console_scripts", name=program)
        return entry.load(), args
    if (Path(program).name.startswith("python") or program == "torchrun") and "-m" in args:
        module_at = args.index("-m") + 1
        if args[module_at].startswith("varlib."):
            return importlib.import_module(args[module_at]).main, args[module_at + 1:]
    return None


def run_in_process(argv: list[str], cwd: str | Path) -> subprocess.CompletedProcess:
    """``argv`` (a varlib command, see :func:`hydra_entry_point`) run in ``cwd`` in this process: its exit status
    (a ``SystemExit``'s code, 0 when it returns) and what it wrote to standard output and error. Any other exception
    propagates."""
    found = hydra_entry_point(argv)
    if found is None:
        raise ValueError(f"{argv[0]!r} is not a varlib command: expected varlib-*, or python or torchrun with -m varlib.cli.*")
    main, args = found
    stdout, stderr = StringIO(), StringIO()
    saved_argv, saved_cwd, saved_environ = sys.argv, Path.cwd(), dict(os.environ)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    returncode = 0
    try:
        sys.argv = [argv[0], *args]
        os.chdir(cwd)
        # Hydra points its log handler at sys.stdout when it configures logging, inside main(): the redirect holds it
        with redirect_stdout(stdout), redirect_stderr(stderr):
            try:
                main()
            except SystemExit as exit_:
                returncode = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
                if isinstance(exit_.code, str):
                    print(exit_.code, file=sys.stderr)
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_environ)
        for handler in root.handlers:
            if handler not in saved_handlers:  # Hydra's: the console one and the job's log file
                handler.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    return subprocess.CompletedProcess(argv, returncode, stdout.getvalue(), stderr.getvalue())
