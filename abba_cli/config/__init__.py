"""Typed run configuration: the sections (sections.py) and how a YAML file becomes a RunConfig (files.py).

`load_config(path, overrides)` is the only way a YAML file becomes a `RunConfig`; every problem found is
reported at once as a `UserError` naming the file and the dotted key.
"""

from abba_cli.config.files import (
    apply_overrides,
    dump_config,
    format_validation_error,
    load_config,
    parse_override_value,
    validate_config,
)
from abba_cli.config.sections import (
    ATTN_IMPLEMENTATIONS,
    DEFAULT_ABBA_ALPHA,
    DEFAULT_TARGETS,
    LORA_SCALED,
    AdapterConfig,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "DEFAULT_ABBA_ALPHA",
    "DEFAULT_TARGETS",
    "LORA_SCALED",
    "AdapterConfig",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "dump_config",
    "format_validation_error",
    "load_config",
    "parse_override_value",
    "validate_config",
]
