"""What a stage body sees: its params, a scratch out folder, a checkpoint folder, a tracker.

A stage module defines `run(ctx: StageContext) -> dict[str, float]`: it writes everything into
`ctx.out_dir` (a temporary folder renamed into place by the runner only on success), reports progress
through `ctx.tracker`, and returns flat metrics that become `metrics.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from presto.config import Params


class Tracker(Protocol):
    """Where a stage reports to (MLflow in practice). Stages never import the tracking backend."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None: ...

    def log_text(self, text: str, name: str) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_model(self, name: str, files: dict[str, Path], config: dict[str, Any], alias: str | None) -> None:
        """Register a servable model `presto-<name>` from a bundle ({model, vae, encode} folders, see
        stages/evaluate.py); `config` ({recipe, seconds, ...}) holds its default settings."""
        ...


@dataclass
class StageContext:
    name: str
    params: Params
    root: Path  # project root; relative params paths resolve against it
    out_dir: Path  # temporary out folder; becomes artifacts/<name> on success
    checkpoint_dir: Path  # outside DVC outs, keyed by the stage's input fingerprint: survives crashes
    fingerprint: str
    tracker: Tracker

    def upstream(self, stage: str) -> Path:
        """The finished out folder of an upstream stage."""
        return self.root / "artifacts" / stage

    def resolve(self, path: str | Path) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.root / p

    @property
    def resources(self) -> Any:
        return getattr(self.params, self.name).resources


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], *, num_cpus: float = 1.0,
                 desc: str = "") -> list[Any]:
    """Map `fn` over `items` on Ray workers when Ray is up (always, under the runner), else in-process.

    Results keep the order of `items`. A progress bar with rate and ETA shows completed items.
    `fn` must be importable (a module-level function) so Ray can ship it.
    """
    import ray
    from tqdm import tqdm

    if not ray.is_initialized():
        return [fn(x) for x in tqdm(items, desc=desc, mininterval=5)]
    task = ray.remote(num_cpus=num_cpus)(fn)
    refs = [task.remote(x) for x in items]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    with tqdm(total=len(refs), desc=desc, mininterval=5) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                results[index[ref]] = ray.get(ref)
                bar.update(1)
    return results
