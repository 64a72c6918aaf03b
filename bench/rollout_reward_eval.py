"""How well each digits reward ranks the generator's own candidates at every RL step.

Fresh held-out groups (a seed the shipped reward never saw), built as stage 2 builds them
(flashjob/rollout_reward.py: k = 4 candidates at the step after the RL step, each valued by the judge's mean
final reward over C rollouts with common random numbers); one best-vs-worst pair per group. For each RL step of
the K = 4 schedule (999, 749 and 499: the last is what `rl.timesteps: all` adds) it reports the pair accuracy of the
judge (trainer/toy/digits_reward) and of the rollout-trained reward (trainer/toy/digits_reward_rollout), with a
95% Wilson interval, and how often an independent valuation agrees with the labels (the label noise).

    python bench/rollout_reward_eval.py --generator runs/bench-quality/flash-ttur1-k4-s0

Writes bench/results/rollout_reward_eval.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from _common import REPO, command_line, format_table, machine_info, write_json

RESULTS = REPO / "bench" / "results"


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion k/n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generator", default=str(REPO / "runs" / "bench-quality" / "flash-ttur1-k4-s0"),
                    help="stage-1 checkpoint or run directory (default: the one the shipped reward was trained on)")
    ap.add_argument("--groups", type=int, default=400, help="held-out groups (pairs) per RL step")
    ap.add_argument("--continuations", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7, help="not the training seed (0) of the shipped reward")
    ap.add_argument("--out", type=Path, default=RESULTS / "rollout_reward_eval")
    args = ap.parse_args()
    if not 1 <= args.groups <= 100_000 or not 1 <= args.continuations <= 64:
        ap.error("--groups must be in [1, 100000] and --continuations in [1, 64]")

    import torch

    from flashjob.rollout_reward import generator_pairs, rollout_accuracy
    from inference.pipeline import load_pipeline
    from trainer.reward import load_lrm
    from trainer.rl_loop import resolve_init
    from trainer.toy import HERE

    torch.set_num_threads(1)
    t0 = time.time()
    ckpt = resolve_init(args.generator)
    pipe = load_pipeline(ckpt)
    models = {name: load_lrm(HERE / name, base=pipe.teacher.pipe).eval()
              for name in ("digits_reward", "digits_reward_rollout")}
    gen = torch.Generator().manual_seed(args.seed)
    rows, results = [], {}
    for t in pipe.info.timesteps_for(None)[:-1]:
        pairs = generator_pairs(pipe, models["digits_reward"], args.groups, t, 4, args.continuations, gen,
                                second_valuation=True)
        res = {"s": int(pairs["s"][0]), "agree": int(pairs["agree"].sum()) / args.groups}
        for name, lrm in models.items():
            k = round(rollout_accuracy(lrm, pairs) * args.groups)
            res[name] = {"accuracy": k / args.groups, "wilson95": wilson(k, args.groups)}
        results[str(t)] = res
        rows.append([t, res["s"], *(f"{res[m]['accuracy']:.3f} [{res[m]['wilson95'][0]:.3f}, "
                                   f"{res[m]['wilson95'][1]:.3f}]" for m in models), f"{res['agree']:.3f}"])
        print(rows[-1], flush=True)
    md = "\n".join([
        "# The digits rewards on the generator's own candidates", "", f"Command: `{command_line()}`", "",
        f"Generator: `{ckpt}`; {args.groups} held-out groups per RL step (seed {args.seed}), k = 4, "
        f"C = {args.continuations}. Cells: pair accuracy [95% Wilson interval].", "",
        format_table(["RL step", "candidates at", "judge (digits_reward)", "rollout-trained (digits_reward_rollout)",
                      "independent valuation agrees"], rows)]) + "\n"
    write_json(args.out.with_name(args.out.name + ".json"), {
        "command": command_line(), "machine": machine_info(), "generator": str(ckpt), "groups": args.groups,
        "continuations": args.continuations, "seed": args.seed, "results": results,
        "total_s": round(time.time() - t0, 1)})
    args.out.with_name(args.out.name + ".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
