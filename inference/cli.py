"""`flashdmd generate` and `flashdmd export`.

Exit codes: 0 done, 2 bad input (unknown checkpoint, steps the checkpoint was not trained
for, bad size or format), 1 anything else. torch is imported only once the arguments are
known to be good, so `--help` and usage errors answer at once.

`generate --job ID` needs the service's storage root, which inference/ does not know: the `flashdmd` group
(api/cli.py) puts a job-id -> run-directory function in the click context's meta under `RUN_DIR_META`.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from inference.checkpoint import LORA_FORMATS, CheckpointError, CheckpointInfo, resolve_checkpoint_dir
from inference.hub_push import PushError, check_repo_id
from inference.serving import ServingError, ServingOptions, setting_name

if TYPE_CHECKING:
    from inference.hub_card import CardInputs

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2
RUN_DIR_META = "flashdmd.run_dir"
SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _checkpoint(checkpoint: Path | None, job: str | None) -> CheckpointInfo:
    if (checkpoint is None) == (job is None):
        _fail("give exactly one of --checkpoint PATH or --job ID")
    if job is not None:
        run_dir: Callable[[str], Path] | None = click.get_current_context().meta.get(RUN_DIR_META)
        if run_dir is None:
            _fail("--job needs the service's storage root: run it as `flashdmd generate --job ID`")
        assert run_dir is not None
        checkpoint = run_dir(job)
        if not checkpoint.is_dir():
            _fail(f"job {job}: no run directory at {checkpoint}")
    assert checkpoint is not None
    return CheckpointInfo.load(resolve_checkpoint_dir(checkpoint))


def _outputs(output: Path | None, seeds: list[int]) -> tuple[list[Path], str]:
    out = output or Path(f"flashdmd-{seeds[0]}.png")
    fmt = SUFFIX_FORMATS.get(out.suffix.lower())
    if fmt is None:
        _fail(f"-o {out}: the suffix must be one of {', '.join(SUFFIX_FORMATS)}")
    if len(seeds) == 1:
        return [out], fmt  # type: ignore[return-value]
    return [out.with_name(f"{out.stem}-{s}{out.suffix}") for s in seeds], fmt  # type: ignore[return-value]


@click.command("generate")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="checkpoint folder or run directory")
@click.option("--job", help="job id: its latest checkpoint under the service's storage root")
@click.option("--prompt", required=True)
@click.option("--negative-prompt", default=None, help="only used with --guidance > 1")
@click.option("--steps", type=int, default=None, help="sampler steps (default: the checkpoint's own K)")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None, help="default: random (printed)")
@click.option("-n", "--num-images", type=click.IntRange(1, 64), default=1, help="image i uses seed + i")
@click.option("--width", type=int, default=None)
@click.option("--height", type=int, default=None)
@click.option("--guidance", type=click.FloatRange(1.0, 30.0), default=1.0,
              help="CFG scale; the generator is distilled to run without it (1)")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="image file (.png, .jpg, .webp); several images get -<seed> suffixes")
@click.option("--device", default=None, help="default: cuda if available, else cpu")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="generator/text-encoder dtype (default: bf16 on cuda, fp32 on cpu)")
def generate_command(checkpoint: Path | None, job: str | None, prompt: str, negative_prompt: str | None,
                     steps: int | None, seed: int | None, num_images: int, width: int | None, height: int | None,
                     guidance: float, output: Path | None, device: str | None, dtype: str | None) -> None:
    """Generate images with a trained few-step generator."""
    try:
        info = _checkpoint(checkpoint, job)
        info.timesteps_for(steps)
        info.check_size(width, height, 4096)
    except CheckpointError as err:
        _fail(str(err))
    if negative_prompt and guidance <= 1.0:
        _fail("--negative-prompt has no effect without --guidance > 1 (the generator runs without CFG)")
    seed = secrets.randbits(31) if seed is None else seed
    seeds = [seed + i for i in range(num_images)]
    paths, fmt = _outputs(output, seeds)

    import torch

    from inference.export import DTYPES
    from inference.images import encode_image
    from inference.pipeline import load_pipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bf16" if device.startswith("cuda") else "fp32")
    try:
        pipe = load_pipeline(info, device=device, dtype=DTYPES[dtype])
        images = pipe.generate([prompt] * num_images, seeds, steps=steps, width=width, height=height,
                               guidance=guidance, negative_prompt=negative_prompt)
    except CheckpointError as err:
        _fail(str(err))
    for path, image, s in zip(paths, images, seeds, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_image(image, fmt))
        click.echo(f"{path}\tseed={s}")


BOOL_WORDS = {"true": True, "on": True, "1": True, "false": False, "off": False, "0": False}


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in text.split(","):
        w, sep, h = part.strip().lower().partition("x")
        if part.strip() and (not sep or not w.isdigit() or not h.isdigit()):
            raise ServingError(f"{part.strip()!r} is not WIDTHxHEIGHT", setting_name("warm_sizes"))
        if part.strip():
            out.append((int(w), int(h)))
    return tuple(out)


def _batches(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise ServingError(f"{text!r} is not a comma-separated list of integers",
                           setting_name("warm_batches")) from None


def serving_options(items: tuple[str, ...]) -> ServingOptions:
    """`--serving KEY=VALUE` flags as typed serving options (sizes "1024x1024,768x1344", batches "1,4,8")."""
    kw: dict[str, Any] = {}
    for item in items:
        key, sep, value = (x.strip() for x in item.partition("="))
        if not sep:
            _fail(f"--serving {item!r}: expected KEY=VALUE")
        if not value:
            continue
        if key in ("compile", "fuse_qkv", "channels_last"):
            kw[key] = BOOL_WORDS.get(value.lower(), value)
        elif key == "warm_sizes":
            kw[key] = _sizes(value)
        elif key == "warm_batches":
            kw[key] = _batches(value)
        elif key in ("compile_cache_dir", "tiny_vae_path"):
            kw[key] = Path(value).expanduser()
        else:
            kw[key] = value
    return ServingOptions(**kw)


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(LORA_FORMATS), required=True)
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="output folder (default ./<run>-step-N-<format>)")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32")
@click.option("--push-to-hub", "push_repo", default=None, metavar="ORG/NAME",
              help="then upload the folder, with a model card and the run's sample grids, to this model repo")
@click.option("--private", is_flag=True, help="with --push-to-hub: create the repo private")
@click.option("--token", default=None, help="with --push-to-hub: a hub token (default: HF_TOKEN or the saved login)")
@click.option("--eval", "eval_json", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="with --push-to-hub: an eval job's eval.json for the card (default: the run's eval.json, if any)")
@click.option("--serving", "serving", multiple=True, metavar="KEY=VALUE",
              help="a serving option the checkpoint was validated with, written to serving.json (e.g. "
                   "fuse_qkv=true, compile=true, warm_sizes=1024x1024, warm_batches=1,4); repeatable")
def export_command(checkpoint: Path, fmt: str, output: Path | None, dtype: str, push_repo: str | None,
                   private: bool, token: str | None, eval_json: Path | None, serving: tuple[str, ...]) -> None:
    """Export a checkpoint as a diffusers folder, UNet safetensors, or LoRA (diffusers or kohya keys)."""
    if push_repo is None and (private or token or eval_json):
        _fail("--private, --token and --eval only apply with --push-to-hub")
    try:
        options = serving_options(serving)
        options.check(cuda=True)
    except (ServingError, TypeError) as err:
        _fail(f"--serving: {err}")
    card = None
    try:
        info = CheckpointInfo.load(checkpoint)
        if fmt not in info.export_formats():
            raise CheckpointError(f"format {fmt!r} needs a LoRA checkpoint; {info.id} has a full {info.generator} "
                                  f"(available: {', '.join(info.export_formats())})")
        if push_repo is not None:  # bad push arguments fail before minutes of exporting
            from inference.hub_card import gather

            check_repo_id(push_repo)
            card = gather(info, fmt, eval_json)
        from inference.export import export_checkpoint

        out = export_checkpoint(info, fmt, output, dtype=dtype, serving=options)
    except (CheckpointError, PushError, ValueError) as err:  # ValueError: an unreadable --eval file
        _fail(str(err))
    click.echo(str(out))
    if push_repo is not None and card is not None:
        _push(out, card, push_repo, private=private, token=token)


def _push(out: Path, card: CardInputs, repo: str, *, private: bool, token: str | None) -> None:
    from inference.hub_card import stage_hub_folder
    from inference.hub_push import push_folder

    stage_hub_folder(out, card, repo)
    try:
        pushed = push_folder(out, repo, private=private, token=token)
    except PushError as err:  # the export and its card stay: `hf upload` can push them later
        _fail(f"{err} (the export is in {out}; retry with `hf upload {repo} {out}`)", EXIT_FAILED)
    click.echo(f"pushed {pushed.files} files to {pushed.repo_url} ({pushed.commit_url})")
