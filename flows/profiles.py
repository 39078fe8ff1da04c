"""Profiles: overlays in profiles/<name>.yaml applied onto params.yaml in one step.

Only the values a profile changes are rewritten, in place: every other byte of params.yaml (comments,
line wrapping, indentation, `null`s) stays as it was, so `git diff params.yaml` shows exactly what the
profile did. A re-dump of the whole file would reflow it, and the diff would bury the real changes.

profiles/demo.yaml holds the demo value of every key another profile changes, so any profile can be
undone by applying demo, byte for byte.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from presto.config import parse_params
from presto.errors import ParamsError


@dataclass(frozen=True)
class _Edit:
    start: int  # character span of the old value in params.yaml
    end: int
    text: str  # the new value, on one line


def _compose(text: str, name: str) -> yaml.MappingNode:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        raise ParamsError(f"{name} is not valid YAML: {err}") from err
    if node is None:
        return yaml.MappingNode("tag:yaml.org,2002:map", [])
    if not isinstance(node, yaml.MappingNode):
        raise ParamsError(f"{name} must be a mapping of params.yaml's sections")
    return node


def _construct(node: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _one_line(node: yaml.Node, source: str) -> str:
    """The value as the profile writes it (`2.0e-5` stays `2.0e-5`), joined onto one line."""
    if isinstance(node, yaml.ScalarNode) or node.flow_style:
        return re.sub(r"\s*\n\s*", " ", source[node.start_mark.index : node.end_mark.index])
    return yaml.safe_dump(_construct(node), default_flow_style=True, width=math.inf).strip()


def _edits(
    target: yaml.MappingNode, overlay: yaml.MappingNode, overlay_source: str, prefix: str, changed: list[str]
) -> list[_Edit]:
    values = {key.value: value for key, value in target.value}
    edits: list[_Edit] = []
    for key_node, new in overlay.value:
        dotted = f"{prefix}{key_node.value}"
        old = values.get(key_node.value)
        if old is None:
            raise ParamsError(f"profile key {dotted!r} is not in params.yaml")
        if isinstance(new, yaml.MappingNode):
            if not isinstance(old, yaml.MappingNode):
                raise ParamsError(f"profile key {dotted!r} is a mapping but params.yaml's {dotted} is not")
            edits += _edits(old, new, overlay_source, f"{dotted}.", changed)
        elif _construct(old) != _construct(new):
            edits.append(_Edit(old.start_mark.index, old.end_mark.index, _one_line(new, overlay_source)))
            changed.append(dotted)
    return edits


def _comment_column(text: str) -> int:
    """The column params.yaml aligns its trailing comments at (the most common one)."""
    comments = re.finditer(r"^[ \t]*[^#\s][^#\n]*?[ \t](#)", text, re.M)
    columns = Counter(m.start(1) - m.start() for m in comments)
    return columns.most_common(1)[0][0] if columns else 0


def _splice(text: str, edit: _Edit, comment_column: int) -> str:
    new = edit.text
    if edit.start == edit.end:  # an empty value (`key:`): keep a space after the colon
        new = " " + new
    rest = text[edit.end :]
    gap = re.match(r"[ \t]+(?=#)", rest)
    if gap and "\n" not in text[edit.start : edit.end]:
        # The file's own rule, so that undoing a profile restores every byte: a trailing comment sits at the
        # common column, or two spaces after a value that reaches it.
        end_column = edit.start - (text.rfind("\n", 0, edit.start) + 1) + len(new)
        rest = " " * max(2, comment_column - end_column) + rest[gap.end() :]
    return text[: edit.start] + new + rest


def _merged(params: Any, overlay: Any) -> Any:
    if not isinstance(overlay, dict):
        return overlay
    return {**params, **{k: _merged(params[k], v) for k, v in overlay.items()}}


def profile_names(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "profiles").glob("*.yaml"))


def apply_profile(root: Path, name: str) -> list[str]:
    path = root / "profiles" / f"{name}.yaml"
    if not path.is_file():
        raise ParamsError(f"unknown profile {name!r}; profiles are: {', '.join(profile_names(root))}")
    params_path = root / "params.yaml"
    source, overlay_source = params_path.read_text(), path.read_text()
    params, overlay = _compose(source, "params.yaml"), _compose(overlay_source, f"profiles/{name}.yaml")
    changed: list[str] = []
    text, column = source, _comment_column(source)
    edits = _edits(params, overlay, overlay_source, "", changed)
    for edit in sorted(edits, key=lambda e: e.start, reverse=True):  # from the end: earlier spans stay valid
        text = _splice(text, edit, column)
    result = yaml.safe_load(text)
    # A safety net for layouts the in-place edit does not foresee: never write a file that means otherwise.
    if result != _merged(_construct(params), _construct(overlay)):
        raise ParamsError(f"profile {name}: params.yaml's layout defeats the in-place edit; nothing written")
    parse_params(result, f"params.yaml with profile {name}")
    params_path.write_text(text)
    return changed
