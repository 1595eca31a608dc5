"""``varlib-sample``: class- or text-conditional sampling from a VAR model into PNG files and a grid.

Writes ``{out_dir}/{index:05d}_class{label}.png`` for every image and ``{out_dir}/grid.png``. With
``labels=null`` the run draws ``per_class`` images of every class with
:func:`varlib.models.sampling.sample_per_class` (the seed scheme of ``make demo``) and the grid has one row per
class. Labels may be class names when the model file carries them (``labels='[cat, dog]'``); the log
then names the grid's cells. A text-conditional model samples ``prompts`` instead (``prompts='[red heart, cat
face]'``): ``per_class`` images of each, written as ``{index:05d}_prompt{i}.png``, one grid row per prompt, guidance
steering away from ``negative`` when given. Sampling settings left null are the model's own (``VAR.generate``'s
defaults). Configuration: ``conf/sample.yaml``; every key can be overridden on the command line. The run:
:func:`varlib.generate_files.sample_to_files`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from varlib.cli.entry import CONFIG_PATH, run_or_exit
from varlib.generate_files import sample_to_files


@hydra.main(config_path=CONFIG_PATH, config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(sample_to_files, cfg)


if __name__ == "__main__":
    main()
