"""Import hook that lets a CUDA-only torchvision wheel import on a CPU-only torch.

torchvision 0.28.0 is published only as a CUDA build. On a CPU torch its compiled ops library cannot
load, and ``import torchvision`` then fails in ``_meta_registrations`` because the op schemas
``torchvision::nms`` and ``torchvision::qnms`` do not exist. This hook runs once, right before the
first ``import torchvision``, and defines exactly those two schemas (no kernels) when they are missing.
Nothing else is touched. ``scripts/setup_env.sh`` installs it into a virtual environment only when a
plain ``import torchvision`` fails there.
"""

import importlib.abc
import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_libraries = []


def _has_op(torch, name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _define_missing_schemas() -> None:
    import torch

    missing = [name for name in _SCHEMAS if not _has_op(torch, name)]
    if not missing:
        return
    library = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        library.define(_SCHEMAS[name])
    _libraries.append(library)  # the schemas live as long as this object


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        _define_missing_schemas()
        return None  # the regular finders import torchvision itself


def install() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
