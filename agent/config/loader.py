"""Layered configuration: defaults < hardware profile < site file < pushed profile.

Each layer is a plain mapping plus, for YAML files, the line of every key. Layers are
merged as data (mappings merge key by key, lists and scalars replace), then validated
once into an ``AgentConfig``. Every value remembers which layer set it, for
``classroom-agent config show`` and for errors that point at the right file and line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from agent.config.errors import ConfigError, ConfigIssue, issues_from_validation
from agent.config.models import AgentConfig

DEFAULTS_LAYER = "default"


@dataclass(frozen=True)
class Layer:
    """One source of settings: its name, its data, and where each dotted key was written."""

    name: str
    data: Mapping[str, Any]
    lines: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadedConfig:
    config: AgentConfig
    sources: Mapping[str, str]  # dotted path -> layer name that set it
    layers: tuple[str, ...]
    profile: str = ""  # the hardware profile in effect
    profile_reason: str = ""  # why that profile (named in config, or what detection matched)

    def source_of(self, path: str) -> str:
        probe = path
        while probe:
            if probe in self.sources:
                return self.sources[probe]
            probe = probe.rpartition(".")[0]
        return DEFAULTS_LAYER


def _located_paths(node: yaml.Node, label: str, prefix: str, out: dict[str, str]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            out[key] = f"{label} line {key_node.start_mark.line + 1}"
            _located_paths(value_node, label, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            key = f"{prefix}.{index}"
            out[key] = f"{label} line {item.start_mark.line + 1}"
            _located_paths(item, label, key, out)


def parse_yaml(text: str, label: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse YAML text into a mapping and a map of dotted key -> 'label line N'."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = exc.problem or "invalid YAML"
        raise ConfigError(
            [ConfigIssue("", f"invalid YAML: {problem}; fix the syntax", f"{label}{line}")]
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue("", f"invalid YAML: {exc}", label)]) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(
            [ConfigIssue("", f"must be a mapping of sections, got {type(data).__name__}", label)]
        )
    lines: dict[str, str] = {}
    if node is not None:
        _located_paths(node, label, "", lines)
    return data, lines


def read_yaml_file(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a YAML file; unreadable files are config errors, not tracebacks."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigIssue("", "file not found; check the path", str(path))]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue("", f"cannot read file: {exc}", str(path))]) from None
    return parse_yaml(text, path.name)


def file_layer(path: Path, kind: str = "site file") -> Layer:
    data, lines = read_yaml_file(path)
    return Layer(name=f"{kind} {path}", data=data, lines=lines)


def _merge_into(
    target: dict[str, Any],
    *,
    incoming: Mapping[str, Any],
    layer: Layer,
    prefix: str,
    sources: dict[str, str],
    locate: dict[str, str],
) -> None:
    for key, value in incoming.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        existing = target.get(key)
        if isinstance(value, Mapping) and (existing is None or isinstance(existing, dict)):
            if existing is None:
                existing = target[key] = {}
            _merge_into(
                existing, incoming=value, layer=layer, prefix=path, sources=sources, locate=locate
            )
            continue
        # A replaced subtree forgets where its old leaves came from.
        for stale in [p for p in sources if p.startswith(path + ".")]:
            del sources[stale]
        for stale in [p for p in locate if p.startswith(path + ".")]:
            del locate[stale]
        target[key] = _deep_copy(value)
        sources[path] = layer.name
        for lpath, where in layer.lines.items():
            if lpath == path or lpath.startswith(path + "."):
                locate[lpath] = where
    if prefix and prefix in layer.lines:
        locate.setdefault(prefix, layer.lines[prefix])


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def merge_layers(layers: Iterable[Layer]) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """Merge layers in order (later wins); return data, path -> layer, path -> file line."""
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    locate: dict[str, str] = {}
    for layer in layers:
        _merge_into(
            merged, incoming=layer.data, layer=layer, prefix="", sources=sources, locate=locate
        )
    return merged, sources, locate


def build_config(layers: Iterable[Layer]) -> LoadedConfig:
    """Validate merged layers once; raise ``ConfigError`` naming each bad field and its line."""
    layer_list = list(layers)
    merged, sources, locate = merge_layers(layer_list)
    try:
        config = AgentConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(issues_from_validation(exc, AgentConfig, locate)) from None
    return LoadedConfig(
        config=config, sources=sources, layers=tuple(layer.name for layer in layer_list)
    )
