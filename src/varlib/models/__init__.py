"""Plain PyTorch models: the multi-scale VQ tokenizer, the VAR transformer and its sampler."""
