"""sare_ds: sharpness-aware robust erasure (SARE) of hallucinations in multimodal LLMs.

Parts (one module per concept):
  config            typed config tree, YAML + overrides, validation, dump
  models/           MLLM adapters (LLaVA family), trainable-set selection, tiny-model factory
  data/             samples, chat-template tokenisation with target-span labels, generated data
  train/            span losses, parameter spaces (where weights/grads live), the step, the loop
"""
from sare_ds import _torchvision_guard

_torchvision_guard.install()


def _checkout_kernels() -> None:
    """Make the checkout's `kernels/` folder importable as `sare_kernels` when it is not installed.

    `pip install -e .` installs it under that name (setup.py); a checkout used through PYTHONPATH
    (launch/gpu_check.sh on a fresh GPU machine) has only the folder. Nothing is done when an
    installed `sare_kernels` exists or the folder is absent.
    """
    import importlib.util
    import sys
    from pathlib import Path

    if "sare_kernels" in sys.modules or importlib.util.find_spec("sare_kernels") is not None:
        return
    folder = Path(__file__).resolve().parents[1] / "kernels"
    if not (folder / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location("sare_kernels", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["sare_kernels"] = module
    spec.loader.exec_module(module)


_checkout_kernels()

__version__ = "0.1.0"
