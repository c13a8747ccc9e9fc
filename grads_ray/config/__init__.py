"""One configuration tree for the whole job.

YAML in, ``key.sub=value`` overrides from the command line, validated before Ray starts: unknown keys
and wrong types are errors that name the key, never something found later inside a Ray worker.

The package, by job: ``sections`` and ``select_sections`` (the dataclasses, the config reference,
each section's checks beside it), ``loading`` (overrides, building the tree, ``load_config``,
``with_settings``, the order of the checks in ``validate``), ``paths`` (which settings are paths,
made absolute), ``errors`` (:class:`ConfigError`). Import from here: the names below (those the
single module config.py had) are the API.
"""

from grads_ray.config.errors import ConfigError
from grads_ray.config.loading import load_config, parse_override, validate, with_settings
from grads_ray.config.paths import INPUT_PATH_LISTS, PATH_KEYS, URL_KEYS, absolute_paths, path_settings
from grads_ray.config.sections import (
    RESOURCE_FIELDS,
    CompareConfig,
    Config,
    DataConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    RayConfig,
    ScoreConfig,
    SimilarityConfig,
    TrainConfig,
    recipe,
)
from grads_ray.config.select_sections import (
    BaselineConfig,
    FisherConfig,
    GradsConfig,
    LessConfig,
    SelectConfig,
)

__all__ = [
    "INPUT_PATH_LISTS", "PATH_KEYS", "RESOURCE_FIELDS", "URL_KEYS",
    "BaselineConfig", "CompareConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "FisherConfig",
    "GradsConfig", "LessConfig", "LoraConfig", "ModelConfig", "RayConfig", "ScoreConfig", "SelectConfig",
    "SimilarityConfig", "TrainConfig",
    "absolute_paths", "load_config", "parse_override", "path_settings", "recipe", "validate", "with_settings",
]
