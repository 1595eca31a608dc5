"""varlib.images: the pixel converters and PNG writing, light enough for any caller."""

import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from varlib.images import save_png, signed_float_to_uint8

HEAVY_MODULES = ("lightning", "matplotlib", "torchmetrics", "hydra", "varlib.evaluation", "varlib.training",
                 "varlib.cli")


def test_saving_a_png_imports_no_heavy_package(tmp_path):
    code = (
        "import sys, torch\n"
        "from varlib.images import save_png\n"
        f"save_png(torch.zeros(3, 2, 2), {str(tmp_path / 'image.png')!r})\n"
        f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    assert (tmp_path / "image.png").is_file()


def test_png_holds_the_rounded_and_clamped_pixels(tmp_path):
    image_3HW = torch.tensor([0.0, 0.5, 1.0, 1.5]).view(1, 2, 2).expand(3, 2, 2)
    path = save_png(image_3HW, tmp_path / "nested" / "image.png")
    pixels_HWC = np.asarray(Image.open(path))
    assert pixels_HWC.dtype == np.uint8 and pixels_HWC.shape == (2, 2, 3)
    assert pixels_HWC[..., 0].tolist() == [[0, 128], [255, 255]]
    assert signed_float_to_uint8(torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)).flatten().tolist() == [0, 128, 255]
