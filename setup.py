"""sampo-megatron: SamPO (length-debiased DPO) on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="sampo-megatron",
    version="0.1.0",
    description="SamPO / DPO preference training on megatron-core with tensor, pipeline and context parallelism",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sampo_megatron", "sampo_megatron.*"]),
    install_requires=[
        "torch>=2.3",
        "megatron-core>=0.16.1",
        "numpy",
        "sentencepiece",
        "tokenizers",
        "transformers",
        "safetensors",
        "psutil",  # megatron-core's async checkpoint writer needs it
        "pyyaml",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        "mpi": ["mpi4py"],
        # parquet and datasets-directory readers, and the preprocessing histogram PNG (docs/data.md)
        "data": ["pyarrow", "datasets", "matplotlib"],
        "tensorboard": ["tensorboard"],  # --tensorboard-dir
        # mpi4py: tests/test_launch.py's mpirun launch (Open MPI from .ci/run's apt-get)
        "dev": ["pytest", "pytest-timeout", "pyarrow", "datasets", "matplotlib", "tensorboard", "mpi4py"],
    },
)
