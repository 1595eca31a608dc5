"""Serving the app (``varlib-app``): the model from the config, the service around it and the Gradio page."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from varlib.app.examples import example_images
from varlib.app.service import AppService, model_card_text
from varlib.configs import instantiate_config
from varlib.data.base import check_int_at_least
from varlib.generation import load_var_model
from varlib.inference import resolve_device, resolve_precision

logger = logging.getLogger(__name__)


@dataclass
class AppServer:
    """A running app: the Gradio Blocks, the service behind it and the address it serves."""

    blocks: Any
    service: AppService
    url: str

    def close(self) -> None:
        """Stops the server, then the model thread."""
        self.blocks.close()
        self.service.close()


def serve(cfg: DictConfig, block: bool = True) -> AppServer:
    """``varlib-app``: loads the model of an ``app`` config (``conf/app.yaml``) and serves the app; returns when the
    server stops (``block``) or once it listens."""
    device = resolve_device(cfg.device)
    resolve_precision(cfg.precision, device)  # a bad value fails before any model loads
    for name in ("queue_size", "batch_size", "max_images"):
        check_int_at_least(name, cfg[name], 1)
    if cfg.port is not None and not (isinstance(cfg.port, int) and 1 <= cfg.port <= 65535):
        raise ValueError(f"port must be an integer in [1, 65535] or null (the first free one from 7860), "
                         f"got {cfg.port!r}")
    if cfg.cpu_threads is not None:
        torch.set_num_threads(check_int_at_least("cpu_threads", cfg.cpu_threads, 1))
    examples = example_images(None if cfg.examples is None else instantiate_config(cfg.examples, _convert_="all"))
    var = load_var_model(cfg, device)
    try:
        from varlib.app.ui import build_app, launch
    except ImportError as error:
        raise ImportError(f"varlib-app needs Gradio ({error}): pip install 'varlib[app]'") from None
    service = AppService(var, batch_size=cfg.batch_size, max_images=cfg.max_images, precision=cfg.precision,
                         source=str(cfg.checkpoint or cfg.official.var), model_card=model_card_text(cfg.checkpoint))
    blocks = build_app(service, examples)
    logger.info("serving on http://%s:%s (queue %d, batches of up to %d images)", cfg.host, cfg.port or "7860+",
                cfg.queue_size, cfg.batch_size)
    launch(blocks, cfg.host, cfg.port, cfg.queue_size, block=block,
           allowed_paths=sorted({path.parent.resolve() for path in examples}))
    server = AppServer(blocks=blocks, service=service, url=blocks.local_url)
    if block:
        service.close()
    return server
