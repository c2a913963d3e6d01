"""Packaging for pr2_megatron: Predictive Routing Replay for RL on MoE models in Megatron-core."""

from setuptools import find_packages, setup

# CI and the CPU quickstart pin these; the code itself probes newer megatron-core APIs
# (0.17-0.19) at run time in pr2_megatron/compat.py.
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "megatron-core==0.16.1",
    "numpy",
    "packaging",
    "PyYAML",
    "safetensors",
]

EXTRAS = {
    # transformers: tests/test_convert_hf.py builds tiny Qwen3-MoE/OLMoE models locally (no
    # download); 5.x works with torch 2.13 and keeps the fused-expert layout the converter reads.
    "test": ["pytest", "hypothesis", "ruff", "transformers==5.23.0"],
    "plots": ["matplotlib==3.11.2", "tensorboard==2.21.0"],
    # GPU clusters add these from their own stack (an NGC PyTorch container ships them).
    # transformer-engine is never installed on CPU machines (it breaks megatron's MoE imports
    # there), and NVIDIA apex is built from source: the PyPI package named `apex` is unrelated.
    "gpu": ["nvidia-ml-py"],
}

setup(
    name="pr2_megatron",
    version="0.1.0",
    description="Predictive Routing Replay (PR2) for RL on MoE LLMs in Megatron-core",
    packages=find_packages(include=["pr2_megatron", "pr2_megatron.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "pr2-demo=pr2_megatron.demo:main",
            "pr2-train=pr2_megatron.train:main",
            "pr2-compare=pr2_megatron.compare:main",
        ]
    },
)
