"""Images offered on the Edit page (``examples`` in ``conf/app.yaml``): files, or held-out emoji for the demo's model."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from varlib.data.emoji import EmojiDataModule, is_validation_name, labelled_emoji_files, twemoji_png_dir


def example_images(examples: Sequence[str | Path] | None) -> list[Path]:
    """The example images as existing files; a missing one is a FileNotFoundError naming it."""
    paths = [Path(str(p)).expanduser() for p in (examples or [])]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"examples: expected an image file at {path}, got nothing there")
    return paths


def held_out_emoji(count: int = 9) -> list[Path]:
    """``count`` Twemoji files of the emoji data's held-out split (``data=emoji``'s default split, which the demo's
    models never trained on), one category after another in class order."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    data = EmojiDataModule()
    labelled, _ = labelled_emoji_files(twemoji_png_dir())
    held_out = {name: [path for path, category in labelled if category == name
                       and is_validation_name(path.name, data.val_fraction, data.split_seed)]
                for name in data.class_names}
    picked: list[Path] = []
    for rank in range(max(len(paths) for paths in held_out.values())):
        picked += [paths[rank] for paths in held_out.values() if rank < len(paths)]
    return picked[:count]
