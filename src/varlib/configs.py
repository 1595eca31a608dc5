"""varlib's packaged Hydra configs from Python: composing them as the command line does, the ``num_processes``
and ``mul`` resolvers they use, and the data config a DataModule's constructor accepts.

The configs ship inside the package (``src/varlib/conf`` links to the repository's ``conf/``), so every entry point
finds them from any directory; users add their own folders with ``--config-dir`` or ``hydra.searchpath``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from importlib import resources
from typing import Any

import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

CONFIG_MODULE = "varlib.conf"


def compose_config(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """A config from the packaged ``conf/`` composed as the command line would. Inside a running ``@hydra.main``
    (a ``varlib-*`` command calling another stage) that command's search path, which holds the packaged configs
    and any ``--config-dir``, serves."""
    if GlobalHydra.instance().is_initialized():
        return compose(config_name=config_name, overrides=list(overrides))
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def device_count(devices: Any, accelerator: str) -> int:
    """Processes per node that ``lightning.Trainer(devices=..., accelerator=...)`` starts."""
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    if devices in ("auto", -1):
        uses_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        if uses_cuda and torch.cuda.device_count() == 0:
            raise ValueError(f"trainer.devices={devices!r} with trainer.accelerator={accelerator!r}: expected a "
                             "visible GPU, got none (trainer=cpu or trainer.accelerator=cpu runs on the CPU)")
        return torch.cuda.device_count() if uses_cuda else 1
    if isinstance(devices, str) and "," in devices:  # device ids such as "0,1,3"
        return len([d for d in devices.split(",") if d.strip()])
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return len(devices)
    raise ValueError(f"trainer.devices: expected a positive int, a list of device ids or 'auto', got {devices!r}")


# ${num_processes:${trainer.devices},${trainer.num_nodes},${trainer.accelerator}} in configs: the world size
OmegaConf.register_new_resolver(
    "num_processes", lambda devices, num_nodes, accelerator: device_count(devices, accelerator) * int(num_nodes),
    replace=True)
# ${mul:32,${model.var.depth}}: a value tied to another, e.g. a width that scales with the depth in a --multirun sweep
OmegaConf.register_new_resolver("mul", lambda *factors: math.prod(factors), replace=True)


def config_source(config_name: str) -> str:
    """The text of the packaged ``conf/<config_name>.yaml``, comments included, with ``$`` doubled for the
    ``string.Template`` that Hydra fills its help text with."""
    return (resources.files(CONFIG_MODULE) / f"{config_name}.yaml").read_text().replace("$", "$$")


# ${config_source:${hydra.job.config_name}} in conf/hydra/help/varlib.yaml: --help prints the command's own config
OmegaConf.register_new_resolver("config_source", config_source, replace=True)


def datamodule_config(data: DictConfig) -> DictConfig:
    """A data config without ``global_batch_size``, the training-only key that ``varlib-train`` turns into
    ``batch_size`` per device: what the DataModule's constructor accepts."""
    return OmegaConf.masked_copy(data, [key for key in data if key != "global_batch_size"])


def instantiate_config(config: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, re-raising a target's ValueError or FileNotFoundError as itself (Hydra
    wraps it in an InstantiationException), so that :func:`varlib.cli.entry.run_or_exit` reports it as a usage error."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, (ValueError, FileNotFoundError)):
            raise error.__cause__ from None
        raise
