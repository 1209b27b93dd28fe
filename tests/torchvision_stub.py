"""A stand-in ``torchvision`` for importing timm where the real one does not import (tests only).

timm imports torchvision at its own import (``torchvision.ops.misc.FrozenBatchNorm2d`` in
timm.layers, ``torchvision.transforms`` and ``torchvision.datasets`` in timm.data), but its
models never use it: ``timm.create_model(..., pretrained=False)`` builds them from torch alone.
On the CPU machines torchvision is absent (.ci/run installs timm with --no-deps) or does not
import: the PyPI wheel that matches the CPU torch (.ci/constraints.txt) is a CUDA build and
fails with "operator torchvision::nms does not exist" (and, installed, breaks transformers,
which imports it when found). So, while timm is imported, ``stand_in_if_broken()`` puts in
sys.modules the few names timm reads at import time and nothing more:

- every class here (FrozenBatchNorm2d, ToTensor, the datasets) raises when instantiated, and
  any other name raises AttributeError (ImportError for ``from ... import``, which timm's
  optional imports, torchvision.models.feature_extraction among them, treat as "absent");
- ``InterpolationMode`` is the real enum's members and values (timm maps them at import);
- it never shadows a torchvision that imports, and is removed from sys.modules on leaving
  (timm keeps its references), so the rest of the session sees torchvision as it is.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.machinery
import sys
import types
from collections.abc import Iterator


def _unavailable(qualname: str) -> type:
    """A class timm may name, subclass or isinstance-check, that refuses to be built."""
    module, _, name = qualname.rpartition(".")

    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{qualname} is a test stand-in (tests/torchvision_stub.py)")

    return type(name, (), {"__init__": __init__, "__module__": module})


class InterpolationMode(enum.Enum):
    """torchvision.transforms.functional.InterpolationMode's members, same values."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_DATASETS = ["CIFAR10", "CIFAR100", "MNIST", "KMNIST", "FashionMNIST", "ImageFolder"]
_MODULES = {  # module: the names timm imports from it at its own import
    "torchvision": [],
    "torchvision.ops": [],
    "torchvision.ops.misc": [_unavailable("torchvision.ops.misc.FrozenBatchNorm2d")],
    "torchvision.transforms": [_unavailable("torchvision.transforms.ToTensor")],
    "torchvision.transforms.functional": [InterpolationMode],
    "torchvision.datasets": [_unavailable(f"torchvision.datasets.{n}") for n in _DATASETS],
}


def _module(name: str, members: list) -> types.ModuleType:
    module = types.ModuleType(name, "Stand-in: see tests/torchvision_stub.py.")
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__path__ = []
    module.__version__ = "0.0+stand-in"

    def __getattr__(attr: str):
        raise AttributeError(f"{name}.{attr}: not in the stand-in (tests/torchvision_stub.py)")

    module.__getattr__ = __getattr__
    for member in members:
        setattr(module, member.__name__, member)
    return module


def _drop_torchvision() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


@contextlib.contextmanager
def stand_in_if_broken() -> Iterator[None]:
    """Within the block, ``import torchvision`` gives the stand-in if the real one fails."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError (absent), RuntimeError (a wheel built for another torch)
        pass
    else:
        yield
        return
    _drop_torchvision()  # submodules a failed import left behind
    modules = {name: _module(name, members) for name, members in _MODULES.items()}
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    sys.modules.update(modules)
    try:
        yield
    finally:
        _drop_torchvision()
