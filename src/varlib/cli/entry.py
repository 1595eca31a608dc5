"""What every command's Hydra entry point shares: the packaged configs' path and :func:`run_or_exit`, which turns
the expected user errors (ValueError, FileNotFoundError, a missing ``???`` config value) into one logged message and
exit status 2 instead of a traceback."""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from varlib.configs import CONFIG_MODULE

logger = logging.getLogger(__name__)

# The packaged configs (see varlib.configs), found from any directory.
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"
# Exit status for bad input or configuration (2, as argparse uses for usage errors).
USAGE_ERROR = 2


def run_or_exit(run: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Calls ``run(cfg)``; a ValueError, FileNotFoundError or missing mandatory config value (``???``) is
    logged as one message and exits with status 2."""
    try:
        return run(cfg)
    except (ValueError, FileNotFoundError, MissingMandatoryValue) as error:
        logger.error("%s", error)
        sys.exit(USAGE_ERROR)
