"""The encode stage and the latent store: normalised statistics, exact chunked encoding, text embeddings equal
to a direct encode, valid references, and LatentDataset batches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from presto.config import load_params
from presto.data.latents import ChannelMoments, LatentDataset, LatentStats, collate_latents
from presto.data.shards import ShardWriter, read_manifest, write_manifest
from presto.errors import InputError
from presto.models.checkpoint import save_model
from presto.models.vae import AudioVAE, VAEConfig
from presto.text.encoder import TextEncoderConfig, load_text_encoder
from stages import encode as stage
from stages.base import StageContext
from recording_tracker import RecordingTracker

REPO = Path(__file__).resolve().parents[1]
SR = 16000
TINY_VAE = VAEConfig(channels=4, channel_multipliers=[2, 4, 8], strides=[2, 4, 4], latent_channels=8,
                     dilations=[1, 3], kernel_size=7)  # hop 32
SHORT, LONG = 2048, 4096  # samples: 64 and 128 latent frames
# (clip_id, split, samples, captions): shared captions are stored once.
CLIPS = [
    ("a", "train", SHORT, ["piano music", "slow piano in C major"]),
    ("b", "train", SHORT, ["piano music", "a waltz"]),
    ("c", "val", SHORT, ["organ"]),
    ("d", "train", SHORT, ["fast strings at 140 bpm", "strings"]),
    ("e", "test", SHORT, ["flute and clarinet duet"]),
    ("f", "train", LONG, ["a long clip for the second shard shape", "piano music"]),
    ("g", "train", LONG, ["brass"]),
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread


def direct_encode(vae: AudioVAE, audio: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole clip in one `encode`, extended by its mirror image (encode.mirror_edges) by hand."""
    margin = vae.context_frames * vae.hop_length
    padded = torch.from_numpy(np.pad(audio, margin, mode="reflect"))[None, None]
    mean, std = vae.encode(padded)
    frames = len(audio) // vae.hop_length
    ctx = vae.context_frames
    return mean[0, :, ctx:ctx + frames], std[0, :, ctx:ctx + frames]


def clip_audio(k: int, samples: int) -> np.ndarray:
    t = np.arange(samples) / SR
    return (0.2 * np.sin(2 * np.pi * 110 * (k + 1) * t) * np.exp(-2 * t)
            + 0.05 * np.sin(2 * np.pi * 37 * t * (k + 2))).astype(np.float32)


def make_upstream(root: Path, *, vae_rate: int = SR, drop_caption: str | None = None) -> AudioVAE:
    artifacts = root / "artifacts"
    rows = []
    with ShardWriter(artifacts / "prepare", "short", 3) as short, ShardWriter(artifacts / "prepare", "long", 3) as long:
        for k, (clip_id, split, samples, _) in enumerate(CLIPS):
            writer = short if samples == SHORT else long
            shard, index = writer.add(clip_audio(k, samples))
            rows.append({"clip_id": clip_id, "track_id": clip_id, "split": split, "shard": f"prepare/{shard}",
                         "index": index, "seconds": samples / SR, "sample_rate": SR, "key": "C major",
                         "bpm": 100.0 + k, "stereo_shard": "prepare/stereo-00000.safetensors", "stereo_index": k})
    (artifacts / "augment").mkdir(parents=True)
    write_manifest(artifacts / "augment" / "manifest.jsonl", rows)
    (artifacts / "caption").mkdir(parents=True)
    write_manifest(artifacts / "caption" / "captions.jsonl",
                   [{"clip_id": c, "split": s, "captions": caps, "analysis": {"tempo_bpm": 120.0}}
                    for c, s, _, caps in CLIPS if c != drop_caption])
    torch.manual_seed(0)
    vae = AudioVAE(TINY_VAE).eval()
    save_model(vae, TINY_VAE, artifacts / "train_vae" / "model")
    (artifacts / "train_vae" / "vae.json").write_text(json.dumps({"sample_rate": vae_rate, "hop_length": 32}))
    return vae


def tiny_params():
    params = load_params(REPO / "params.yaml")
    p = params.encode.model_copy(update=dict(batch=3, chunk_seconds=16 * 32 / SR, shard_clips=4, text_batch=2,
                                             shard_captions=3))
    return params.model_copy(update={"encode": p})


def context(root: Path) -> StageContext:
    return StageContext(name="encode", params=tiny_params(), root=root, out_dir=root / "out",
                        checkpoint_dir=root / "ckpt", fingerprint="test", tracker=RecordingTracker())


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode")
    vae = make_upstream(root)
    ctx = context(root)
    torch.set_num_threads(1)
    metrics = stage.run(ctx)
    return ctx, metrics, vae


