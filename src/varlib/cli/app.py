"""``varlib-app``: generate and edit with a VAR model in the browser (see :mod:`varlib.app`).

Loads the model like the other inference tools (``checkpoint=`` or ``official.vae`` + ``official.var``), then serves
the Gradio page on ``host:port`` (127.0.0.1 by default) until interrupted. Configuration: ``conf/app.yaml``; needs
the ``app`` extra (``pip install 'varlib[app]'``). The run: :func:`varlib.app.server.serve`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from varlib.app.server import serve
from varlib.cli.entry import CONFIG_PATH, run_or_exit


@hydra.main(config_path=CONFIG_PATH, config_name="app", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(serve, cfg)


if __name__ == "__main__":
    main()
