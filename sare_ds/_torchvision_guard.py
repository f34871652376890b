"""Keep `import torchvision` working when its compiled ops cannot load next to this torch.

On CPU-only machines the only torchvision wheel is a CUDA build: its `_C.so` fails to load
against the CPU torch, and `import torchvision` then dies registering fake kernels for
`torchvision::nms` / `torchvision::qnms` ("operator torchvision::nms does not exist").
transformers and open_clip import torchvision, so they die too.

`install()` runs before torchvision is first imported. It tries to load the compiled
library exactly as torchvision would; only if that really fails does it define the two op
schemas, so the pure-Python parts (transforms) import. Where the library loads (a GPU node
with a matching CUDA torch and torchvision) nothing is changed.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

_state = {"checked": False, "patched": False}


def compiled_ops_load() -> bool | None:
    """True if torchvision's `_C` loads, False if it fails, None if torchvision is absent."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    import torch

    libs = []
    for folder in spec.submodule_search_locations:
        libs += glob.glob(os.path.join(folder, "_C*.so")) + glob.glob(os.path.join(folder, "_C*.pyd"))
    if not libs:
        return False
    try:
        torch.ops.load_library(libs[0])
        return True
    except (OSError, ImportError, RuntimeError):
        return False


def install() -> bool:
    """Apply the guard if needed; returns True if the op schemas had to be defined."""
    if _state["checked"]:
        return _state["patched"]
    _state["checked"] = True
    if "torchvision" in sys.modules:  # already imported (fine or broken): nothing to do here
        return False
    if compiled_ops_load() is not False:
        return False
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    for name in ("nms", "qnms"):
        try:
            lib.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # already defined by someone else
            pass
    # Keep the Library object alive: dropping it would remove the definitions.
    _state["library"] = lib
    _state["patched"] = True
    return True
