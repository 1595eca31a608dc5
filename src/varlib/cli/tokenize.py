"""``varlib-tokenize``: encode a dataset into multi-scale token maps (``varlib.data.token_cache``).

The DataModule comes from the ``data`` config group and is built at the tokenizer's resolution. Splits are
read in order, without dropping the last batch, with the centre-crop evaluation transform, or with ``crops``
random crops per image (the official random-crop augmentation, frozen into ``crops`` draws seeded per shard;
training then picks one per step); ``with_flip`` adds mirrored twins. A captioned dataset (``data.captions=true``)
has its captions kept beside the tokens, and with a frozen ``text_encoder`` their features too (its weights saved
beside them, so that a text VAR trained on them encodes prompts alike). Several processes share the work:

    torchrun --nproc-per-node 8 -m varlib.cli.tokenize tokenizer=vae.pth data=imagefolder data.root=... out_dir=...

Each process (RANK of WORLD_SIZE, on cuda:LOCAL_RANK with device=auto) writes every WORLD_SIZE-th shard; a
re-run skips finished shards. Configuration: ``conf/tokenize.yaml``; the run:
:func:`varlib.data.tokenizing.tokenize_dataset`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from varlib.cli.entry import CONFIG_PATH, run_or_exit
from varlib.data.tokenizing import tokenize_dataset


@hydra.main(config_path=CONFIG_PATH, config_name="tokenize", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(tokenize_dataset, cfg)


if __name__ == "__main__":
    main()
