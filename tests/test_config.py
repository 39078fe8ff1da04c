"""params.yaml: typed, validated at load, one clear line per mistake; profiles apply in one step."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.profiles import apply_profile, profile_names
from presto.config import load_params, parse_params, select
from presto.errors import ParamsError

REPO = Path(__file__).resolve().parents[1]


def raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def error_of(data: dict) -> str:
    with pytest.raises(ParamsError) as info:
        parse_params(data)
    message = str(info.value)
    assert "\n" not in message, "the message must be one line"
    return message


def test_defaults_load(repo: Path) -> None:
    params = load_params(repo / "params.yaml")
    assert params.shared.profile == "demo"
    assert params.prepare.val_fraction + params.prepare.test_fraction < 1


def test_unknown_key_is_named() -> None:
    data = raw()
    data["prepare"]["hop_secs"] = 2.0
    msg = error_of(data)
    assert "prepare.hop_secs" in msg and "unknown key" in msg


def test_wrong_type_names_key_and_value() -> None:
    data = raw()
    data["prepare"]["shard_clips"] = "many"
    msg = error_of(data)
    assert "prepare.shard_clips" in msg and "'many'" in msg and "integer" in msg


@pytest.mark.parametrize(
    ("section", "key", "value", "allowed"),
    [
        ("prepare", "shard_clips", 0, "greater than 0"),
        ("shared", "clip_seconds", -4.0, "greater than 0"),
        ("prepare", "val_fraction", 1.5, "less than or equal to 1"),
        ("shared", "sample_rate", 100, "greater than or equal to 8000"),
        ("demo_corpus", "tempo_range", [150, 60], "low <= high"),
        ("augment", "stretch_rates", [1.0], "must not hold"),
    ],
)
def test_impossible_values(section: str, key: str, value: object, allowed: str) -> None:
    data = raw()
    data[section][key] = value
    msg = error_of(data)
    assert allowed in msg
    assert section in msg


def test_nested_sections_give_one_line_too() -> None:
    data = raw()
    data["train_dit"]["model"].update(width=30, heads=4)
    msg = error_of(data)
    assert "train_dit.model" in msg and "width 30 must be a multiple of heads 4" in msg
    data = raw()
    data["train_dit"]["sample_recipe"]["sampler"] = "ddim"
    msg = error_of(data)
    assert "train_dit.sample_recipe" in msg and "sampler 'ddim' is not one of" in msg and "'euler'" in msg


@pytest.mark.parametrize(("path", "value", "said"), [
    ("train_dit.sigma_min", 100.0, "sigma_min = 100.0 must be < sigma_max = 80.0"),
    ("train_dit.sample_recipe.sigma_max", 0.001, "sigma_min = 0.002 must be < sigma_max = 0.001"),
    ("presto_s.method.sigmas.inf.sigma_min", 90.0, "sigma_min = 90.0 must be < sigma_max = 80.0"),
    ("presto_s.method.sigmas.train.sigma_max", 0.002, "sigma_min = 0.002 must be < sigma_max = 0.002"),
    ("train_vae.model.kernel_size", 4, "kernel_size = 4 must be odd"),
    ("train_stereo.model.channel_multipliers", [1], "channel_multipliers has 1 entries and strides"),
])
def test_nested_ranges_and_conv_stages_are_checked(path: str, value: object, said: str) -> None:
    data = raw()
    *parents, key = path.split(".")
    section = data
    for name in parents:
        section = section[name]
    section[key] = value
    msg = error_of(data)
    assert said in msg and parents[0] in msg


def test_validating_params_imports_no_torch(repo: Path) -> None:
    # Every stage process validates params first thing and needs no torch itself (its compute runs in Ray
    # workers): importing torch there would cost seconds of CPU per stage.
    code = ("import sys; from presto.config import load_params; "
            f"load_params({str(repo / 'params.yaml')!r}); print('torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False", "loading params.yaml imported torch"


def test_missing_key() -> None:
    data = raw()
    del data["caption"]["per_clip"]
    assert "caption.per_clip" in error_of(data)


def test_missing_corpus_folder(tmp_path: Path) -> None:
    data = raw()
    data["prepare"]["corpus_dir"] = "no/such/folder"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match=r"prepare.corpus_dir = 'no/such/folder': folder not found"):
        load_params(tmp_path / "params.yaml")


def test_missing_metadata_in_existing_corpus(tmp_path: Path) -> None:
    data = raw()
    (tmp_path / "corpus").mkdir()
    data["prepare"].update(corpus_dir="corpus", metadata="meta.csv")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match="prepare.metadata"):
        load_params(tmp_path / "params.yaml")


def test_yaml_scientific_notation_reads_as_number() -> None:
    data = raw()
    data["prepare"]["silence_dbfs"] = "-4.5e1"  # what PyYAML gives for an exponent without a dot
    assert parse_params(data).prepare.silence_dbfs == -45.0


def test_select_flattens_with_dotted_names(repo: Path) -> None:
    params = load_params(repo / "params.yaml")
    flat = select(params, ["shared.seed", "augment"])
    assert flat["shared.seed"] == params.shared.seed
    assert flat["augment.resources.cpus"] == params.augment.resources.cpus
    assert "prepare.hop_seconds" not in flat


def _project_copy(tmp_path: Path) -> Path:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    return tmp_path


@pytest.mark.parametrize("name", ["science", "gpu", "paper"])
def test_profiles_apply_validate_and_undo(tmp_path: Path, name: str) -> None:
    root = _project_copy(tmp_path)
    before = (root / "params.yaml").read_text()
    changed = apply_profile(root, name)
    assert changed and "shared.profile" in changed
    after = load_params(root / "params.yaml")
    assert after.shared.profile == name
    # Only the changed values' lines differ, each keeping its comment: `git diff params.yaml` is the profile.
    old_lines, new_lines = before.splitlines(), (root / "params.yaml").read_text().splitlines()
    assert len(new_lines) == len(old_lines)
    leaves = {key.rsplit(".", 1)[-1] for key in changed}
    for old, new in zip(old_lines, new_lines, strict=True):
        if old != new:
            assert new.split(":")[0].strip() in leaves or "{" in new, new
            assert ("#" in old) == ("#" in new) and old.split("#")[1:] == new.split("#")[1:], new
    apply_profile(root, "demo")
    assert (root / "params.yaml").read_text() == before, "applying demo restores params.yaml byte for byte"


def test_profile_changes_only_its_values_bytewise(tmp_path: Path) -> None:
    root = _project_copy(tmp_path)
    before = (root / "params.yaml").read_text()
    # An empty value means null too; a profile must fill it as well as it replaces `null`.
    marker = "  seed: null                # the fine-tune's"
    assert marker in before
    (root / "params.yaml").write_text(before.replace(marker, "  seed:                     # the fine-tune's"))
    (root / "profiles" / "t.yaml").write_text(
        "shared: {profile: science}\n"
        "layer_dropping: {seed: 3}\n"
        "train_dit: {model: {depth: 12}, lr: 2.0e-5, sample_recipe: {steps: 8}}\n"
        "evaluate:\n  seeds:\n    - 0\n    - 1\n  best_of_n: {latency_budget_ms: 250.0}\n"
    )
    assert apply_profile(root, "t") == [
        "shared.profile",
        "layer_dropping.seed",
        "train_dit.model.depth",
        "train_dit.lr",
        "train_dit.sample_recipe.steps",
        "evaluate.seeds",
        "evaluate.best_of_n.latency_budget_ms",
    ]
    text = (root / "params.yaml").read_text()
    assert "  profile: science\n" in text
    assert "  seed: 3                   # the fine-tune's" in text  # comments stay in their column
    assert "    depth: 12               # blocks" in text
    assert "  lr: 2.0e-5                # AdamW" in text  # written as the profile writes it
    assert "  sample_recipe: {sampler: dpmpp_2m_sde, steps: 8, rho: 7.0," in text  # a flow map's wrapping kept
    assert "  seeds: [0, 1]             # one clip per prompt and seed" in text  # block list put on the line
    assert "    latency_budget_ms: 250.0  # null:" in text  # two spaces after a value that reaches the column
    assert len(text.splitlines()) == len(before.splitlines())
    data = load_params(root / "params.yaml")
    assert data.train_dit.model.depth == 12 and data.evaluate.seeds == [0, 1] and data.layer_dropping.seed == 3
    assert data.train_dit.sample_recipe.steps == 8 and data.evaluate.best_of_n.latency_budget_ms == 250.0


def test_profile_mapping_onto_a_value_is_refused(tmp_path: Path) -> None:
    root = _project_copy(tmp_path)
    original = (root / "params.yaml").read_text()
    (root / "profiles" / "bad.yaml").write_text("shared: {seed: {value: 1}}\n")
    with pytest.raises(ParamsError, match="shared.seed"):
        apply_profile(root, "bad")
    (root / "profiles" / "broken.yaml").write_text("shared: {seed: [1\n")
    with pytest.raises(ParamsError, match="profiles/broken.yaml is not valid YAML"):
        apply_profile(root, "broken")
    assert (root / "params.yaml").read_text() == original


def test_paper_profile_has_paper_audio(tmp_path: Path) -> None:
    root = _project_copy(tmp_path)
    apply_profile(root, "paper")
    params = load_params(root / "params.yaml")
    assert params.shared.sample_rate == 44100 and params.shared.clip_seconds == 32.0


def test_demo_profile_covers_every_overridden_key() -> None:
    def keys(d: dict, prefix: str = "") -> set[str]:
        out: set[str] = set()
        for k, v in d.items():
            out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
        return out

    demo = keys(yaml.safe_load((REPO / "profiles" / "demo.yaml").read_text()))
    for name in profile_names(REPO):
        other = keys(yaml.safe_load((REPO / "profiles" / f"{name}.yaml").read_text()))
        assert other <= demo, f"profiles/{name}.yaml changes keys demo.yaml cannot undo: {other - demo}"


def test_unknown_profile(tmp_path: Path) -> None:
    root = _project_copy(tmp_path)
    with pytest.raises(ParamsError, match="unknown profile 'fast'"):
        apply_profile(root, "fast")


def test_profile_with_unknown_key_is_refused(tmp_path: Path) -> None:
    root = _project_copy(tmp_path)
    (root / "profiles" / "bad.yaml").write_text("prepare: {hop_secs: 1.0}\n")
    original = (root / "params.yaml").read_text()
    with pytest.raises(ParamsError, match="prepare.hop_secs"):
        apply_profile(root, "bad")
    assert (root / "params.yaml").read_text() == original


def test_demo_values_match_params_yaml() -> None:
    """Applying demo to the shipped params.yaml changes nothing: the two agree."""
    demo = yaml.safe_load((REPO / "profiles" / "demo.yaml").read_text())
    params = copy.deepcopy(raw())

    def check(overlay: dict, target: dict, prefix: str) -> None:
        for k, v in overlay.items():
            if isinstance(v, dict):
                check(v, target[k], f"{prefix}{k}.")
            else:
                assert target[k] == v, f"profiles/demo.yaml {prefix}{k}={v} but params.yaml has {target[k]}"

    check(demo, params, "")


def test_select_gives_json_data_for_nested_lists(repo: Path) -> None:
    import json

    params = load_params(repo / "params.yaml")
    keys = [name for name in type(params).model_fields]
    json.dumps(select(params, keys))  # every value JSON-able: MLflow params and fingerprints need it
