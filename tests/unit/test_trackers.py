"""train.report_to: a real TensorBoard event file read back, and the missing-extra error."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from PIL import Image

from trainer.errors import InputError
from trainer.jobspec import SpecError, parse_spec
from trainer.sink import JsonlSink, read_metrics
from trainer.trackers import TRACKER_DIR, TrackerEnv, _init_kwargs, flat_config, installed_tracker_env


def _accumulator(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # size_guidance 0: keep every scalar and image, not TensorBoard's reservoir sample
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_gets_the_sink_scalars_and_the_sample_grid(make_cfg, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra (part of [test])")
    from trainer.loop import train

    cfg = make_cfg(train__max_steps=2, train__sample_every=2, train__checkpoint_every=2, train__num_samples=2,
                   train__report_to=["tensorboard"])
    run = tmp_path / "run"
    sink = JsonlSink(run)
    try:
        assert train(cfg, sink, run_dir=run) == 2
    finally:
        sink.close()

    logdir = run / TRACKER_DIR / "flashdmd"  # accelerate: <logging_dir>/<project name>
    assert list(logdir.glob("events.out.tfevents.*")), f"no event file under {logdir}"
    events = _accumulator(logdir)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    # Every key the metrics sink wrote is a TensorBoard scalar with the same steps and values.
    scalars = set(events.Tags()["scalars"])
    assert set(rows[0]["metrics"]) <= scalars
    for key in ("loss/dm", "loss/fake_score", "lr/generator"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        expected = {r["step"]: r["metrics"][key] for r in rows if key in r["metrics"]}
        assert logged.keys() == expected.keys()
        for step, value in expected.items():
            assert logged[step] == pytest.approx(value, rel=1e-6)  # TensorBoard stores float32
    # The sample grid the trainer wrote at step 2, as an image of the same size.
    images = events.Images("samples")
    assert [i.step for i in images] == [2]
    grid = Image.open(run / "samples" / "step-00000002.png")
    assert (images[0].width, images[0].height) == grid.size


@pytest.mark.slow  # two short runs
def test_a_resumed_run_does_not_show_a_step_twice_in_tensorboard(make_cfg, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra (part of [test])")
    import shutil

    from trainer.checkpoint import latest_checkpoint
    from trainer.loop import train

    run = tmp_path / "run"

    def run_to(max_steps: int, resume: bool) -> None:
        cfg = make_cfg(train__max_steps=max_steps, train__checkpoint_every=2, train__sample_every=100,
                       train__report_to=["tensorboard"])
        sink = JsonlSink(run)
        try:
            train(cfg, sink, run_dir=run, resume=resume)
        finally:
            sink.close()

    run_to(3, resume=False)  # checkpoints at 2 and 3, metrics for 1..3
    shutil.rmtree(latest_checkpoint(run))  # as if it had died before the step-3 checkpoint was complete
    run_to(4, resume=True)  # resumes from 2: logs 3 and 4 again
    events = _accumulator(run / TRACKER_DIR / "flashdmd")
    assert [e.step for e in events.Scalars("loss/dm")] == [1, 2, 3, 4]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


@pytest.mark.slow  # a stage-2 run: ~2x a stage-1 step on the tiny teacher
def test_stage2_rl_reports_to_tensorboard_too(make_cfg, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra (part of [test])")
    from trainer.rl_loop import train_rl

    raw = make_cfg(train__max_steps=2, train__sample_every=2, train__checkpoint_every=2, train__num_samples=2,
                   train__report_to=["tensorboard"]).model_dump(mode="json")
    raw.update(kind="rl", rl={"threshold_min": -1.0, "threshold_max": -1.0, "ratio": 1, "optimizer": {"lr": 1e-3}})
    run = tmp_path / "rl"
    sink = JsonlSink(run)
    try:
        assert train_rl(parse_spec(raw), sink, run_dir=run) == 2
    finally:
        sink.close()
    events = _accumulator(run / TRACKER_DIR / "flashdmd")
    rows = read_metrics(run)
    assert {"loss/rl", "eval/reward"} <= set(rows[-1]["metrics"])
    for key in ("loss/rl", "eval/reward"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx({r["step"]: r["metrics"][key] for r in rows if key in r["metrics"]})
    assert [i.step for i in events.Images("samples")] == [2]


def test_missing_tracker_extra_fails_at_startup_naming_the_extra(make_cfg, tmp_path: Path, monkeypatch) -> None:
    from trainer.loop import train

    real_find_spec = importlib.util.find_spec

    def without_wandb(name: str, *args, **kwargs):  # as if `pip install 'flashdmd[wandb]'` had not been run
        return None if name == "wandb" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", without_wandb)
    cfg = make_cfg(train__max_steps=2, train__report_to=["wandb"])
    run = tmp_path / "run"
    sink = JsonlSink(run)
    try:
        with pytest.raises(InputError, match=r"pip install 'flashdmd\[wandb\]'") as err:
            train(cfg, sink, run_dir=run)
    finally:
        sink.close()
    assert "train.report_to" in str(err.value)
    assert not (run / "checkpoints").exists()  # it failed before training, not after


def test_a_tracker_that_cannot_start_is_an_input_error(make_cfg, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra (part of [test])")
    from trainer.loop import _accelerator
    from trainer.trackers import tracked_sink

    cfg = make_cfg(train__report_to=["tensorboard"])
    run = tmp_path / "run"
    run.mkdir()
    (run / TRACKER_DIR).write_text("a file where the trackers' folder should be")
    sink = JsonlSink(run)
    try:
        with pytest.raises(InputError, match=r"train\.report_to: a tracker could not start \(FileExistsError"):
            tracked_sink(sink, _accelerator(cfg, run), cfg, run)
    finally:
        sink.close()


def test_report_to_accepts_known_trackers_only() -> None:
    base = {"model": {"teacher": "tiny:sdxl"}, "data": {"builtin": "digits"}}
    assert parse_spec(base).train.report_to == []
    spec = parse_spec({**base, "train": {"report_to": ["tensorboard", "mlflow"]}})
    assert spec.train.report_to == ["tensorboard", "mlflow"]
    with pytest.raises(SpecError, match=r"train\.report_to"):
        parse_spec({**base, "train": {"report_to": ["comet_ml"]}})


def test_tracker_defaults_follow_the_settings_the_entry_installed(process_env, tmp_path: Path) -> None:
    run = tmp_path / "run"
    process_env.delenv("WANDB_MODE")
    process_env.delenv("MLFLOW_TRACKING_URI")
    kw = _init_kwargs(run, installed_tracker_env(), 0)
    assert kw["wandb"]["mode"] == "offline"
    assert kw["mlflow"]["logging_dir"] == (run / TRACKER_DIR / "mlartifacts").absolute().as_uri()
    # A variable set after the entry ran changes nothing (mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI
    # itself: a second run in the same process must still get its own local store).
    process_env.monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlflow.db")
    process_env.monkeypatch.setenv("WANDB_MODE", "online")
    assert installed_tracker_env() == TrackerEnv()
    # Installed by the entry: the user's choice is left to the libraries, which read it themselves.
    process_env.configure()
    assert installed_tracker_env() == TrackerEnv("online", "sqlite:////elsewhere/mlflow.db")
    kw = _init_kwargs(run, installed_tracker_env(), 3)
    assert "mode" not in kw["wandb"] and "logging_dir" not in kw["mlflow"]
    assert kw["tensorboard"] == {"purge_step": 4}


def test_flat_config_gives_scalars_for_hparams() -> None:
    flat = flat_config({"train": {"max_steps": 4, "report_to": ["tensorboard"]}, "name": None, "k": True})
    assert flat == {"train.max_steps": 4, "train.report_to": '["tensorboard"]', "name": "null", "k": True}


@pytest.mark.slow  # W&B starts its service process and MLflow migrates its database: ~1 min on 2 cores
def test_wandb_and_mlflow_stay_offline_in_the_run_dir(make_cfg, tmp_path: Path, monkeypatch) -> None:
    """Runs where the [wandb] and [mlflow] extras are installed (the shared test env has neither)."""
    pytest.importorskip("wandb", reason="the [wandb] extra")
    pytest.importorskip("mlflow", reason="the [mlflow] extra")
    from trainer.loop import train

    for name in ("WANDB_MODE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.setenv(name, "")  # so that teardown restores it: mlflow.set_tracking_uri writes the variable
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # anything a tracker wrote to the working directory would show up here
    cfg = make_cfg(train__max_steps=2, train__sample_every=2, train__checkpoint_every=2, train__num_samples=2,
                   train__report_to=["wandb", "mlflow"])
    run = tmp_path / "run"
    sink = JsonlSink(run)
    try:
        train(cfg, sink, run_dir=run)
    finally:
        sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    # W&B: an offline run (nothing sent) with the sample grid among its media.
    offline = list((run / TRACKER_DIR / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))
    assert list((offline[0] / "files" / "media" / "images").glob("samples_2_*.png"))

    # MLflow: a local SQLite store in the run dir with the sink's metrics, and the grid as an artifact.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / TRACKER_DIR / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("flashdmd").experiment_id])
    expected = {r["step"]: r["metrics"]["loss/dm"] for r in read_metrics(run)}
    logged = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "loss/dm")}
    assert logged == pytest.approx(expected)
    assert [a.path for a in client.list_artifacts(found.info.run_id, "samples")] == ["samples/step-00000002.png"]
