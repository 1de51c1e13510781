"""The config layer's base: the strict model every section derives from, and the helpers that
load a config from YAML, apply ``--set a.b=value`` overrides, validate and dump it.

Every section forbids unknown fields, so a typo fails before any cluster work starts and the
error names the field (``train.epochs: Input should be greater than 0``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError


def _hw(value: Any) -> Any:
    """An int n means [n, n]; a pair is [height, width]."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return tuple(value)
    raise ValueError("give a positive int or [height, width]")


Size2D = Annotated[tuple[int, int], BeforeValidator(_hw)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- loading

C = TypeVar("C", bound=BaseModel)


class ConfigError(ValueError):
    """A config that does not validate; the message names every bad field."""


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{k}' is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """``["train.epochs=3", "model.up=bilinear"]`` -> [(path, YAML-parsed value)]."""
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw else None))
    return out


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(config)"
        lines.append(f"{field}: {e['msg']}")
    return "invalid config:\n  " + "\n  ".join(lines)


def build_config(cls: type[C], data: dict | None = None, overrides: list[str] | None = None) -> C:
    tree = copy.deepcopy(data or {})  # never mutate the caller's dict
    for key, value in parse_overrides(overrides):
        _set_path(tree, key, value)
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


ENV_PREFIX = "env:"


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Read YAML from a local path or fsspec URL, apply overrides, validate."""
    data: dict = {}
    if path is not None and str(path).startswith(ENV_PREFIX):
        # env:NAME = the YAML text in environment variable NAME (how `segray submit` ships a
        # config that lives outside the uploaded working dir).
        name = str(path)[len(ENV_PREFIX):]
        if name not in os.environ:
            raise ConfigError(f"config: environment variable {name} is not set")
        data = yaml.safe_load(os.environ[name]) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    elif path is not None:
        import fsspec

        try:
            with fsspec.open(str(path), "r") as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    return build_config(cls, data, overrides)


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
