"""Callbacks that simulate failures in subprocess training runs."""

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILLs its own process at the start of the first batch after ``step`` optimizer steps, i.e. right
    after the checkpoint written at that step: the hardest possible stop (no cleanup, no final save)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)

