"""Callbacks used by the training tests through the CLI (``--trainer.callbacks+=tests.helpers.callbacks.X``)."""
import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    """SIGKILL the process once ``global_step`` reaches ``step``: a real crash, nothing gets flushed or saved."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