def stored_latents(out: Path, row: dict) -> torch.Tensor:
    return load_file(out / row["shard"])["latents"][row["index"]].float()


def test_train_latents_have_mean_zero_and_std_sigma_data(encoded):
    ctx, metrics, _ = encoded
    rows = read_manifest(ctx.out_dir / "manifest.jsonl")
    train = [stored_latents(ctx.out_dir, r) for r in rows if r["split"] == "train"]
    z = torch.cat(train, dim=-1)  # [C, all train frames]
    assert z.mean(dim=1).abs().max() < 2e-3
    assert z.std(dim=1, correction=0) == pytest.approx(torch.full((8,), 0.5), abs=2e-3)
    stats = json.loads((ctx.out_dir / "latent_stats.json").read_text())
    assert stats["sigma_data"] == 0.5 and stats["hop_length"] == 32 and stats["latent_channels"] == 8
    assert stats["frames_per_second"] == SR / 32 and stats["sample_rate"] == SR
    assert metrics["clips"] == 7 and metrics["clips_train"] == 5 and metrics["latent_channels"] == 8


def test_latents_equal_a_direct_whole_clip_encode(encoded):
    """Chunked encoding (16-frame chunks of 64- and 128-frame clips) is exact, and z_n is the formula."""
    ctx, _, vae = encoded
    stats = LatentStats.load(ctx.out_dir / "latent_stats.json")
    mean, std = torch.tensor(stats.mean)[:, None], torch.tensor(stats.std)[:, None]
    rows = {r["clip_id"]: r for r in read_manifest(ctx.out_dir / "manifest.jsonl")}
    for k, (clip_id, _, samples, _) in enumerate(CLIPS):
        with torch.no_grad():
            z = direct_encode(vae, clip_audio(k, samples))[0]
        expected = (z - mean) / std * 0.5
        assert rows[clip_id]["frames"] == samples // 32
        torch.testing.assert_close(stored_latents(ctx.out_dir, rows[clip_id]), expected, atol=3e-3, rtol=2e-3)
        torch.testing.assert_close(stats.denormalise(expected), z, atol=1e-5, rtol=1e-5)


def test_signal_to_noise_of_the_latents(encoded):
    """snr_c = spread of channel c's posterior mean over the train latents / its mean posterior std."""
    _, metrics, vae = encoded
    means, stds = [], []
    with torch.no_grad():
        for k, (_, split, samples, _) in enumerate(CLIPS):
            if split == "train":
                m, s = direct_encode(vae, clip_audio(k, samples))
                means.append(m)
                stds.append(s)
    snr = torch.cat(means, -1).std(-1, correction=0) / torch.cat(stds, -1).mean(-1)
    assert metrics["latent_snr_min"] == pytest.approx(snr.min().item(), rel=1e-4)
    assert metrics["latent_snr_median"] == pytest.approx(snr.median().item(), rel=1e-4)
    assert metrics["informative_channels"] == int((snr > 1).sum())


def test_manifest_rows_carry_refs_and_metadata(encoded):
    ctx, metrics, _ = encoded
    rows = read_manifest(ctx.out_dir / "manifest.jsonl")
    assert [r["clip_id"] for r in rows] == [c[0] for c in CLIPS]
    shards = {}
    for row, (clip_id, split, _, captions) in zip(rows, CLIPS):
        assert row["split"] == split and row["captions"] == captions
        assert row["key"] == "C major" and row["analysis"] == {"tempo_bpm": 120.0}
        assert row["audio_shard"].startswith("prepare/") and "stereo_shard" not in row
        assert len(row["caption_refs"]) == len(captions)
        latents = shards.setdefault(row["shard"], load_file(ctx.out_dir / row["shard"])["latents"])
        assert latents.dtype == torch.float16 and row["index"] < len(latents)
        for shard, index in row["caption_refs"]:
            text = load_file(ctx.out_dir / shard)
            assert index < len(text["mask"])
    # A shard holds clips of one length: the two long clips start their own shard.
    assert {tuple(v.shape[1:]) for v in shards.values()} == {(8, 64), (8, 128)}
    # Shared captions are stored once.
    by_caption = {c: tuple(ref) for r in rows for c, ref in zip(r["captions"], r["caption_refs"])}
    assert len(set(by_caption.values())) == len(by_caption) == metrics["captions_unique"] == 9
    assert json.loads((ctx.out_dir / "text_encoder.json").read_text()) == {"kind": "minilm", "path": None,
                                                                           "max_tokens": 64}


