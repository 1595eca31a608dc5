"""``varlib-app``: generate and edit with a VAR model in the browser (Gradio).

:mod:`varlib.app.service` holds what the pages do (checks, the scale strip, the edit mask), :mod:`varlib.app.worker`
the model thread that batches Generate requests, :mod:`varlib.app.ui` the Gradio page (the optional ``app``
extra), and :mod:`varlib.cli.app` the command.
"""

from varlib.app.examples import example_images, held_out_emoji
from varlib.app.service import AppService, SamplingSettings, running_fhat_images
from varlib.app.worker import ModelWorker

__all__ = ["AppService", "ModelWorker", "SamplingSettings", "example_images", "held_out_emoji", "running_fhat_images"]
