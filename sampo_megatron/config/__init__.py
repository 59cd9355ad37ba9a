"""Typed run configuration (:mod:`.schema`) and its Megatron-style command line (:mod:`.parsing`).

``parse_config(argv)`` gives a :class:`RunConfig`; :func:`sampo_megatron.plan.resolve` settles it
into the run's frozen plan.
"""

from .parsing import ConfigFileError, build_parser, parse_config
from .schema import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    OperationsConfig,
    OptimizerConfig,
    ParallelConfig,
    PlanConfig,
    PrecisionConfig,
    RecomputeConfig,
    ReferenceConfig,
    RunConfig,
    ScheduleConfig,
    TrainingConfig,
)

__all__ = [
    "CheckpointConfig",
    "ConfigFileError",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "ModelConfig",
    "OperationsConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "PlanConfig",
    "PrecisionConfig",
    "RecomputeConfig",
    "ReferenceConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainingConfig",
    "build_parser",
    "parse_config",
]
