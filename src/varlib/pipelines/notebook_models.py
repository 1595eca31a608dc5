"""The notebooks' models: ``make demo``'s and ``make demo-text``'s files when they exist, else tiny ones trained
on first use (``conf/experiment/tiny_tokenizer.yaml``, ``tiny_var.yaml``, ``tiny_text_var.yaml``)."""

from __future__ import annotations

from pathlib import Path

from varlib.pipelines.stages import RunFiles, project_dir, train_stage


def prepare_models(with_var: bool = True) -> RunFiles:
    """``make demo``'s files (``<project>/outputs/demo``) when it wrote them, else a tiny run's under
    ``<project>/outputs/notebooks``, training whatever it lacks (about a minute on two CPU cores).

    The tiny VAR tokenises its emoji batches on the fly: for a few dozen steps that is cheaper than a token cache.
    Its pictures are blurry blobs: it shows the mechanics, not the quality. ``with_var=False`` stops after the
    tokenizer, which is all a scaling sweep needs.
    """
    demo = RunFiles(project_dir() / "outputs" / "demo", "demo")
    if demo.tokenizer.is_file() and (demo.transformer.is_file() or not with_var):
        return demo
    tiny = RunFiles(project_dir() / "outputs" / "notebooks", "tiny")
    train_stage("tiny_tokenizer", tiny.tokenizer.parent)
    if with_var:
        train_stage("tiny_var", tiny.transformer.parent, tiny.transformer_data_overrides())
    return tiny


def prepare_text_model() -> Path:
    """The text VAR file of ``make demo-text`` (``<project>/outputs/demo_text/var``) when it wrote one, else a tiny
    one's under ``<project>/outputs/notebooks/text_var``, trained on the emoji names (``tiny_text_var``) over
    :func:`prepare_models`' tiny tokenizer, training whatever is missing."""
    demo_text = RunFiles(project_dir() / "outputs" / "demo_text", "text")
    if demo_text.transformer.is_file():
        return demo_text.transformer
    tiny = RunFiles(project_dir() / "outputs" / "notebooks", "tiny", transformer_dir="text_var")
    train_stage("tiny_tokenizer", tiny.tokenizer.parent)
    train_stage("tiny_text_var", tiny.transformer.parent, tiny.transformer_data_overrides())
    return tiny.transformer
