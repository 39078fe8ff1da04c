"""The train_dit stage's inputs checks, and what its Ray Train tests share (test_train_faults.py,
test_stage_kill_resume.py): a synthetic encode output, a tiny DiT's params, a tracker and a local Ray."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from ray import cloudpickle

from flows.dispatch import ray_init
from presto.config import Params, load_params
from presto.data.latents import (
    LATENT_STATS,
    TEXT_ENCODER,
    LatentShardWriter,
    LatentStats,
    save_text_shard,
)
from presto.data.shards import MANIFEST, write_manifest
from presto.errors import InputError
from presto.models.checkpoint import save_model
from presto.models.vae import AudioVAE, VAEConfig
from presto.text.condition import TextCondition
from stages import train_dit as stage
from stages.base import StageContext

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
C, D, SR = 16, 384, 4000  # latent channels (= params' VAE), MiniLM's state size, sample rate
TINY_VAE = VAEConfig(channels=4, channel_multipliers=[1, 2, 2], strides=[4, 4, 4], latent_channels=C,
                     dilations=[1], kernel_size=3)  # hop 64: 62.5 frames/s
FRAMES = 24


class FileTracker:
    """A tracker that travels to Ray workers (pickled by value, see below) and appends to a JSONL file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def log_metrics(self, metrics, step=None):
        self._append({"metrics": {k: float(v) for k, v in metrics.items()}, "step": step})

    def log_artifact(self, path, subdir=None):
        path = Path(path)
        files = sorted(p.name for p in path.iterdir()) if path.is_dir() else [path.name]
        self._append({"artifact": subdir, "files": files})

    def log_text(self, text, name):
        self._append({"text": name})

    def set_tags(self, tags):
        self._append({"tags": tags})

    def records(self) -> list[dict]:
        return [json.loads(line) for line in Path(self.path).read_text().splitlines()]


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module


def make_encode_output(artifacts: Path) -> None:
    """What the encode stage writes, with latents that carry their caption (so there is something to learn),
    and a tiny VAE beside it."""
    encode = artifacts / "encode"
    encode.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    rows, captions = [], ["low organ drone", "bright piano arpeggio", "slow strings", "fast marimba"]
    tokens = torch.randn(len(captions), 5, D, generator=g)
    mask = torch.arange(5)[None, :] < torch.tensor([3, 5, 2, 4])[:, None]
    save_text_shard(encode / "text-00000.safetensors", TextCondition(tokens * mask[..., None], mask,
                                                                      torch.randn(len(captions), D, generator=g)))
    t = torch.arange(FRAMES, dtype=torch.float32)
    with LatentShardWriter(encode, "latents", 16) as writer:
        for i in range(24):
            k = i % len(captions)
            z = 0.5 * torch.sin(0.3 * (k + 1) * t[None, :] + torch.arange(C)[:, None] * 0.4)
            shard, index = writer.add(z.to(torch.float16))
            rows.append({"clip_id": f"clip-{i}", "split": "val" if i >= 20 else "train", "shard": shard,
                         "index": index, "frames": FRAMES, "captions": [captions[k]],
                         "caption_refs": [["text-00000.safetensors", k]]})
    write_manifest(encode / MANIFEST, rows)
    LatentStats(mean=[0.0] * C, std=[1.0] * C, sigma_data=0.5, hop_length=64, sample_rate=SR,
                frames_per_second=SR / 64, latent_channels=C).save(encode / LATENT_STATS)
    (encode / TEXT_ENCODER).write_text(json.dumps({"kind": "minilm", "path": None, "max_tokens": 16}))
    torch.manual_seed(0)
    save_model(AudioVAE(TINY_VAE), TINY_VAE, artifacts / "train_vae" / "model")


def tiny_params(**train_dit) -> Params:
    raw = load_params(REPO / "params.yaml").model_dump(mode="json")
    raw["train_dit"] |= {
        "model": {"latent_channels": C, "width": 32, "depth": 2, "heads": 2, "mlp_ratio": 2.0, "text_dim": D,
                  "budget_conditioning": False},
        "batch": 4, "crop_frames": 16, "log_every": 2, "ckpt_every": 2, "val_every": 4, "val_clips": 4,
        "val_sigmas": [0.1, 1.0], "sample_seconds": 0.25, "warmup_steps": 0, "workers": 1,
        "cpus_per_worker": 1, "max_failures": 0,
        "sample_recipe": raw["train_dit"]["sample_recipe"] | {"steps": 3},
    } | train_dit
    return Params.model_validate(raw)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray_init()  # the stages' own local Ray
    yield
    ray.shutdown()


def context(root: Path, params: Params, out: str, tracker: FileTracker) -> StageContext:
    return StageContext(name="train_dit", params=params, root=root, out_dir=root / out,
                        checkpoint_dir=root / "checkpoints" / "train_dit" / "fp", fingerprint="fp", tracker=tracker)


def test_inputs_that_do_not_fit_fail_before_training(tmp_path: Path):
    make_encode_output(tmp_path / "artifacts")
    encode, vae = tmp_path / "artifacts" / "encode", tmp_path / "artifacts" / "train_vae" / "model"
    p = tiny_params().train_dit
    stage.check_inputs(p, encode, vae, samples=1)
    with pytest.raises(InputError, match="text_dim"):
        stage.check_inputs(p.model_copy(update={"model": p.model.model_copy(update={"text_dim": 8})}), encode, vae, 0)
    with pytest.raises(InputError, match="latent channels, but latent_channels = 99 for train_dit's params"):
        stage.check_inputs(p.model_copy(update={"model": p.model.model_copy(update={"latent_channels": 99})}),
                           encode, vae, 0)
    stats = json.loads((encode / LATENT_STATS).read_text())
    (encode / LATENT_STATS).write_text(json.dumps(stats | {"sigma_data": 1.0}))
    with pytest.raises(InputError, match="sigma_data"):
        stage.check_inputs(p, encode, vae, 0)
    (encode / LATENT_STATS).write_text(json.dumps(stats))
    with pytest.raises(InputError, match="train_vae"):
        stage.check_inputs(p, encode, tmp_path / "nowhere", samples=1)
