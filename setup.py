"""sampo-megatron: SamPO (length-debiased DPO) on megatron-core."""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
# The one version string: sampo_megatron/__init__.py.
VERSION = re.search(r'^__version__ = "([^"]+)"', (ROOT / "sampo_megatron" / "__init__.py").read_text(), re.M).group(1)

EXTRAS = {
    "gpu": ["transformer-engine[pytorch]"],
    "mpi": ["mpi4py"],
    # parquet and datasets-directory readers, and the preprocessing histogram PNG (docs/data.md)
    "data": ["pyarrow", "datasets", "matplotlib"],
    "tensorboard": ["tensorboard"],  # --tensorboard-dir
    "wandb": ["wandb"],  # --wandb-project
}
# dev: the test tools (pytest-xdist: make test runs two test files side by side) plus every extra
# that runs on CPU (mpi4py: tests/test_launch.py's mpirun launch, with Open MPI from .ci/run's
# apt-get). The gpu extra cannot be installed without CUDA.
_TEST_TOOLS = {"pytest", "pytest-timeout", "pytest-xdist", "ruff"}
EXTRAS["dev"] = sorted(_TEST_TOOLS | {r for k in ("mpi", "data", "tensorboard", "wandb") for r in EXTRAS[k]})

setup(
    name="sampo-megatron",
    version=VERSION,
    description="SamPO / DPO preference training on megatron-core with tensor, pipeline and context parallelism",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["sampo_megatron", "sampo_megatron.*"]),
    install_requires=[
        "torch>=2.3",
        # The tested release lines (sampo_megatron/compat/version.py, docs/compatibility.md): 0.16.x is
        # the last line that installs on Python 3.11; Python 3.12 gets 0.19.x, as on NGC containers.
        "megatron-core>=0.16.1,<0.17; python_version < '3.12'",
        "megatron-core>=0.19.2,<0.20; python_version >= '3.12'",
        "numpy",
        "sentencepiece",
        "tokenizers",
        "transformers",
        "safetensors",
        "psutil",  # megatron-core's async checkpoint writer needs it
        "pyyaml",
    ],
    extras_require=EXTRAS,
    # The command lines; launch/ and tools/ hold scripts of the same names for a checkout without install.
    entry_points={
        "console_scripts": [
            "sampo-train = sampo_megatron.cli.train:main",
            "sampo-convert-hf = sampo_megatron.cli.convert_hf:main",
            "sampo-export-hf = sampo_megatron.cli.export_hf:main",
            "sampo-generate = sampo_megatron.cli.generate:main",
            "sampo-preprocess = sampo_megatron.cli.preprocess:main",
            "sampo-plan = sampo_megatron.cli.plan:main",
            "sampo-length-report = sampo_megatron.cli.length_report:main",
            "sampo-precompute-reference = sampo_megatron.cli.precompute_reference:main",
            "sampo-plot-metrics = sampo_megatron.cli.plot_metrics:main",
        ]
    },
)
