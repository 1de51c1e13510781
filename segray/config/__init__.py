"""Typed job configs: one per job, loadable from YAML, overridable with ``--set a.b=value``.

Every section forbids unknown fields, so a typo fails before any cluster work starts and the
error names the field (``train.epochs: Input should be greater than 0``). This package is the
lowest layer of segray: it imports nothing else of segray. Its modules:

- ``base``: the strict base model, ``ConfigError`` and the load / override / dump helpers;
- ``models``: the model configs, one class per model keyed by ``name`` (``AnyModelConfig``);
- ``data``: sources, storage options and the training data section;
- ``train``: loss, optimizer, loop and ``TrainJobConfig``;
- ``infer``: the inference jobs and the actor pool they share;
- ``demo``: ``DemoJobConfig``;
- ``outputs``: table outputs (``IcebergTableConfig``: the ``table`` of infer and nightly jobs).

Everything public is re-exported here: import from ``segray.config``.
"""

from segray.config.base import (
    C,
    ENV_PREFIX,
    ConfigError,
    Size2D,
    build_config,
    dump_config,
    format_validation_error,
    load_config,
    parse_overrides,
)
from segray.config.data import (
    AugmentConfig,
    BandStatsConfig,
    ChipsConfig,
    DataConfig,
    SourceConfig,
    StacSourceConfig,
    StorageOptions,
)
from segray.config.demo import DEMO_OPTIM, DEMO_TRAIN, DemoJobConfig, demo_instance_model
from segray.config.infer import (
    ActorPoolConfig,
    ImagePoolConfig,
    ImageRunConfig,
    InferJobConfig,
    InstanceLimitsConfig,
    NightlyJobConfig,
    SceneInferJobConfig,
    SceneRunConfig,
)
from segray.config.models import (
    DEFAULT_MODEL,
    INSTANCE_MODELS,
    MODEL_CONFIGS,
    SEMANTIC_MODELS,
    AnyModelConfig,
    Family,
    MaskRCNNConfig,
    ModelConfig,
    TorchvisionSegConfig,
    UNetConfig,
    model_config_class,
    model_names,
)
from segray.config.outputs import IcebergCatalogConfig, IcebergTableConfig
from segray.config.train import (
    INSTANCE_METRICS,
    LossConfig,
    LossTerm,
    OptimConfig,
    TrainJobConfig,
    TrainLoopConfig,
)

__all__ = [
    "C", "ENV_PREFIX", "ConfigError", "Size2D", "build_config", "dump_config", "format_validation_error",
    "load_config", "parse_overrides",
    "AugmentConfig", "BandStatsConfig", "ChipsConfig", "DataConfig", "SourceConfig", "StacSourceConfig", "StorageOptions",
    "DEMO_OPTIM", "DEMO_TRAIN", "DemoJobConfig", "demo_instance_model",
    "ActorPoolConfig", "ImagePoolConfig", "ImageRunConfig", "InferJobConfig", "InstanceLimitsConfig", "NightlyJobConfig",
    "SceneInferJobConfig", "SceneRunConfig",
    "DEFAULT_MODEL", "INSTANCE_MODELS", "MODEL_CONFIGS", "SEMANTIC_MODELS", "AnyModelConfig", "Family",
    "MaskRCNNConfig", "ModelConfig", "TorchvisionSegConfig", "UNetConfig", "model_config_class", "model_names",
    "IcebergCatalogConfig", "IcebergTableConfig",
    "INSTANCE_METRICS", "LossConfig", "LossTerm", "OptimConfig", "TrainJobConfig", "TrainLoopConfig",
]
