"""flashjob/latency.py: the demo's like-for-like latency rows and the HTTP overhead line."""

from __future__ import annotations

import pytest

from flashjob.latency import ROWS, report, time_samplers
from inference.testing import make_checkpoint
from trainer.toy import TEACHER_DIR


@pytest.mark.skipif(not (TEACHER_DIR / "model_index.json").is_file(), reason="the digits teacher is not built")
def test_teacher_and_student_are_timed_alike_and_the_table_takes_the_batched_numbers(tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenMP threads spin-waiting on a shared CPU stretch seconds into minutes
    try:
        _check(tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)


def _check(tmp_path, capsys):  # noqa: ANN001, ANN202
    ckpt = make_checkpoint(tmp_path / "run", "sdxl", TEACHER_DIR, resolution=32)
    rows = time_samplers(ckpt, batch=4, single=2)
    assert list(rows) == list(ROWS)
    assert all(r["batched_s"] > 0 and r["batch1_s"] > 0 for r in rows.values())
    # The summary's own table: rows it has get the like-for-like number, others are not invented.
    summary = {"table": {"teacher 50-step CFG": {"latency_s": -1.0}, "student 4-step": {"latency_s": -1.0},
                         "teacher 4-step DDIM": {"latency_s": 7.0}}}
    assert rows["student 4-step"]["service_batch1_s"] > 0  # the HTTP line's in-process baseline
    out = report(summary, rows, http_p50=rows["student 4-step"]["service_batch1_s"] + 0.05, batch=4)
    assert summary["table"]["student 4-step"]["latency_s"] == rows["student 4-step"]["batched_s"]
    assert summary["table"]["teacher 50-step CFG"]["latency_s"] == rows["teacher 50-step CFG"]["batched_s"]
    assert summary["table"]["teacher 4-step DDIM"]["latency_s"] == 7.0 and "teacher 4-step renoise" not in summary["table"]
    assert out["http"]["overhead_s"] == pytest.approx(0.05)
    assert "HTTP /generate overhead" in capsys.readouterr().out
