"""Audio embedders: the offline default on synthetic music, and ClapEmbedder's loading and plumbing."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from presto.errors import InputError
from presto.eval.embedders import AudioEmbedder, ClapEmbedder, CrepeSpectralEmbedder
from presto.eval.metrics import frechet_distance

SR = 16_000

# Harmonic amplitudes of three synthetic instruments.
TIMBRES = {
    "bright": 1.0 / np.arange(1, 16),  # sawtooth-like: every harmonic, slowly falling
    "hollow": np.where(np.arange(1, 16) % 2 == 1, 1.0 / np.arange(1, 16), 0.0),  # clarinet-like: odd only
    "mellow": np.array([1.0, 0.15]),  # nearly a sine
}


def melody(seed: int, timbre: str, seconds: float = 1.0, sr: int = SR, note_seconds: float = 0.25) -> np.ndarray:
    """A random melody in C major (MIDI 55-79) of plucked notes: harmonics above 7 kHz are left out so that
    the same melody can be written at any sample rate >= 16 kHz."""
    rng = np.random.default_rng(seed)
    scale = np.array([m for m in range(55, 80) if m % 12 in (0, 2, 4, 5, 7, 9, 11)])
    n = int(round(seconds * sr))
    note_len = int(round(note_seconds * sr))
    t = np.arange(note_len) / sr
    out = np.zeros(n)
    for start in range(0, n, note_len):
        f0 = 440.0 * 2 ** ((rng.choice(scale) - 69) / 12)
        note = sum(a * np.sin(2 * np.pi * f0 * h * t) for h, a in enumerate(TIMBRES[timbre], 1) if f0 * h < 7000)
        note = note * np.exp(-t / 0.08) * 0.3
        out[start:start + note_len] = note[: n - start]
    return out.astype(np.float32)


def drums(seed: int, seconds: float = 1.0) -> np.ndarray:
    """Noise bursts on a 120 bpm grid: rhythm and no pitch."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    out = np.zeros(n)
    burst = rng.normal(size=int(0.05 * SR)) * np.exp(-np.arange(int(0.05 * SR)) / (0.01 * SR))
    for start in range(0, n - len(burst), int(0.5 * SR)):
        out[start:start + len(burst)] += burst
    return (0.3 * out).astype(np.float32)


@pytest.fixture(scope="module")
def embedder():
    # One thread: on a shared 2-core machine torch's second thread mostly spins waiting for a core
    # (measured 2-3x slower wall time). Restored afterwards for the other test modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield CrepeSpectralEmbedder()
    torch.set_num_threads(threads)


def test_shape_dtype_and_protocol(embedder):
    audio = np.stack([melody(0, "bright"), melody(1, "mellow"), drums(2)])
    emb = embedder.embed(audio, SR)
    assert isinstance(embedder, AudioEmbedder)
    assert emb.shape == (3, embedder.dim) == (3, 190)
    assert emb.dtype == np.float64 and np.isfinite(emb).all()


def test_deterministic_and_independent_of_batch(embedder):
    audio = np.stack([melody(3, "bright"), drums(4)])
    first = embedder.embed(audio, SR)
    np.testing.assert_array_equal(first, embedder.embed(audio, SR))
    np.testing.assert_array_equal(first[:1], CrepeSpectralEmbedder().embed(audio[:1], SR))
    # A clip's embedding does not depend on what else is in the batch.
    np.testing.assert_allclose(embedder.embed(audio[1:], SR)[0], first[1], rtol=1e-6, atol=1e-9)


def test_different_music_gives_different_embeddings_and_loudness_does_not(embedder):
    clips = np.stack([melody(5, "bright"), melody(5, "mellow"), melody(6, "bright"), drums(7)])
    emb = embedder.embed(clips, SR)
    between = [np.linalg.norm(emb[i] - emb[j]) for i in range(4) for j in range(i + 1, 4)]
    # Same audio 26 dB quieter and 6 dB louder: the clip is RMS-normalised first.
    for gain in (0.05, 2.0):
        louder = embedder.embed(clips[:2] * gain, SR)
        np.testing.assert_allclose(louder, emb[:2], atol=1e-3)
        assert np.linalg.norm(louder - emb[:2], axis=1).max() < 1e-3 * min(between)
    assert min(between) > 1.0


def test_sample_rate_is_handled_by_resampling(embedder):
    at_16k = embedder.embed(melody(8, "hollow")[None], SR)
    at_44k = embedder.embed(melody(8, "hollow", sr=44_100)[None], 44_100)
    other = embedder.embed(melody(8, "bright")[None], SR)
    assert np.linalg.norm(at_44k - at_16k) < 0.1 * np.linalg.norm(other - at_16k)


def test_fad_separates_timbres_more_than_halves_of_one_set(embedder):
    hollow = embedder.embed(np.stack([melody(100 + i, "hollow") for i in range(10)]), SR)
    mellow = embedder.embed(np.stack([melody(200 + i, "mellow") for i in range(5)]), SR)
    within = frechet_distance(hollow[:5], hollow[5:])
    between = frechet_distance(hollow[:5], mellow)
    assert between > 3 * within


