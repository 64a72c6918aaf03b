"""Eval jobs (kind: eval): the spec, the pluggable scorers on tiny random models, and run_eval on real checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from inference.evaluate import checkpoints_to_score, read_prompts, run_eval
from inference.scorers import IMAGEREWARD_MEAN, IMAGEREWARD_STD, Preprocess, build_scorer, to_uint8
from inference.testing import make_checkpoint
from inference.tiny_scorers import tiny_clip_dir, tiny_fid_detector, tiny_imagereward_dir
from trainer.errors import InputError
from trainer.jobspec import ScorerSpec, SpecError, parse_spec, total_steps
from trainer.sink import JsonlSink
from trainer.toy import TEACHER_DIR

PROMPTS = ["a handwritten digit one", "a photo of a cat", "a red dog", "the digit two", "a dog"]


@pytest.fixture(scope="module")
def scorer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    return {"clip": tiny_clip_dir(root / "clip"), "imagereward": tiny_imagereward_dir(root / "ir"),
            "fid": tiny_fid_detector(root / "inception.pt")}


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------------------ spec


def spec(**section):
    return {"kind": "eval", "eval": {"checkpoint": "/ck", **section}}


def test_eval_spec_defaults_and_errors_name_the_field():
    cfg = parse_spec(spec())
    assert cfg.eval.protocol == "digits" and cfg.eval.steps == "latest" and total_steps(cfg) == 1
    assert total_steps(parse_spec(spec(steps=[100, 200, 300]))) == 3
    for bad, words in [
        (spec(job="j1"), "exactly one of eval.checkpoint and eval.job"),
        (spec(protocol="prompts", scorers=[{"kind": "clip", "path": "/c"}]), "eval.prompts is required"),
        (spec(protocol="prompts", prompts="/p.txt"), "at least one scorer"),
        (spec(scorers=[{"kind": "fid", "path": "/i.pt"}]), "eval.scorers.0: reference is required"),
        (spec(scorers=[{"kind": "clip", "path": "/c", "reference": "/r.npz"}]), "only used by the fid scorer"),
        (spec(scorers=[{"kind": "clip", "path": "/a"}, {"kind": "clip", "path": "/b"}]), "duplicate names"),
        (spec(scorers=[{"kind": "aesthetic", "path": "/a"}]), "eval.scorers.0.kind"),
        (spec(per_class=1), "eval.per_class"),
    ]:
        with pytest.raises(SpecError, match=words):
            parse_spec(bad)


# -------------------------------------------------------------------------------------------------- scorers


def test_preprocess_resizes_the_shortest_edge_crops_and_normalises(scorer_dirs):
    pre = Preprocess(scorer_dirs["clip"], 32)  # shortest edge 40, centre crop 32
    x = torch.zeros(1, 3, 20, 30)  # mid-grey: 0.5 after [-1, 1] -> [0, 1]
    out = pre(x)
    assert out.shape == (1, 3, 32, 32)
    expected = (0.5 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711])
    assert torch.allclose(out[0, :, 5, 5], expected, atol=1e-5)


def test_clip_family_scores_match_the_models_own_logits(scorer_dirs):
    from transformers import CLIPModel

    imgs = images(5)
    model = CLIPModel.from_pretrained(scorer_dirs["clip"]).eval()
    scorer = build_scorer(ScorerSpec(kind="clip", path=str(scorer_dirs["clip"])))
    tok = scorer.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():  # CLIPModel.forward: logits_per_image = exp(logit_scale) * cosine, all pairs
        logits = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                       pixel_values=Preprocess(scorer_dirs["clip"], 32)(imgs)).logits_per_image.diagonal()
    cos = logits / model.logit_scale.exp()
    expected = {"clip": 100 * cos.clamp(min=0), "pickscore": logits, "hpsv2": cos}
    for kind, want in expected.items():
        s = build_scorer(ScorerSpec(kind=kind, path=str(scorer_dirs["clip"])))
        s.update(imgs[:2], PROMPTS[:2])  # two batches accumulate
        s.update(imgs[2:], PROMPTS[2:])
        got = s.result()
        assert got[kind] == pytest.approx(float(want.double().mean()), rel=1e-4, abs=1e-5), kind
        assert got[f"{kind}_std"] == pytest.approx(float(want.double().std()), rel=1e-3, abs=1e-5), kind
        s.reset()
        assert s.result() == {}


def test_imagereward_normalises_the_head_output(scorer_dirs, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(scorer_dirs["imagereward"], tmp_path / "ir")
    head = load_file(str(folder / "imagereward_head.safetensors"))
    head["layers.7.weight"].zero_()  # the last Linear(16 -> 1) outputs its bias b whatever the input
    head["layers.7.bias"].fill_(1.25)
    save_file(head, str(folder / "imagereward_head.safetensors"))
    s = build_scorer(ScorerSpec(kind="imagereward", path=str(folder), name="ir"))
    s.update(images(3), PROMPTS[:3])
    assert s.result()["ir"] == pytest.approx((1.25 - IMAGEREWARD_MEAN) / IMAGEREWARD_STD, abs=1e-6)
    live = build_scorer(ScorerSpec(kind="imagereward", path=str(scorer_dirs["imagereward"])))
    a, b = live.raw(images(1), ["a red dog"]), live.raw(images(1), ["the digit two"])
    assert not torch.allclose(a, b), "the prompt reaches the score through cross-attention"
    (folder / "imagereward_head.safetensors").unlink()
    with pytest.raises(InputError, match="imagereward_head.safetensors"):
        build_scorer(ScorerSpec(kind="imagereward", path=str(folder)))


def test_fid_against_npz_statistics_and_an_image_folder(scorer_dirs, tmp_path):
    det = torch.jit.load(str(scorer_dirs["fid"]))
    imgs = images(12, seed=3)
    feats = det(to_uint8(imgs), return_features=True).double().numpy()
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    shift = np.arange(mu.size) / 10.0
    np.savez(tmp_path / "ref.npz", mu=mu + shift, sigma=sigma)
    s = build_scorer(ScorerSpec(kind="fid", path=str(scorer_dirs["fid"]), reference=str(tmp_path / "ref.npz")))
    s.update(imgs[:5], PROMPTS)
    s.update(imgs[5:], PROMPTS)
    # Same covariance: FD = ||mu_a - mu_b||^2 exactly.
    assert s.result()["fid"] == pytest.approx(float((shift**2).sum()), rel=1e-6)
    folder = tmp_path / "ref_images"
    folder.mkdir()
    for i, arr in enumerate(to_uint8(imgs).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(arr).save(folder / f"{i:03d}.png")  # PNG is lossless: the same uint8 pixels
    s = build_scorer(ScorerSpec(kind="fid", path=str(scorer_dirs["fid"]), reference=str(folder)))
    s.update(imgs, PROMPTS)
    assert abs(s.result()["fid"]) < 1e-6
    with pytest.raises(InputError, match="reference"):
        build_scorer(ScorerSpec(kind="fid", path=str(scorer_dirs["fid"]), reference=str(tmp_path / "nope.npz")))


def test_missing_weights_are_input_errors_naming_the_scorer(tmp_path):
    with pytest.raises(InputError, match=r"eval.scorers \(clip\).path"):
        build_scorer(ScorerSpec(kind="clip", path=str(tmp_path / "absent")))
    (tmp_path / "junk").mkdir()
    with pytest.raises(InputError, match="not a CLIPModel folder"):
        build_scorer(ScorerSpec(kind="pickscore", path=str(tmp_path / "junk")))


# ------------------------------------------------------------------------------------------------ run_eval


def test_prompts_and_checkpoint_selection(tmp_path, tiny_dir):
    (tmp_path / "p.jsonl").write_text('{"caption": "a cat"}\n\n{"prompt": "a dog"}\n{"caption": "x"}\n')
    assert read_prompts(str(tmp_path / "p.jsonl"), 2) == ["a cat", "a dog"]
    (tmp_path / "bad.jsonl").write_text('{"image": "x.png"}\n')
    with pytest.raises(InputError, match="line 1 has no caption"):
        read_prompts(str(tmp_path / "bad.jsonl"), None)
    run = tmp_path / "run"
    for step in (2, 4, 6):
        make_checkpoint(run, "sdxl", tiny_dir("sdxl"), step=step)
    names = lambda cks: [c.name for c in cks]  # noqa: E731
    assert names(checkpoints_to_score(str(run), "latest")) == ["step-00000006"]
    assert names(checkpoints_to_score(str(run), "all")) == ["step-00000002", "step-00000004", "step-00000006"]
    assert names(checkpoints_to_score(str(run), [4, 2])) == ["step-00000004", "step-00000002"]
    with pytest.raises(InputError, match=r"steps \[5\]"):
        checkpoints_to_score(str(run), [5])


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_eval_prompts_protocol_scores_every_checkpoint(tmp_path, tiny_dir, scorer_dirs):
    run = tmp_path / "run"
    for step, seed in ((3, 0), (9, 1)):
        make_checkpoint(run, "sdxl", tiny_dir("sdxl"), step=step, seed=seed)
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    np.savez(tmp_path / "ref.npz", mu=np.zeros(8), sigma=np.eye(8))

    def evaluate(out, batch):
        cfg = parse_spec({"kind": "eval", "eval": {
            "checkpoint": str(run), "steps": "all", "protocol": "prompts", "prompts": str(tmp_path / "p.txt"),
            "batch_size": batch, "grid": 4, "scorers": [
                {"kind": "clip", "path": str(scorer_dirs["clip"])},
                {"kind": "fid", "path": str(scorer_dirs["fid"]), "reference": str(tmp_path / "ref.npz")}]}})
        sink = JsonlSink(out)
        assert run_eval(cfg, sink, run_dir=out) == 2
        sink.close()
        return read_metrics(out)

    rows = evaluate(tmp_path / "e1", batch=2)
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["metrics"]["eval/checkpoint_step"] for r in rows] == [3.0, 9.0]
    for r in rows:
        assert 0 <= r["metrics"]["eval/clip"] <= 100 and r["metrics"]["eval/fid"] > 0
    assert rows[0]["metrics"]["eval/clip"] != rows[1]["metrics"]["eval/clip"], "each checkpoint is its own model"
    # Image j always uses seed j: the batch size does not change what is scored.
    again = evaluate(tmp_path / "e2", batch=3)
    for a, b in zip(rows, again, strict=True):
        assert a["metrics"]["eval/clip"] == pytest.approx(b["metrics"]["eval/clip"], rel=1e-4)
        assert a["metrics"]["eval/fid"] == pytest.approx(b["metrics"]["eval/fid"], rel=1e-4)
    assert (tmp_path / "e1" / "samples" / "step-00000002.png").is_file()
    result = json.loads((tmp_path / "e1" / "eval.json").read_text())
    assert [r["step"] for r in result["results"]] == [3, 9]


def test_run_eval_digits_protocol_and_its_teacher_check(tmp_path, tiny_dir):
    ck = make_checkpoint(tmp_path / "digits", "sdxl", TEACHER_DIR, step=5)
    cfg = parse_spec({"kind": "eval", "eval": {"checkpoint": str(ck), "per_class": 3, "grid": 0}})
    sink = JsonlSink(tmp_path / "e")
    run_eval(cfg, sink, run_dir=tmp_path / "e")
    sink.close()
    (row,) = read_metrics(tmp_path / "e")
    m = row["metrics"]
    assert {"eval/fd_real", "eval/fd_teacher", "eval/accuracy", "eval/diversity"} <= set(m)
    assert 0 <= m["eval/accuracy"] <= 1 and m["eval/fd_real"] > 0 and m["eval/checkpoint_step"] == 5
    other = make_checkpoint(tmp_path / "tiny", "sdxl", tiny_dir("sdxl"))
    cfg = parse_spec({"kind": "eval", "eval": {"checkpoint": str(other), "per_class": 3}})
    with pytest.raises(InputError, match="eval.protocol: digits scores checkpoints distilled from the digits"):
        run_eval(cfg, JsonlSink(tmp_path / "e3"), run_dir=tmp_path / "e3")


def test_flashdmd_eval_runs_eval_specs_only(tmp_path, tiny_dir):
    import subprocess
    import sys

    ck = make_checkpoint(tmp_path / "digits", "sdxl", TEACHER_DIR, step=5)
    spec = tmp_path / "e.yaml"
    spec.write_text(f"kind: eval\neval:\n  checkpoint: {ck}\n  per_class: 2\n  grid: 4\n")
    run = subprocess.run([sys.executable, "-m", "api", "eval", str(spec), "--run-dir", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "eval/fd_real" in (tmp_path / "out" / "metrics.jsonl").read_text()
    train = tmp_path / "t.yaml"
    train.write_text("model: {teacher: 'tiny:sdxl'}\ndata: {builtin: digits}\n")
    run = subprocess.run([sys.executable, "-m", "api", "eval", str(train)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "kind: distill spec" in run.stderr
