"""Install sare_ds: `pip install -e .` (use `launch/setup_env.sh`, which pins torch first).

The top-level `kernels/` folder is installed as the package `sare_kernels` (a name of its own:
Hugging Face's `kernels` package, which transformers probes for, owns the plain name). A checkout
that is not installed (the GPU check's PYTHONPATH) gets the same name from `import sare_ds`.
"""
from setuptools import find_packages, setup

setup(
    name="sare_ds",
    version="0.1.0",
    description="Sharpness-aware robust erasure (SARE) of hallucinations in multimodal LLMs, on DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["sare_ds", "sare_ds.*"]) + ["sare_kernels"],
    package_dir={"sare_kernels": "kernels"},
    package_data={"sare_ds": ["resources/*", "resources/pope/*", "resources/presets/*"]},
    install_requires=[
        # torch is deliberately unpinned here: launch/setup_env.sh pins it through a
        # constraint file (CPU wheel on CPU machines, the machine's own CUDA build on GPUs).
        "torch>=2.4",
        # ZeRO-3 internals of 0.19 (safe_get_local_*, ds_tensor, persistent partition/gather), each use
        # pinned by a reference test; older releases differ there.
        "deepspeed>=0.19",
        # transformers 5: from_pretrained/_from_config(dtype=...), model.model.{vision_tower,
        # multi_modal_projector,language_model}, loading info of renamed keys, tokenizer extra_special_tokens.
        "transformers>=5.0",
        "tokenizers",
        "protobuf",  # reading SentencePiece tokenizer.model files (sare_ds.models.convert)
        "peft",
        "open_clip_torch",
        "webdataset",
        "mpi4py",
        "tensorboard",
        "safetensors",
        "pyyaml",
        "tqdm",
        "numpy",
        "pillow",
        "matplotlib",
        "nltk",  # BLEU (corpus_bleu); no nltk data is downloaded
        "num2words",  # SmolVLM's processor refuses to construct without it
        "triton; platform_system == 'Linux'",
    ],
    # sentencepiece: the converter's tokenizer is checked against the library itself.
    extras_require={"test": ["pytest>=7", "pytest-timeout", "sentencepiece"]},
)
