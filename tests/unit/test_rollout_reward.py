"""The generator-rollout pairs of the stage-2 reward (flashjob/rollout_reward.py), on analytic denoisers."""

from __future__ import annotations

import math

import pytest
import torch

from flashjob.rollout_reward import candidate_values, rollout_accuracy, rollout_pairs
from trainer.schedules import EpsDDPM
from trainer.toy.prompts import digit_prompt

S = [999, 749, 499, 249]
PARAM = EpsDDPM(torch.linspace(0.99, 0.01, 1000, dtype=torch.float64))  # abar_t, falling with t


def identity(z: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return z  # "x0 = z_t": every later latent is a linear function of the candidate and the shared noise


def mean_judge(lat: torch.Tensor, prompts) -> torch.Tensor:  # noqa: ANN001
    return lat.flatten(1).mean(1)


def a(t: int) -> float:
    return math.sqrt(float(PARAM.alphas_cumprod[t]))


def test_common_random_numbers_make_value_gaps_exact():
    # With x0 = z and judge = mean, a candidate c at S[1] ends at a(499) a(249) c + (noise terms shared by the
    # group): the gap between two candidates' values is a(499) a(249) (mean c_j - mean c_i), whatever the noise.
    cands = torch.randn(3, 4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    v1 = candidate_values(identity, mean_judge, cands, ["p"] * 3, S, 1, 2, PARAM, torch.Generator().manual_seed(1))
    v2 = candidate_values(identity, mean_judge, cands, ["p"] * 3, S, 1, 5, PARAM, torch.Generator().manual_seed(2))
    means = cands.flatten(2).mean(2)  # [3, 4]
    want = a(499) * a(249) * (means - means[:, :1])
    assert torch.allclose(v1 - v1[:, :1], want, atol=1e-5)
    assert torch.allclose(v2 - v2[:, :1], want, atol=1e-5)
    assert not torch.allclose(v1, v2)  # the shared noise itself differs between the two valuations


def test_candidates_from_the_last_step_continue_nowhere():
    cands = torch.randn(2, 3, 1, 2, 2)
    v = candidate_values(identity, mean_judge, cands, ["p"] * 2, S, 3, 1, PARAM, torch.Generator())
    assert torch.allclose(v, cands.flatten(2).mean(2))  # the last step is deterministic: value = judge(x0)


def test_rollout_pairs_pick_best_and_worst_at_the_next_step():
    gen = torch.Generator().manual_seed(3)
    pairs = rollout_pairs(identity, mean_judge, torch.tensor([1, 7, 3]), (1, 2, 2), S, 999, 4, 2, PARAM, gen,
                          second_valuation=True)
    assert pairs["prompt"] == [digit_prompt(1), digit_prompt(7), digit_prompt(3)]
    assert pairs["s"].tolist() == [749, 749, 749]
    assert pairs["winner"].shape == (3, 1, 2, 2)
    assert (pairs["gap"] >= 0).all()
    # Under the identity G the value is monotone in the candidate's mean: the winner has the larger mean, and
    # an independent valuation (common random numbers again) agrees on every pair.
    assert (pairs["winner"].flatten(1).mean(1) >= pairs["loser"].flatten(1).mean(1)).all()
    assert pairs["agree"].all()
    with pytest.raises(ValueError, match="deterministic last one"):
        rollout_pairs(identity, mean_judge, torch.tensor([1]), (1, 2, 2), S, 249, 4, 1, PARAM, gen)


def test_train_rollout_reward_end_to_end_on_a_two_step_generator(tmp_path):
    """A real (2-update) stage-1 checkpoint of the digits teacher: pairs, fine-tuning, report and a loadable LRM."""
    import json

    from flashjob.demo import DEMO_SPEC
    from flashjob.rollout_reward import train_rollout_reward
    from trainer.jobspec import parse_spec
    from trainer.loop import train
    from trainer.reward import load_lrm
    from trainer.sink import JsonlSink

    spec = json.loads(json.dumps(DEMO_SPEC))
    spec["train"].update(max_steps=2, checkpoint_every=2, sample_every=2, batch_size=4, num_samples=2)
    run = tmp_path / "stage1"
    train(parse_spec(spec), JsonlSink(run), run_dir=run)
    ckpt = run / "checkpoints" / "step-00000002"
    with pytest.raises(ValueError, match="deterministic last one"):
        train_rollout_reward(ckpt, None, groups=2, test_groups=2, rl_steps=(999, 249), steps=1)
    out = tmp_path / "lrm"
    report = train_rollout_reward(ckpt, out, groups=6, test_groups=5, continuations=2, steps=2, batch_size=4,
                                  original_pairs=(16, 8))
    after = report["held_out_accuracy_after"]
    assert set(after) >= {"acc/rl999_at749", "acc/rl749_at499", "original/t1", "original/t999"}
    # 5 held-out pairs per RL step: every accuracy is a multiple of 1/5; the original ones of 1/8.
    for key in ("acc/rl999_at749", "acc/rl749_at499"):
        assert round(after[key] * 5, 4) == int(round(after[key] * 5))
    assert set(report["label_agreement"]) == {"rl999", "rl749"}
    assert all(0.0 <= v <= 1.0 for v in report["label_agreement"].values())
    assert json.loads((out / "report.json").read_text())["steps"] == 2
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2
    lrm = load_lrm(out)
    assert lrm.score(torch.zeros(2, 4, 8, 8), torch.tensor([749, 499]), ["a", "b"]).shape == (2,)


def test_shipped_rollout_reward_ranks_candidates_and_still_ranks_clean_digits():
    """trainer/toy/digits_reward_rollout: its report meets the study's bars on the generator's own candidates,
    with labels an independent valuation reproduces, and it still ranks held-out real-vs-degraded pairs."""
    import json

    from trainer.data import DigitsDataset
    from trainer.jobspec import ModelSpec
    from trainer.models import load_teacher
    from trainer.reward import load_lrm
    from trainer.toy import HERE
    from trainer.toy.reward import encode_pairs, make_pairs, pair_accuracy, split

    folder = HERE / "digits_reward_rollout"
    report = json.loads((folder / "report.json").read_text())
    after, before = report["held_out_accuracy_after"], report["held_out_accuracy_before"]
    assert after["acc/rl999_at749"] >= 0.75 and after["acc/rl749_at499"] >= 0.90
    assert after["acc/rl999_at749"] > before["acc/rl999_at749"] and after["acc/rl749_at499"] > before["acc/rl749_at499"]
    assert min(report["label_agreement"].values()) >= 0.95
    teacher = load_teacher(ModelSpec(teacher="toy:digits"))
    lrm = load_lrm(folder, base=teacher.pipe).eval()
    ds = DigitsDataset(teacher.resolution)
    labels = torch.tensor(ds.labels)
    _, held_out = split(len(labels), seed=0)
    gen = torch.Generator().manual_seed(321)
    pairs = encode_pairs(teacher, make_pairs(ds.images[held_out], labels[held_out], 64, gen), gen)
    acc = pair_accuracy(lrm, teacher.param, pairs, timesteps=(1, 249))
    assert acc["acc/t1"] >= 0.9 and acc["acc/t249"] >= 0.85, acc
    # rollout_accuracy on the real model: latents already at their own level s; a swapped pair set scores
    # 1 - accuracy, and the chunking does not change the count.
    noisy = {"prompt": pairs["prompt"][:10], "s": torch.full((10,), 499),
             "winner": torch.randn(10, *pairs["winner"].shape[1:], generator=gen), "loser": pairs["loser"][:10]}
    acc_r = rollout_accuracy(lrm, noisy)
    assert rollout_accuracy(lrm, noisy, chunk=3) == acc_r
    assert acc_r * 10 == round(acc_r * 10)
    assert rollout_accuracy(lrm, {**noisy, "winner": noisy["loser"], "loser": noisy["winner"]}) == pytest.approx(1 - acc_r)
    with torch.no_grad():
        want = (lrm.score(noisy["winner"], noisy["s"], noisy["prompt"]) >
                lrm.score(noisy["loser"], noisy["s"], noisy["prompt"])).float().mean().item()
    assert acc_r == pytest.approx(want)


def test_cli_names_the_bad_option(tmp_path):
    import json

    from click.testing import CliRunner

    from api.cli import cli

    ckpt = tmp_path / "step-00000002"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text(json.dumps({"step": 2, "timesteps": S}))
    cases = [(["--generator", str(tmp_path / "missing")], "--generator"),
             (["--generator", str(ckpt), "--rl-steps", "999,x"], "--rl-steps"),
             (["--generator", str(ckpt), "--rl-steps", "999,249"], "deterministic last one"),
             (["--generator", str(ckpt), "--groups", "0"], "--groups"),
             (["--generator", str(ckpt), "--lr", "0"], "--lr")]
    for args, needle in cases:
        res = CliRunner().invoke(cli, ["toy", "train-rollout-reward", *args])
        assert res.exit_code == 2 and needle in res.output, (args, res.output)
