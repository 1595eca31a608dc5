"""varlib: Visual Autoregressive modeling (next-scale prediction) in plain PyTorch, Lightning and Hydra."""