def test_text_embeddings_match_a_direct_encode(encoded):
    ctx, _, _ = encoded
    cfg = TextEncoderConfig.model_validate_json((ctx.out_dir / "text_encoder.json").read_text())
    encoder = load_text_encoder(cfg)
    rows = read_manifest(ctx.out_dir / "manifest.jsonl")
    dataset = LatentDataset(ctx.out_dir, split=None)
    for caption, (shard, index) in [(c, ref) for r in rows for c, ref in zip(r["captions"], r["caption_refs"])]:
        direct = encoder.encode([caption])
        stored = dataset.text(shard, index)
        assert stored.mask.all() and stored.tokens.shape == direct.tokens.shape
        torch.testing.assert_close(stored.tokens, direct.tokens, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(stored.pooled, direct.pooled, atol=1e-3, rtol=1e-3)


def test_latent_dataset_filters_and_batches(encoded):
    ctx, _, _ = encoded
    train = LatentDataset(ctx.out_dir, split="train", caption="first")
    assert len(train) == 5 and len(LatentDataset(ctx.out_dir, split="val")) == 1
    z, cond = train[0]
    assert z.shape == (8, 64) and z.dtype == torch.float32
    assert cond.tokens.shape[0] == 1 and cond.mask.all() and cond.pooled.shape == (1, 384)
    first = train.text(*read_manifest(ctx.out_dir / "manifest.jsonl")[0]["caption_refs"][0])
    torch.testing.assert_close(cond.tokens, first.tokens)

    short = torch.utils.data.Subset(train, [0, 1, 2])  # a, b, d: equal lengths
    z, cond = next(iter(DataLoader(short, batch_size=3, collate_fn=collate_latents)))
    assert z.shape == (3, 8, 64)
    lengths = [train[i][1].tokens.shape[1] for i in range(3)]
    assert cond.tokens.shape == (3, max(lengths), 384)
    assert cond.mask.sum(1).tolist() == lengths
    for b, n in enumerate(lengths):
        assert (cond.tokens[b, n:] == 0).all()
    with pytest.raises(ValueError, match="share a shape"):
        collate_latents([train[0], train[3]])


def test_random_captions_cover_all_of_a_clips_captions(encoded):
    ctx, _, _ = encoded
    train = LatentDataset(ctx.out_dir, split="train")
    torch.manual_seed(0)
    seen = {tuple(train[0][1].pooled[0, :4].tolist()) for _ in range(20)}
    assert len(seen) == 2  # clip a has two captions


def test_channel_moments_match_torch():
    torch.manual_seed(0)
    parts = [torch.randn(3, 4, 10) * torch.tensor([1.0, 2.0, 0.5, 3.0])[:, None] + 5 for _ in range(4)]
    moments = ChannelMoments(4)
    for part in parts:
        moments.add(part)
    mean, std = moments.mean_std()
    everything = torch.cat(parts).transpose(0, 1).reshape(4, -1).double()
    torch.testing.assert_close(mean, everything.mean(1))
    torch.testing.assert_close(std, everything.std(1, correction=0))
    constant = ChannelMoments(1)
    constant.add(torch.full((2, 1, 5), 3.0))
    assert constant.mean_std()[1].item() > 0  # floored: a constant channel never divides by zero
    with pytest.raises(ValueError, match="nothing to measure"):
        ChannelMoments(2).mean_std()


def test_stats_normalise_round_trip():
    stats = LatentStats(mean=[1.0, -2.0], std=[2.0, 0.5], sigma_data=0.5, hop_length=4, sample_rate=8,
                        frames_per_second=2.0, latent_channels=2)
    z = torch.tensor([[[3.0, 1.0], [-2.0, -1.5]]])
    z_n = stats.normalise(z)
    torch.testing.assert_close(z_n, torch.tensor([[[0.5, 0.0], [0.0, 0.5]]]))
    torch.testing.assert_close(stats.denormalise(z_n), z)


def test_stage_names_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="run the augment stage"):
        stage.run(context(tmp_path))
    make_upstream(tmp_path, drop_caption="d")
    with pytest.raises(InputError, match="clip d has no captions"):
        stage.run(context(tmp_path))


def test_stage_refuses_a_vae_of_another_rate(tmp_path):
    make_upstream(tmp_path, vae_rate=44100)
    with pytest.raises(InputError, match="trained at 44100 Hz"):
        stage.run(context(tmp_path))


def test_metrics_are_finite(encoded):
    _, metrics, _ = encoded
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["latent_shards"] == 3 and metrics["text_shards"] == 3  # 4+1 short and 2 long clips; 9 captions by 3
