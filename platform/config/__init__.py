"""Job configuration: Hydra composition, the typed schema and validation."""

from platform.config.load import ConfigError, flatten, load_job, state_dir, to_dict
from platform.config.schema import (
    CheckpointConfig, ClusterConfig, CurriculumStage, DataConfig, DataSource, JobConfig,
    ModelConfig, PromoteConfig, ServeConfig, TrackingConfig, TrainConfig,
)

__all__ = [
    "CheckpointConfig", "ClusterConfig", "ConfigError", "CurriculumStage", "DataConfig",
    "DataSource", "JobConfig", "ModelConfig", "PromoteConfig", "ServeConfig", "TrackingConfig",
    "TrainConfig", "flatten", "load_job", "state_dir", "to_dict",
]
