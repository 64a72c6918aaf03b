"""The digits toy: the shipped teacher loads (our loader and stock diffusers) and samples; the evaluator's FD,
accuracy and diversity; the shipped evaluator's held-out accuracy; the rebuild paths run (a few steps)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from trainer.jobspec import ModelSpec
from trainer.models import load_teacher
from trainer.toy import EVALUATOR_DIR, TEACHER_DIR
from trainer.toy import evaluate as E
from trainer.toy import metrics as M
from trainer.toy import reference as R
from trainer.toy import teacher_sampling as TS


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on a shared 2-core machine a second OpenMP thread mostly spins."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(ModelSpec(teacher=str(TEACHER_DIR)))


@pytest.fixture(scope="module")
def evaluator():
    return E.DigitsEvaluator.load(EVALUATOR_DIR)


# ------------------------------------------------------------------------------------------------ shipped files


def test_shipped_teacher_is_small_and_documented() -> None:
    size = sum(p.stat().st_size for p in TEACHER_DIR.rglob("*") if p.is_file())
    assert size < 20 * 2**20
    info = json.loads((TEACHER_DIR / "training.json").read_text())
    assert info["command"].startswith("flashdmd toy train-teacher --seed ")
    assert (TEACHER_DIR.parent / "README.md").read_text().count(info["command"]) >= 1


def test_shipped_teacher_loads_through_load_teacher(teacher) -> None:
    assert teacher.family == "sdxl"
    assert (teacher.resolution, teacher.vae_scale, teacher.latent_size) == (32, 4, 8)
    assert teacher.pipe.config.force_zeros_for_empty_prompt  # Teacher.uncond's zeros match the training dropout
    sched = teacher.pipe.scheduler.config
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end, sched.prediction_type) == (
        "scaled_linear", 0.00085, 0.012, "epsilon")
    assert 1e6 <= sum(p.numel() for p in teacher.denoiser.parameters()) <= 3e6
    # Latents have about unit std (scaling_factor was set from the data).
    real = E.real_digits()[0][:256]
    lat = teacher.encode_images(real, torch.Generator().manual_seed(0))
    assert lat.shape == (256, 4, 8, 8)
    assert 0.8 < lat.std().item() < 1.25


def test_shipped_teacher_samples_digits_in_our_loop(teacher, evaluator) -> None:
    labels = torch.arange(10)
    imgs = TS.generate(teacher, labels, method="ddim", timesteps=[999, 749, 499, 249], guidance=TS.DEFAULT_GUIDANCE)
    assert imgs.shape == (10, 3, 32, 32) and torch.isfinite(imgs).all()
    # Even 4 DDIM steps of the trained teacher give mostly the prompted digits (random weights give ~10%).
    assert evaluator.accuracy(imgs, labels) >= 0.6


def test_shipped_teacher_runs_in_stock_diffusers() -> None:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(TEACHER_DIR))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a handwritten digit three", "a handwritten digit seven"], num_inference_steps=4, guidance_scale=3.0,
               output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 3, 32, 32)  # the default resolution is 32 px
    assert torch.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


def test_shipped_evaluator_held_out_accuracy(evaluator) -> None:
    images, labels = E.real_digits()
    _, test = E.split_indices(labels)
    assert evaluator.accuracy(images[test], labels[test]) >= 0.95
    assert evaluator.meta["test_accuracy"] >= 0.97


def test_shipped_reference_matches_shipped_teacher_and_evaluator(teacher, evaluator) -> None:
    """The teacher-50 statistics in the package belong to the shipped weights (no regeneration needed)."""
    key = R.reference_key(teacher, evaluator, per_class=TS.EVAL_PER_CLASS, steps=R.REFERENCE_STEPS,
                          guidance=TS.DEFAULT_GUIDANCE, seed=0)
    assert (EVALUATOR_DIR / "reference" / f"teacher{R.REFERENCE_STEPS}-{key}.safetensors").is_file()


def test_shipped_teacher_features_match_a_recomputed_subset(teacher, evaluator, tmp_path, monkeypatch) -> None:
    """The teacher-50 features `flashdmd demo` scores from are what sampling the shipped teacher gives: the first
    ten (digits 0-9, seeds 0-9) recomputed here agree with the shipped file, which answered without sampling."""
    real_generate = TS.generate

    def no_sampling(*a, **k):
        raise AssertionError("the shipped features should have answered")

    monkeypatch.setattr(R, "generate", no_sampling)
    shipped = R.teacher_features(teacher, evaluator, per_class=50, cache_dir=tmp_path)
    assert shipped.shape == (500, E.FEATURE_DIM)
    again = evaluator.features(real_generate(teacher, torch.arange(10), method="euler", steps=R.REFERENCE_STEPS,
                                             guidance=TS.DEFAULT_GUIDANCE, seed=0))
    torch.testing.assert_close(again, shipped[:10], atol=1e-3, rtol=1e-3)
    assert not list(tmp_path.iterdir())  # nothing was generated or cached


def test_teacher_features_are_invalidated_by_a_changed_teacher(evaluator, tmp_path, monkeypatch) -> None:
    changed = load_teacher(ModelSpec(teacher=str(TEACHER_DIR)))
    shipped_key = R.features_key(changed, evaluator, steps=R.REFERENCE_STEPS, guidance=TS.DEFAULT_GUIDANCE, seed=0)
    with torch.no_grad():
        next(changed.denoiser.parameters()).view(-1)[0] += 1e-3
    key = R.features_key(changed, evaluator, steps=R.REFERENCE_STEPS, guidance=TS.DEFAULT_GUIDANCE, seed=0)
    assert key != shipped_key
    # Other sampler settings are other keys too.
    assert R.features_key(changed, evaluator, steps=20, guidance=TS.DEFAULT_GUIDANCE, seed=0) != key
    assert R.features_key(changed, evaluator, steps=R.REFERENCE_STEPS, guidance=3.0, seed=0) != key
    calls = []

    def fake_generate(teacher, labels, **kw):
        calls.append(len(labels))
        g = torch.Generator().manual_seed(len(labels))
        return torch.rand((len(labels), 3, 32, 32), generator=g) * 2 - 1

    monkeypatch.setattr(R, "generate", fake_generate)
    first = R.teacher_features(changed, evaluator, per_class=3, cache_dir=tmp_path, progress=False)
    assert calls == [30] and (tmp_path / f"features{R.REFERENCE_STEPS}-{key}.safetensors").is_file()
    torch.testing.assert_close(R.teacher_features(changed, evaluator, per_class=3, cache_dir=tmp_path), first)
    torch.testing.assert_close(R.teacher_features(changed, evaluator, per_class=2, cache_dir=tmp_path), first[:20])
    assert calls == [30]  # both answered from the cache (a smaller N is a prefix)
    R.teacher_features(changed, evaluator, per_class=4, cache_dir=tmp_path, progress=False)
    assert calls == [30, 40]  # more rows than cached: sampled again


# ---------------------------------------------------------------------------------------------------------- FD


def _diag_fd(mu1, var1, mu2, var2) -> float:
    return float(((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * np.sqrt(var1 * var2)).sum())


def test_fd_of_gaussians_matches_closed_form() -> None:
    rng = np.random.default_rng(0)
    d, n = 6, 200_000
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    var1, var2 = rng.uniform(0.2, 3.0, size=d), rng.uniform(0.2, 3.0, size=d)
    a = mu1 + np.sqrt(var1) * rng.standard_normal((n, d))
    b = mu2 + np.sqrt(var2) * rng.standard_normal((n, d))
    expected = _diag_fd(mu1, var1, mu2, var2)
    assert M.fd(a, b) == pytest.approx(expected, rel=0.03, abs=0.02)
    # Exact statistics give the exact value, also for torch input.
    assert M.fd_from_stats(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)
    assert M.fd(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(M.fd(a, b), rel=1e-9)


def test_fd_is_zero_on_itself_symmetric_and_agrees_with_scipy() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 10)) @ rng.standard_normal((10, 10))
    y = rng.standard_normal((400, 10)) @ rng.standard_normal((10, 10)) + 0.5
    assert M.fd(x, x) == pytest.approx(0.0, abs=1e-8)
    assert M.fd(x, y) == pytest.approx(M.fd(y, x), rel=1e-8)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    m1, c1 = M.feature_stats(x)
    m2, c2 = M.feature_stats(y)
    root = scipy_linalg.sqrtm(c1 @ c2).real
    ref = ((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(root)
    assert M.fd(x, y) == pytest.approx(ref, rel=1e-6)


def test_fd_handles_rank_deficient_features() -> None:
    x = np.zeros((50, 4))
    x[:, 0] = np.arange(50)  # three constant (zero-variance) dims
    assert math.isfinite(M.fd(x, x + 1.0)) and M.fd(x, x + 1.0) == pytest.approx(4.0, rel=1e-6)


# --------------------------------------------------------------------------------------- accuracy / diversity


def test_accuracy_on_real_and_mislabelled_digits(evaluator) -> None:
    images, labels = E.real_digits()
    _, test = E.split_indices(labels)
    x, y = images[test[:100]], labels[test[:100]]
    assert E.accuracy(x, y, evaluator) >= 0.95
    assert E.accuracy(x, (y + 1) % 10, evaluator) <= 0.05
    assert M.accuracy_from_logits(torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0]]), [1, 1, 1]) == pytest.approx(2 / 3)


def test_diversity_on_hand_made_features() -> None:
    # class 0: points 0, 3 (distance 3); class 1: a 3-4-5 right triangle -> mean pair distance (3+4+5)/3 = 4.
    feats = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [9.0, 9.0]])
    labels = torch.tensor([0, 0, 1, 1, 1, 2])  # class 2 has one sample and is skipped
    assert M.diversity_from_features(feats, labels) == pytest.approx((3.0 + 4.0) / 2)
    with pytest.raises(ValueError):
        M.diversity_from_features(feats[:1], labels[:1])


def test_diversity_of_images_collapse_is_zero(evaluator) -> None:
    images, labels = E.real_digits()
    idx = torch.cat([torch.nonzero(labels == c)[:8, 0] for c in range(10)])
    real = E.intra_class_diversity(images[idx], labels[idx], evaluator)
    collapsed = images[idx].clone()
    for c in range(10):  # every sample of a class is the same image
        sel = labels[idx] == c
        collapsed[sel] = collapsed[sel][0]
    assert real > 0.5
    assert E.intra_class_diversity(collapsed, labels[idx], evaluator) == pytest.approx(0.0, abs=1e-4)


def test_report_has_every_metric(evaluator) -> None:
    images, labels = E.real_digits()
    rep = evaluator.report(images[:300], labels[:300], reference=evaluator.real_stats())
    assert set(rep) == {"accuracy", "fd_real", "fd_heldout", "precision", "recall", "density", "coverage",
                        "diversity", "n", "fd_teacher"}
    assert rep["fd_real"] == pytest.approx(rep["fd_teacher"]) and rep["n"] == 300


# ------------------------------------------------------------------------------ held-out split and manifold metrics


def test_heldout_split_is_disjoint_stratified_and_the_gan_reals_exclude_it() -> None:
    from trainer.data import build_dataset
    from trainer.jobspec import DataSpec

    images, labels = E.real_digits()
    tr, te = E.split_indices(labels)
    assert len(tr) + len(te) == 1797 and not set(tr.tolist()) & set(te.tolist()) and len(te) == 360
    assert torch.bincount(labels[te], minlength=10).min() >= 35  # every digit held out (stratified)
    train_ds = build_dataset(DataSpec(builtin="digits-train"), 32)
    assert len(train_ds) == len(tr) and train_ds.labels == labels[tr].tolist()
    torch.testing.assert_close(train_ds.image(5), images[tr[5]])
    assert len(build_dataset(DataSpec(builtin="digits"), 32)) == 1797


def test_heldout_fd_reference_is_the_360_held_out_digits(evaluator) -> None:
    images, labels = E.real_digits()
    _, te = E.split_indices(labels)
    rep = evaluator.report(images[te], labels[te])
    assert rep["fd_heldout"] == pytest.approx(0.0, abs=1e-6)  # the reference itself
    assert rep["precision"] == 1.0 and rep["coverage"] == 1.0
    base = evaluator.real_baselines(sizes=(500,))
    assert set(base["floor"]) == {"500", "1437"} and base["floor"]["500"]["fd_heldout"] > base["floor"]["1437"]["fd_heldout"] > 1


def test_manifold_metrics_on_a_hand_made_case() -> None:
    # Real: 4 points on a line at 0, 1, 2, 3 (k = 1: every radius is 1). Fake: 0.5 (inside the balls of 0 and 1),
    # 10 (outside every ball) and 10.5 (fake radii: 0.5 for both 10 and 10.5, 0.5 for 0.5 -> its nearest fake is
    # 10, radius 9.5).
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0], [10.5]])
    m = M.manifold_metrics(real, fake, k=1)
    assert m["precision"] == pytest.approx(1 / 3)  # only 0.5 lies in a real ball
    # Recall: a real point is covered when within a fake ball: 0.5's ball (radius 9.5) holds all four.
    assert m["recall"] == 1.0
    # Density: 0.5 lies in 2 real balls (0 and 1), the others in none: 2 / (1 * 3).
    assert m["density"] == pytest.approx(2 / 3)
    # Coverage: real balls holding a fake: those of 0 and 1 -> 2 of 4.
    assert m["coverage"] == 0.5
    # Mode dropping: fakes copied from one real point keep precision but lose recall and coverage.
    collapsed = M.manifold_metrics(real, np.array([[0.0], [0.01], [0.02]]), k=1)
    # (coverage: the balls of 0 and of 1, radius 1, hold them; recall: fake radii are 0.01, so only real 0 is near)
    assert collapsed["precision"] == 1.0 and collapsed["coverage"] == 0.5 and collapsed["recall"] == 0.25
    with pytest.raises(ValueError, match="more than k"):
        M.manifold_metrics(real[:1], fake, k=1)


def test_reference_key_holds_the_cfg_so_a_changed_cfg_misses_the_cache(teacher, evaluator, tmp_path, monkeypatch) -> None:
    k1 = R.reference_key(teacher, evaluator, per_class=2, steps=R.REFERENCE_STEPS, guidance=1.0, seed=0)
    k2 = R.reference_key(teacher, evaluator, per_class=2, steps=R.REFERENCE_STEPS, guidance=2.0, seed=0)
    assert k1 != k2
    calls = []

    def fake_generate(teacher, labels, **kw):
        calls.append(kw["guidance"])
        g = torch.Generator().manual_seed(int(kw["guidance"] * 10))
        return torch.rand((len(labels), 3, 32, 32), generator=g) * 2 - 1

    monkeypatch.setattr(R, "generate", fake_generate)
    at1 = R.teacher_reference(teacher, evaluator, per_class=2, guidance=1.0, cache_dir=tmp_path, progress=False)
    R.teacher_reference(teacher, evaluator, per_class=2, guidance=1.0, cache_dir=tmp_path, progress=False)
    assert calls == [1.0]  # cached
    at2 = R.teacher_reference(teacher, evaluator, per_class=2, guidance=2.0, cache_dir=tmp_path, progress=False)
    assert calls == [1.0, 2.0] and not np.allclose(at1[0], at2[0])  # a changed CFG missed the cache


def test_copy_report_flags_samples_that_copy_the_held_out_digits() -> None:
    from trainer.toy.memorisation import copy_report

    g = torch.Generator().manual_seed(0)
    held = torch.randn(50, 4, generator=g)
    real = torch.randn(200, 4, generator=g)
    copies = held[:40] + 1e-3 * torch.randn(40, 4, generator=g)
    rep = copy_report(copies, copies, real, real, held, held)
    assert rep["features"]["near_copy_fraction_samples"] == 1.0
    assert rep["features"]["near_copy_fraction_real"] == pytest.approx(0.05, abs=0.01)
    fresh = copy_report(real[:100], real[:100], real[100:], real[100:], held, held)
    assert fresh["pixels"]["near_copy_fraction_samples"] < 0.2


# ----------------------------------------------------------------------------------------------- rebuild paths


def test_train_teacher_smoke(tmp_path) -> None:
    """The rebuild path end to end, a few steps: a loadable pipeline folder with provenance."""
    from trainer.toy.teacher import train_teacher
    from trainer.toy.teacher_train import Recipe

    out = tmp_path / "teacher"
    recipe = Recipe(vae_steps=2, vae_batch=4, steps=2, batch=4, subset=64, eval_samples=8)
    summary = train_teacher(out, recipe, progress=False, command="x")
    assert (out / "model_index.json").is_file() and (out / "training.json").is_file()
    assert summary["metrics"]["unet_steps_done"] == 2 and summary["metrics"]["scaling_factor"] > 0
    t = load_teacher(ModelSpec(teacher=str(out)))
    assert torch.isfinite(t.decode(torch.zeros(1, 4, 8, 8))).all()


def test_train_evaluator_smoke(tmp_path) -> None:
    meta = E.train_evaluator(tmp_path, max_steps=2, progress=False)
    assert meta["steps"] == 2 and 0.0 <= meta["test_accuracy"] <= 1.0
    loaded = E.DigitsEvaluator.load(tmp_path)
    assert loaded.features(torch.zeros(2, 3, 32, 32)).shape == (2, E.FEATURE_DIM)


def test_shipped_reward_prefers_clean_right_class_digits_on_held_out_pairs(teacher) -> None:
    """The toy LRM (trainer/toy/digits_reward) ranks held-out pairs it never saw, low noise best, t=999 near chance."""
    from trainer.data import DigitsDataset
    from trainer.reward import load_lrm
    from trainer.toy import HERE
    from trainer.toy.reward import encode_pairs, make_pairs, pair_accuracy, split

    folder = HERE / "digits_reward"
    report = json.loads((folder / "report.json").read_text())
    assert report["held_out_accuracy_after"]["acc/t1"] > 0.95
    lrm = load_lrm(folder, base=teacher.pipe).eval()
    ds = DigitsDataset(teacher.resolution)
    labels = torch.tensor(ds.labels)
    _, held_out = split(len(labels), seed=0)  # the same split the shipped model was trained without
    gen = torch.Generator().manual_seed(123)
    pairs = encode_pairs(teacher, make_pairs(ds.images[held_out], labels[held_out], 64, gen), gen)
    acc = pair_accuracy(lrm, teacher.param, pairs, timesteps=(1, 499))
    assert acc["acc/t1"] >= 0.9 and acc["acc/t499"] >= 0.75, acc


def test_demo_grid_names_each_row_in_a_left_margin(tmp_path):
    from PIL import Image

    from flashjob.digits_scoring import GRID_ROWS, save_grid

    save_grid(torch.zeros(30, 3, 32, 32), tmp_path / "grid.png")  # mid-grey images
    img = np.asarray(Image.open(tmp_path / "grid.png").convert("L"))
    assert img.shape[0] == 3 * 64 and img.shape[1] > 10 * 64  # 2x digits plus the margin
    margin = img[:, : img.shape[1] - 10 * 64]
    for i in range(len(GRID_ROWS)):
        band = margin[i * 64:(i + 1) * 64]
        assert (band < 100).any(), f"no label text in row {i}"  # black text on white
    assert (img[:, -10 * 64:] == 128).mean() > 0.9, "the digits keep their own pixels"
