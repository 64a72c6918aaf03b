"""Experiment trackers (`train.report_to`): TensorBoard, W&B and MLflow through accelerate's tracker API.

The trainer keeps talking to its sink only. `tracked_sink` wraps that sink so that every `log_metrics` row also
goes to `Accelerator.log` (the same keys and steps as metrics.jsonl) and every `sample` event's grid goes to
each tracker as an image. Accelerate runs tracker calls on the main process only, and the image path is read
on rank 0 only (the other ranks never write the file).

Each tracker is an optional extra. Accelerate silently drops a tracker whose package is missing, so
`check_trackers` fails first, at startup, with the `pip install` line that fixes it.

Where the logs go: `<run_dir>/trackers/`. W&B runs offline and MLflow writes a local store there unless the
user configured them (WANDB_MODE, MLFLOW_TRACKING_URI), so a run never reaches the network by surprise. The
process entry (trainer/cli.py `configure_process`) reads those two once and installs them here as a
`TrackerEnv`; the libraries still read their own variables (keys, hosts) themselves.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import InputError
from trainer.installed import Installed
from trainer.sink import Sink

TRACKER_DIR = "trackers"
# report_to name -> the module accelerate imports for it (the extra of the same name installs it).
TRACKER_MODULES: dict[str, str] = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
SAMPLE_TAG = "samples"


@dataclass(frozen=True)
class TrackerEnv:
    """Whether the user configured W&B's mode and MLflow's store (None: unset, so flashdmd's defaults apply)."""

    wandb_mode: str | None = None
    mlflow_tracking_uri: str | None = None

    @classmethod
    def parse(cls, env: Mapping[str, str]) -> TrackerEnv:
        return cls(env.get("WANDB_MODE"), env.get("MLFLOW_TRACKING_URI"))


_tracker_env: Installed[TrackerEnv] = Installed(TrackerEnv())
install_tracker_env = _tracker_env.install  # this process's tracker settings; returns the previous ones
installed_tracker_env = _tracker_env.get


def check_trackers(names: list[str]) -> None:
    """Fail with the install command when a requested tracker's package cannot be imported."""
    missing = [n for n in names if importlib.util.find_spec(TRACKER_MODULES[n]) is None]
    if missing:
        extras = ",".join(missing)
        raise InputError(f"train.report_to: {', '.join(missing)} is not installed; install the extra with "
                         f"pip install 'flashdmd[{extras}]' or remove it from train.report_to")


def accelerator_kwargs(report_to: list[str], run_dir: Path) -> dict[str, Any]:
    """Keyword arguments for `Accelerator(...)`: the trackers and their logging directory (empty: none)."""
    if not report_to:
        return {}
    check_trackers(report_to)
    from accelerate.utils import ProjectConfiguration

    # project_dir stays the run directory; only the trackers' logging_dir moves under trackers/.
    project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / TRACKER_DIR))
    return {"log_with": list(report_to), "project_config": project}


