"""Command-line entry points (Hydra apps); see ``varlib.cli.train`` for ``varlib-train``."""
