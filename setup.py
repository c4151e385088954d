"""sppo_fast: Sequence-Level PPO (SPPO) for LLM reasoning RL on one GPU, with fused log-prob kernels.

`kernels/` is installed as the subpackage `sppo_fast.kernels` (a top-level `kernels` package would clash with the
`kernels` package on PyPI that transformers integrates with).
"""
from setuptools import setup

setup(
    name="sppo_fast",
    version="0.1.0",
    description="Sequence-Level PPO trainer and fused Triton log-prob / PPO-loss kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["sppo_fast", "sppo_fast.kernels"],
    package_dir={"sppo_fast": "sppo_fast", "sppo_fast.kernels": "kernels"},
    package_data={"sppo_fast": ["assets/tiny/*", "presets/*.yaml"]},
    include_package_data=True,
    install_requires=[
        # a range that the local CPU wheel (2.13.0) satisfies; install torch first so pip keeps it
        "torch>=2.4,<2.15",
        "triton>=3.0",
        "transformers>=4.45",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "tensorboard>=2.15",
        "matplotlib>=3.7",
        "math-verify>=0.7",
    ],
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "liger": ["liger-kernel>=0.5"],
        "lora": ["peft>=0.13"],
        # SPPO mode and the fused GRPOTrainer override TRL internals, so the major version is pinned
        "trl": ["trl>=1.16,<2"],
        # verl 0.9 pins transformers < 5.11: pip then picks a transformers both accept
        "verl": ["verl>=0.9.1,<0.10"],
        # --memory-budget's bf16 stochastic-rounding / 8-bit AdamW and CPU offload (tested with torchao 0.18)
        "memory": ["torchao>=0.18"],
        # PyPI's `kernels` (hub kernels; transformers >= 5.25 requires it) is named here so that
        # tests/test_entrypoints.py always meets the name clash with our top-level kernels/ folder that it guards
        "test": ["pytest>=8", "liger-kernel>=0.5", "trl>=1.16,<2", "peft>=0.13", "torchao>=0.18", "kernels"],
        "bench": ["liger-kernel>=0.5", "cut-cross-entropy>=25.1"],
    },
    entry_points={"console_scripts": ["sppo-fast=sppo_fast.cli:main"]},
)
