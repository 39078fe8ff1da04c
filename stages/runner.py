"""Execute one stage body: fingerprint its inputs, give it a scratch folder, move the result into place.

`execute` runs inside a Ray worker. The out folder appears only when the stage succeeded (a temporary
folder renamed into place), so a crash never leaves a half-written `artifacts/<stage>`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from presto.config import Params, load_params, select
from stages.base import StageContext, Tracker
from stages.specs import SHARED_CODE, StageSpec, get

RUN_RECORDS = ".presto/runs"


def _tree_listing(path: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime) of every file: cheap, and changes whenever a file is rewritten."""
    if path.is_file():
        st = path.stat()
        return [(path.name, st.st_size, st.st_mtime_ns)]
    out = []
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            out.append((p.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns))
    return out


def _code_digest(root: Path, paths: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for rel in paths:
        p = root / rel
        files = [p] if p.is_file() else sorted(p.rglob("*.py")) if p.is_dir() else []
        for f in files:
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def resolve_template(text: str, params: Params) -> str:
    """dvc.yaml's `${section.key}` templating, for the deps that use it."""
    return re.sub(r"\$\{([^}]+)\}", lambda m: str(select(params, [m.group(1).strip()])[m.group(1).strip()]), text)


def fingerprint(spec: StageSpec, params: Params, root: Path) -> str:
    """A digest of everything the stage reads: its params, its code and its inputs.

    Same fingerprint means a checkpoint left by a crashed run of this stage may be resumed; any change
    (a param, the code, a rebuilt upstream out) starts fresh instead of resuming a stale run.
    """
    h = hashlib.sha256()
    h.update(json.dumps(select(params, spec.params), sort_keys=True, default=str).encode())
    h.update(_code_digest(root, spec.code + SHARED_CODE).encode())
    inputs = [root / "artifacts" / up for up in spec.upstream]
    inputs += [root / resolve_template(dep, params) for dep in spec.extra_deps]
    for path in inputs:
        h.update(str(path.relative_to(root) if path.is_relative_to(root) else path).encode())
        if path.exists():
            h.update(json.dumps(_tree_listing(path)).encode())
    return h.hexdigest()[:16]


def read_run_record(root: Path, stage: str) -> dict[str, Any] | None:
    path = root / RUN_RECORDS / f"{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, data: Any) -> None:
    """`data` as JSON at `path`, whole or not at all (written beside it, then renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def write_run_record(root: Path, stage: str, record: dict[str, Any]) -> None:
    write_json(root / RUN_RECORDS / f"{stage}.json", record)


def _check_metrics(stage: str, metrics: Any, prefix: str = "") -> dict[str, Any]:
    """Metrics are numbers (None for "not measured"), possibly nested one dict per level, e.g.
    {"base": {"32": {"fad": 1.2}}}; NaN/Inf become None so metrics.json stays valid JSON."""
    if not isinstance(metrics, dict):
        raise TypeError(f"stage {stage}: metrics{prefix} is {type(metrics).__name__}, expected a dict")
    clean: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            clean[str(k)] = _check_metrics(stage, v, f"{prefix}.{k}")
        elif v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            if v is not None:
                raise TypeError(f"stage {stage}: metric {prefix[1:] + '.' if prefix else ''}{k} = {v!r} "
                                "is not a number")
            clean[str(k)] = None
        else:
            clean[str(k)] = v if math.isfinite(v) else None
    return clean


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{"base": {"32": {"fad": 1.2}}} -> {"base.32.fad": 1.2}, dropping None (for MLflow)."""
    flat: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            flat.update(flatten_metrics(v, f"{prefix}{k}."))
        elif v is not None:
            flat[f"{prefix}{k}"] = float(v)
    return flat


def summary_step(metrics: dict[str, Any]) -> int:
    """The MLflow step of a stage's summary metrics: its last training step ("steps" or "iterations"), so that
    each curve ends with the final value rather than starting with it (a step-less metric lands at step 0)."""
    return int(metrics.get("steps", metrics.get("iterations", 0)))


def _move_into_place(tmp: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def execute(stage: str, root: str, tracker: Tracker, fp: str) -> dict[str, Any]:
    """Run stage `stage` of the project at `root`; return its metrics (also in metrics.json)."""
    spec = get(stage)
    root_path = Path(root)
    params = load_params(root_path / "params.yaml")
    module = importlib.import_module(spec.module)
    final = root_path / spec.out
    # A killed run (SIGKILL, OOM) never reached its cleanup; DVC runs one stage at a time per workspace.
    for stale in [*final.parent.glob(f".{final.name}.tmp-*"), *final.parent.glob(f".{final.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    checkpoints = root_path / "checkpoints" / stage
    ctx = StageContext(name=stage, params=params, root=root_path, out_dir=tmp,
                       checkpoint_dir=checkpoints / fp, fingerprint=fp, tracker=tracker)
    try:
        clean = _check_metrics(stage, module.run(ctx))
        (tmp / "metrics.json").write_text(json.dumps(clean, indent=2, sort_keys=True))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _move_into_place(tmp, final)
    # Checkpoints exist to resume a crashed run; a finished stage needs none (a forced rerun starts fresh).
    shutil.rmtree(checkpoints, ignore_errors=True)
    return clean