def flat_config(spec: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """The spec as `section.field: scalar` (TensorBoard's hparams and MLflow's params take scalars only)."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:  # lists and None: JSON text, so the value stays readable and unambiguous
            out[name] = json.dumps(value)
    return out


def _init_kwargs(run_dir: Path, env: TrackerEnv, start: int) -> dict[str, dict[str, Any]]:
    logs = (run_dir / TRACKER_DIR).absolute()
    # A resumed run logs again from start + 1; TensorBoard then drops what the previous attempt logged from that
    # step on, as truncate_metrics does for metrics.jsonl, so no step shows twice. (W&B and MLflow start a new run.)
    tensorboard: dict[str, Any] = {"purge_step": start + 1} if start > 0 else {}
    wandb: dict[str, Any] = {"dir": str(logs), "name": run_dir.name}
    if env.wandb_mode is None:  # offline unless the user chose a mode (then wandb reads it itself)
        wandb["mode"] = "offline"
    mlflow: dict[str, Any] = {"run_name": run_dir.name}
    if env.mlflow_tracking_uri is None:  # a new experiment's artifacts (sample grids) next to its local store
        mlflow["logging_dir"] = (logs / "mlartifacts").as_uri()
    return {"tensorboard": tensorboard, "wandb": wandb, "mlflow": mlflow}


class TrackerSink:
    """The run's sink, plus accelerate's trackers: scalars on `log_metrics`, grids on `sample` events."""

    def __init__(self, inner: Sink, acc: Any) -> None:  # acc: accelerate.Accelerator
        self.inner, self.acc = inner, acc

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.inner.log_metrics(step, metrics)
        self.acc.log({k: float(v) for k, v in metrics.items()}, step=int(step))

    def log_event(self, kind: str, message: str = "", /, **data: Any) -> None:
        self.inner.log_event(kind, message, **data)
        path = data.get("path")
        if kind == "sample" and path and self.acc.is_main_process:
            self.log_image(Path(path), int(data.get("step", 0)), str(data.get("tag", SAMPLE_TAG)))

    def log_image(self, path: Path, step: int, tag: str) -> None:
        """One grid to every tracker, in the form each one takes (accelerate has no common image call)."""
        import numpy as np
        from PIL import Image

        if not path.is_file():
            return
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        pixels = np.asarray(rgb)  # [H, W, 3] uint8
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({tag: pixels[None]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({tag: [rgb]}, step=step)
            elif tracker.name == "mlflow":  # MLflow keeps images as artifacts, one file per step
                tracker.log_artifact(str(path), artifact_path=tag)

    def save_checkpoint(self, step: int, path: Path, meta: dict[str, Any]) -> None:
        self.inner.save_checkpoint(step, path, meta)

    def should_stop(self) -> bool:
        return self.inner.should_stop()

    def close(self) -> None:
        finish_trackers(self.acc)
        self.inner.close()


def tracked_sink(sink: Sink, acc: Any, cfg: Any, run_dir: Path, *, start: int = 0) -> Sink:
    """Start the trackers of `cfg.train.report_to` (already on `acc`) and wrap the sink; no trackers: as is.

    `start`: the step the run resumes from (0 for a fresh run).
    """
    if not cfg.train.report_to:
        return sink
    # The settings the entry installed, not the environment now: set_tracking_uri below writes
    # MLFLOW_TRACKING_URI into the environment, and a later run in this process must still get its own store.
    env = installed_tracker_env()
    init_kwargs = _init_kwargs(run_dir, env, start)
    if "mlflow" in cfg.train.report_to and acc.is_main_process and env.mlflow_tracking_uri is None:
        import mlflow

        # A local store in the run directory unless the user points MLflow at a server. SQLite, as MLflow 3
        # refuses its old file store by default.
        mlflow.set_tracking_uri(f"sqlite:///{(run_dir / TRACKER_DIR / 'mlflow.db').absolute()}")
    try:
        if acc.is_main_process:
            (run_dir / TRACKER_DIR).mkdir(parents=True, exist_ok=True)
        acc.init_trackers(cfg.name or "flashdmd", config=flat_config(cfg.model_dump(mode="json")),
                          init_kwargs=init_kwargs)
    except Exception as err:  # e.g. WANDB_MODE=online without a key, an MLflow server that does not answer, or
        # a run directory where trackers/ cannot be made
        raise InputError(f"train.report_to: a tracker could not start ({type(err).__name__}: {err}); check its "
                         "settings (WANDB_MODE, WANDB_API_KEY, MLFLOW_TRACKING_URI) or remove it") from err
    return TrackerSink(sink, acc)


def finish_trackers(acc: Any) -> None:
    """Close every tracker (flushes TensorBoard, syncs an offline W&B run, ends the MLflow run).

    Not `Accelerator.end_training()`: that also destroys the process group, which the caller may still use.
    """
    for tracker in acc.trackers:
        tracker.finish()
    acc.trackers.clear()
