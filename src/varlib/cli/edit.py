"""``varlib-edit``: zero-shot editing of one image with a VAR model (the paper's in-/out-painting).

The region to regenerate is either a mask image or a box:

* ``mask``: a greyscale/RGB image where WHITE (grey >= 128) marks pixels to regenerate and BLACK pixels
  to keep (transparent pixels count as white, as the robust loader composites on white). It has the
  input image's size, and is then resized and centre-cropped exactly like the image (nearest
  neighbour), or it is already at the model's resolution.
* ``box: [y0, x0, y1, x1]``: fractions of the cropped image; ``mode=inpaint`` regenerates the box,
  ``mode=outpaint`` regenerates everything outside it.

The model works on the final token grid: a token is regenerated when at most half of its pixels are
kept. ``label=null`` edits unconditionally (the null class). Configuration: ``conf/edit.yaml``. The run:
:func:`varlib.generate_files.edit_to_file`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from varlib.cli.entry import CONFIG_PATH, run_or_exit
from varlib.generate_files import edit_to_file


@hydra.main(config_path=CONFIG_PATH, config_name="edit", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(edit_to_file, cfg)


if __name__ == "__main__":
    main()
