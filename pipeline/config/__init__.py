from .load import ConfigError, apply_override, load_config, validate
from .schema import (
    CorpusConfig,
    ExtractConfig,
    ExtractRunConfig,
    HFSource,
    ModelConfig,
    StoreConfig,
    TaskConfig,
)

__all__ = [
    "ConfigError", "apply_override", "load_config", "validate",
    "CorpusConfig", "ExtractConfig", "ExtractRunConfig", "HFSource", "ModelConfig", "StoreConfig", "TaskConfig",
]
