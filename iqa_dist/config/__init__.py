"""The one typed config: the schema (`schema.py`: a dataclass per section, validated) and how a
config is read (`loading.py`: presets, `section.field=value` overrides, a run's config.yaml).
"""

from .loading import (build_config, config_from_yaml, flatten, load_config, load_config_for, parse_override,
                      preset_names, with_overrides)
from .schema import (ARCHITECTURE, DATASETS, DATASET_FIELDS, ENVIRONMENT, PROTOCOLS, SECTIONS, AugmentConfig, Config,
                     DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, all_keys, field_docs)

__all__ = ["ARCHITECTURE", "AugmentConfig", "Config", "DataConfig", "DATASET_FIELDS", "DATASETS", "ENVIRONMENT",
           "ModelConfig", "OptimConfig", "PROTOCOLS", "RunConfig", "SECTIONS", "TrainConfig", "all_keys", "build_config",
           "config_from_yaml", "field_docs", "flatten", "load_config", "load_config_for", "parse_override",
           "preset_names", "with_overrides"]
