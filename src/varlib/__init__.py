"""varlib: Visual Autoregressive modeling (next-scale prediction) in plain PyTorch, Lightning and Hydra."""

__version__ = "0.1.0"

from varlib.files.format import save_tokenizer, save_var
from varlib.files.loading import load
from varlib.files.official import load_official_var, load_official_vqvae
from varlib.models.transformer import VAR, VARConfig
from varlib.models.vqvae import MultiScaleVQVAE

__all__ = ["MultiScaleVQVAE", "VAR", "VARConfig", "load", "load_official_vqvae", "load_official_var", "save_tokenizer",
           "save_var"]