def test_silence_is_embedded_without_nan(embedder):
    emb = embedder.embed(np.zeros((1, SR), dtype=np.float32), SR)
    assert np.isfinite(emb).all()


@pytest.mark.parametrize(
    "audio, sr, match",
    [
        (np.zeros(SR, dtype=np.float32), SR, r"shape \[N, samples\]"),
        (np.zeros((1, SR), dtype=np.int16), SR, "float"),
        (np.full((1, SR), np.nan, dtype=np.float32), SR, "NaN"),
        (np.zeros((1, 100), dtype=np.float32), SR, "shorter than"),
        (np.zeros((1, SR), dtype=np.float32), 0, "sample rate"),
    ],
)
def test_bad_audio_is_rejected(embedder, audio, sr, match):
    with pytest.raises(ValueError, match=match):
        embedder.embed(audio, sr)


# ---------------------------------------------------------------------------------------------------------
# ClapEmbedder: laion_clap is optional and not installed here, so its loading is checked against a fake.


def test_clap_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "clap.pt"
    with pytest.raises(InputError, match="clap.pt.*file not found"):
        ClapEmbedder(missing, audio_model="HTSAT-base", enable_fusion=False)


def test_clap_missing_package_names_it(tmp_path, monkeypatch):
    checkpoint = tmp_path / "clap.pt"
    checkpoint.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "laion_clap", None)  # makes `import laion_clap` fail
    with pytest.raises(InputError, match="'laion_clap' package is not installed"):
        ClapEmbedder(checkpoint, audio_model="HTSAT-base", enable_fusion=False)


class _FakeClapModule:
    """The slice of laion_clap.CLAP_Module that ClapEmbedder uses. Audio embedding = [seconds at 48 kHz,
    rms, 0, 0] through the loaded weight, so the test sees what rate and which clips arrived."""

    def __init__(self, enable_fusion, device, amodel):
        self.model = torch.nn.Module()
        self.model.proj = torch.nn.Linear(4, 4, bias=False)
        self.model_cfg = {"embed_dim": 4}
        self.audio_batches = []

    def get_audio_embedding_from_data(self, x, use_tensor):
        assert isinstance(x, np.ndarray) and x.dtype == np.float32 and not use_tensor
        self.audio_batches.append(len(x))
        feats = np.stack([[len(c) / 48_000, np.sqrt(np.mean(c**2)), 0.0, 0.0] for c in x]).astype(np.float32)
        return feats @ self.model.proj.weight.detach().numpy().T

    def get_text_embedding(self, x):
        assert len(x) >= 2, "laion_clap loses the batch axis of a single prompt"
        return np.stack([[len(t), 1.0, 0.0, 0.0] for t in x]).astype(np.float32)


@pytest.fixture
def fake_laion_clap(monkeypatch):
    monkeypatch.setitem(sys.modules, "laion_clap", types.SimpleNamespace(CLAP_Module=_FakeClapModule))


def test_clap_loads_state_dict_and_embeds(tmp_path, fake_laion_clap):
    weight = torch.eye(4) * 2
    checkpoint = tmp_path / "music_clap.pt"
    # LAION checkpoints wrap a DataParallel state dict and carry a position_ids buffer.
    torch.save({"epoch": 15, "state_dict": {"module.proj.weight": weight,
                                            "module.text_branch.embeddings.position_ids": torch.arange(4)}},
               checkpoint)
    clap = ClapEmbedder(checkpoint, audio_model="HTSAT-base", enable_fusion=False)
    assert isinstance(clap, AudioEmbedder)
    assert clap.dim == 4 and clap.name == "laion-clap:music_clap.pt"

    audio = np.full((20, SR), 0.5, dtype=np.float32)
    audio[3] *= 0.5
    emb = clap.embed(audio, SR)
    assert emb.shape == (20, 4) and emb.dtype == np.float64
    assert clap._clap.audio_batches == [16, 4]
    np.testing.assert_allclose(emb[:, 0], 2 * 1.0, rtol=1e-6)  # 1 s arrived as 48,000 samples, weight 2
    np.testing.assert_allclose(emb[[0, 3], 1], [2 * 0.5, 2 * 0.25], rtol=1e-3)

    text = clap.text_embed(["a calm piano piece"])
    np.testing.assert_array_equal(text, [[18.0, 1.0, 0.0, 0.0]])
    assert clap.text_embed(["a", "bb", "ccc"])[:, 0].tolist() == [1.0, 2.0, 3.0]


def test_clap_reads_safetensors_and_rejects_a_mismatched_checkpoint(tmp_path, fake_laion_clap):
    good = tmp_path / "clap.safetensors"
    save_file({"proj.weight": torch.eye(4)}, good)
    assert ClapEmbedder(good, audio_model="HTSAT-tiny", enable_fusion=False).dim == 4

    bad = tmp_path / "other.safetensors"
    save_file({"proj.weight": torch.eye(4), "extra.weight": torch.ones(2)}, bad)
    with pytest.raises(InputError, match="other.safetensors.*does not fit audio_model='HTSAT-tiny'"):
        ClapEmbedder(bad, audio_model="HTSAT-tiny", enable_fusion=False)
