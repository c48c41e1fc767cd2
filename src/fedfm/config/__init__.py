"""Typed run configuration: YAML file + dotted ``--set`` overrides -> validated ``RunConfig``.

One module per concern (``data``, ``model``, ``train``, ``strategy``, ``federation``, ``privacy``, ``engine``,
``updates``, ``continual``; ``run`` assembles them). Every field has a description (shown by ``fedfm info
--config``). Unknown keys and bad values are rejected before anything is loaded, with a message that names the
key and the valid choices; combinations that cannot run together are refused from the capabilities each part
declares (``rules``), naming both parts and what to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fedfm.config.base import Section, apply_overrides, format_error, parse_override, read_yaml_mapping
from fedfm.config.continual import ContinualConfig, StageConfig
from fedfm.config.data import COLLECTIONS, FILE_SOURCES, INSTRUCTION_SOURCES, DataConfig
from fedfm.config.engine import EngineConfig
from fedfm.config.federation import FederationConfig
from fedfm.config.model import ModelConfig, PeftMethod, PeftSection
from fedfm.config.privacy import DPConfig, DPSGDConfig, SecAggConfig
from fedfm.config.run import CompareConfig, EvalConfig, RunConfig, ServerDataConfig
from fedfm.config.strategy import STRATEGY_NAMES, StrategyConfig
from fedfm.config.train import TrainConfig
from fedfm.config.updates import SPARSIFIERS, VALUE_STAGES, AttackConfig, CompressionConfig, Stage
from fedfm.errors import ConfigError

_SECTIONS = set(RunConfig.model_fields) - {"name", "seed", "rounds", "output_dir", "task"}


def from_dict(raw: dict[str, Any]) -> RunConfig:
    # a section header whose keys are all commented out reads as None: treat it as an empty section
    raw = {k: ({} if v is None and k in _SECTIONS else v) for k, v in raw.items()}
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_error(err, RunConfig)) from None


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or defaults when ``path`` is None) and apply ``key=value`` overrides."""
    raw = read_yaml_mapping(path) if path is not None else {}
    return from_dict(apply_overrides(raw, overrides or []))


def save(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


__all__ = [
    "COLLECTIONS", "FILE_SOURCES", "INSTRUCTION_SOURCES", "SPARSIFIERS", "STRATEGY_NAMES", "VALUE_STAGES",
    "AttackConfig", "CompareConfig", "CompressionConfig", "ContinualConfig", "DataConfig", "DPConfig", "DPSGDConfig",
    "EngineConfig", "EvalConfig", "FederationConfig", "ModelConfig", "PeftMethod", "PeftSection", "RunConfig",
    "SecAggConfig", "Section", "ServerDataConfig", "Stage", "StageConfig", "StrategyConfig", "TrainConfig",
    "apply_overrides", "format_error", "from_dict", "load", "parse_override", "read_yaml_mapping", "save",
]
