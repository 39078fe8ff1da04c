"""Profiles: overlays in profiles/<name>.yaml applied onto params.yaml in one step, comments kept.

profiles/demo.yaml holds the demo value of every key another profile changes, so any profile can be
undone by applying demo.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from presto.config import parse_params
from presto.errors import ParamsError


def _merge(target: Any, overlay: dict, prefix: str, changed: list[str]) -> None:
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        if key not in target:
            raise ParamsError(f"profile key {dotted!r} is not in params.yaml")
        if isinstance(value, dict):
            _merge(target[key], value, f"{dotted}.", changed)
        elif target[key] != value:
            target[key] = value
            changed.append(dotted)


def profile_names(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "profiles").glob("*.yaml"))


def apply_profile(root: Path, name: str) -> list[str]:
    path = root / "profiles" / f"{name}.yaml"
    if not path.is_file():
        raise ParamsError(f"unknown profile {name!r}; profiles are: {', '.join(profile_names(root))}")
    yaml = YAML()
    yaml.preserve_quotes = True
    params = yaml.load((root / "params.yaml").read_text())
    overlay = yaml.load(path.read_text()) or {}  # round-trip: `2.0e-5` stays a float to PyYAML
    changed: list[str] = []
    _merge(params, overlay, "", changed)
    buf = io.StringIO()
    yaml.dump(params, buf)
    parse_params(YAML(typ="safe").load(buf.getvalue()), f"params.yaml with profile {name}")
    (root / "params.yaml").write_text(buf.getvalue())
    return changed
