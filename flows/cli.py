"""The `presto` command. Heavy libraries are imported inside commands, so `--help` is instant."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from flows import prefect_server
from flows.env import configure, project_root
from stages.specs import STAGES

app = typer.Typer(
    help="presto: train a text-to-music latent diffusion model on your corpus and distil it with "
         "Presto! (step + layer distillation). `dvc repro` runs the whole DAG; these commands run or "
         "inspect its parts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

STAGE_HELP = "\n\n".join(f"{s.name}: {s.help}" for s in STAGES)


def _root() -> Path:
    root = project_root()
    configure(root)
    return root


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command(help=f"Run one stage now with the current params (what `dvc repro` calls).\n\n{STAGE_HELP}")
def stage(name: Annotated[str, typer.Argument(help="stage name, see below")]) -> None:
    from presto.errors import PrestoError
    from stages.specs import BY_NAME

    if name not in BY_NAME:
        _fail(f"unknown stage {name!r}; stages are: {', '.join(BY_NAME)}")
    root = _root()
    from presto.config import load_params

    server = prefect_server.start_unless_configured()  # it boots while this process imports the rest
    try:
        load_params(root / "params.yaml")  # fail in seconds, before Prefect and Ray start
        from flows.stage_flow import run

        with prefect_server.prefect_api(server):
            metrics = run(name, root)
    except PrestoError as err:
        _fail(f"stage {name}: {err}")
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    typer.echo(f"stage {name} done: {shown}")
    _leave(server)


def _leave(server: prefect_server.TemporaryServer | None) -> NoReturn:
    """Leave once a stage's work is recorded. Ray, Prefect's queued logs and events and the temporary server are
    shut down here; the interpreter's own teardown after that (torch, Ray, Prefect's threads) took ~3 s of every
    stage on 2 cores and does nothing this process still needs."""
    import logging

    import ray

    ray.shutdown()
    prefect_server.drain_and_stop(server)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@app.command(help="Check params.yaml (or another file): every key known, every value allowed.")
def params(file: Annotated[Path, typer.Option(help="params file to check")] = Path("params.yaml")) -> None:
    from presto.config import load_params
    from presto.errors import ParamsError

    root = _root()
    path = file if file.is_absolute() else Path.cwd() / file
    try:
        p = load_params(path, root)
    except ParamsError as err:
        _fail(str(err))
    typer.echo(f"{file}: ok (profile {p.shared.profile})")


@app.command(help="Apply a profile (demo, science, gpu, paper) from profiles/<name>.yaml onto params.yaml.")
def profile(name: Annotated[str, typer.Argument(help="demo | science | gpu | paper")]) -> None:
    from flows.profiles import apply_profile
    from presto.errors import ParamsError

    root = _root()
    try:
        changed = apply_profile(root, name)
    except ParamsError as err:
        _fail(str(err))
    typer.echo(f"params.yaml: profile {name} applied ({len(changed)} values changed)")
    for key in changed:
        typer.echo(f"  {key}")


@app.command(help="Write dvc.yaml from stages/specs.py (with --check: fail if it is out of date).")
def dag(check: Annotated[bool, typer.Option(help="only check, do not write")] = False) -> None:
    from flows.dag import render

    root = _root()
    text = render()
    path = root / "dvc.yaml"
    if check:
        if not path.is_file() or path.read_text() != text:
            _fail("dvc.yaml is out of date with stages/specs.py; run `presto dag`", 1)
        typer.echo("dvc.yaml is current")
        return
    path.write_text(text)
    typer.echo(f"wrote {path}")


@app.command(help="Serve the MLflow UI for this project's runs on 127.0.0.1.")
def ui(port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 5000) -> None:
    _root()
    uri = os.environ["MLFLOW_TRACKING_URI"]
    cmd = [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", uri]
    if uri.startswith("sqlite:///"):
        cmd += ["--default-artifact-root", (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()]
    typer.echo(f"MLflow UI on http://127.0.0.1:{port} (Ctrl-C stops it)")
    raise typer.Exit(subprocess.call(cmd))


@app.command(help="Write a wav from a text prompt with a trained model. Sampler, steps, guidance, length and "
                  "device default to params.yaml's `generate` section.")
def generate(
    prompt: Annotated[str, typer.Argument(help="what the music should be, e.g. 'calm piano --bpm 80'")],
    output: Annotated[Path, typer.Option("-o", "--output", help="wav file to write")] = Path("out.wav"),
    model: Annotated[str, typer.Option(help="a stage whose model to use (its artifacts/<stage> folder), or a "
                                            "registered model: presto-<name>[@alias | /version] or a models:/ URI")]
    = "train_dit",
    steps: Annotated[int | None, typer.Option(help="sampling steps")] = None,
    seconds: Annotated[float | None, typer.Option(help="length of the clip")] = None,
    seed: Annotated[int, typer.Option(help="noise seed: the same seed gives the same clip")] = 0,
    sampler: Annotated[str | None, typer.Option(help="a sampler of presto.diffusion.sampling.SAMPLERS")] = None,
    guidance: Annotated[float | None, typer.Option(help="guidance scale (CFG++ w in [0, 1])")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N")] = None,
    stereo: Annotated[bool, typer.Option("--stereo", help="upmix to stereo with the train_stereo model")] = False,
) -> None:
    from pydantic import ValidationError

    from presto.config import load_params
    from presto.errors import PrestoError

    root = _root()
    try:
        params = load_params(root / "params.yaml").generate
    except PrestoError as err:
        _fail(str(err))
    from presto.text.encoder import check_prompt

    try:
        prompt, notes = check_prompt(prompt)
    except PrestoError as err:
        _fail(f"generate: {err}")
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    changes = {k: v for k, v in {"steps": steps, "sampler": sampler, "scale": guidance}.items() if v is not None}

    import tempfile

    import soundfile as sf

    from presto.generation import resolve_device

    with tempfile.TemporaryDirectory(prefix="presto-registered-") as tmp:  # a registered model's download
        try:
            dev = resolve_device(device or params.device)
            generator, recipe, default_seconds, upmixer_dir = _load_model(root, model, params, dev, Path(tmp))
            try:
                recipe = type(recipe).model_validate(recipe.model_dump() | changes)
            except ValidationError as err:
                _fail(f"generate: {err.errors()[0]['msg']}")
            if stereo:
                from presto.stereo import StereoGenerator

                if upmixer_dir is None:
                    _fail(f"generate --stereo: {model} was registered without an upmixer")
                # Loaded before sampling, so a missing or mismatched upmixer fails before the slow part.
                generator = StereoGenerator(generator, upmixer_dir)
            audio, timings = generator.generate([prompt], seconds or default_seconds, [seed], recipe)
        except PrestoError as err:
            _fail(str(err))
    sf.write(output, audio[0].T, generator.sample_rate)  # [samples] or [samples, 2]
    typer.echo(f"wrote {output} ({audio.shape[-1] / generator.sample_rate:.1f} s{', stereo' if stereo else ''}) on "
               f"{dev} in {timings['total_ms'] / 1e3:.2f} s: text {timings['text_ms']:.0f} ms, sampling "
               f"{timings['sample_ms']:.0f} ms ({recipe.sampler}, {recipe.steps} steps, NFE {timings['nfe']:.0f}), "
               f"decode {timings['decode_ms']:.0f} ms" + (f", upmix {timings['upmix_ms']:.0f} ms" if stereo else ""))


def _load_model(root: Path, model: str, params, device, scratch: Path):
    """(Generator, default recipe, default seconds, upmixer folder or None) of `presto generate --model`.

    A stage's model samples by the recipe its stage wrote (presto_s.json, presto_ls.json: the few-step
    sampler it was distilled for), else by params' generate.recipe; a registered model by the settings it was
    registered with."""
    from presto.generation import SCHEDULE_FILE, Generator, SamplingRecipe
    from stages.specs import BY_NAME

    if model in BY_NAME:
        folder = root / "artifacts" / model
        generator = Generator.load(folder, vae_dir=root / "artifacts" / "train_vae" / "model",
                                   encode_dir=root / "artifacts" / "encode", device=device, compile=params.compile)
        recipe = params.recipe
        own = folder / f"{model}.json"
        if own.is_file():  # its layer budgets come from schedule.json (Generator.load), not from the recipe
            recipe = SamplingRecipe.model_validate_json(own.read_text())
            if (folder / SCHEDULE_FILE).is_file():
                recipe = recipe.model_copy(update={"budgets": None})
        return generator, recipe, params.seconds, root / "artifacts" / "train_stereo"
    from flows.serving import download_registered, load_bundle

    uri = model if model.startswith("models:/") else f"models:/{model}"
    artifacts = download_registered(uri, scratch)
    generator, recipe, seconds = load_bundle(artifacts, device, params.compile)
    return generator, recipe, seconds, artifacts.get("upmixer")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
