"""The official models' key layouts (tests/data/manifest_*.json) and meta-device models to hold against them."""

import json
from pathlib import Path

import torch

from varlib import VAR, MultiScaleVQVAE, VARConfig

DATA = Path(__file__).parents[1] / "data"


def manifest(name):
    return json.loads((DATA / name).read_text())


def shapes(module):
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def meta_models(depth, **var_kwargs):
    with torch.device("meta"):
        vae = MultiScaleVQVAE(vocab_size=4096, z_channels=32, ch=160)
        return vae, VAR(vae, VARConfig(depth=depth, num_classes=1000, **var_kwargs))
