"""varlib: Visual Autoregressive modeling (next-scale prediction) in plain PyTorch, Lightning and Hydra."""

__version__ = "0.1.0"

from varlib.io import load
from varlib.models.hub import save_tokenizer, save_var
from varlib.models.transformer import VAR
from varlib.models.vqvae import MultiScaleVQVAE
from varlib.official import load_official_var, load_official_vqvae

__all__ = ["MultiScaleVQVAE", "VAR", "load", "load_official_vqvae", "load_official_var", "save_tokenizer", "save_var"]
