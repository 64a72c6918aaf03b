"""bench/device: the wheels bench/device/prepare puts in .whl/ are all that the GPU check needs beyond the GPU
image, so `bench/device/run` works on an offline GPU machine.

This venv has diffusers, pydantic, torchao, ... installed, so a dry run here would pass with or without the
bundle. The tests below build an interpreter that sees only the GPU image's packages (bench/device/
image-packages.txt, linked from this venv's copies; bench/device/bundle.py image-site) and none of the bundle's,
show that the bundle's modules do not import there, then install .whl/ into an empty target with
`--no-index --no-deps` and run `bench/device/run --dry-run` from a clean environment: every import of every
step (stage 1 and 2 on torchao's 8-bit AdamW, serving, the plans) must then come from the image or the bundle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WHL = REPO / ".whl"
sys.path.insert(0, str(REPO / "bench" / "device"))

import bundle  # noqa: E402

BUNDLED_MODULES = ("diffusers", "pydantic", "pydantic_core", "pydantic_settings", "segment_anything", "torchao",
                   "dotenv", "annotated_types", "typing_inspection")


def _need_bundle() -> None:
    if WHL.is_dir() and any(WHL.glob("*.whl")):
        return
    if os.environ.get("CI") == "true" or os.environ.get("FLASHDMD_REQUIRE_DEVICE_BUNDLE") == "1":
        pytest.fail(".whl/ is missing under CI: .ci/run runs bench/device/prepare before the tests")
    pytest.skip("no .whl/ here: run bench/device/prepare (it needs a package registry)")


def _clean_env(**extra: str) -> dict[str, str]:
    """No PYTHONPATH, no virtualenv: only what the command is given."""
    keep = {k: os.environ[k] for k in ("HOME", "TMPDIR", "LANG") if k in os.environ}
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", **keep, **extra}


@pytest.fixture(scope="module")
def image_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("gpu-image")
    bundle.image_site(root / "site")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "env")], check=True)
    python = str(root / "env" / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True, env=_clean_env()).stdout.strip()
    (Path(purelib) / "gpu-image.pth").write_text(str(root / "site") + "\n")
    return python


def test_the_emulated_image_has_torch_but_none_of_the_bundle(image_python: str) -> None:
    have = subprocess.run([image_python, "-c", "import torch, accelerate, transformers, pip"],
                          capture_output=True, text=True, env=_clean_env())
    assert have.returncode == 0, have.stderr[-1000:]
    for module in BUNDLED_MODULES:
        proc = subprocess.run([image_python, "-c", f"import {module}"], capture_output=True, text=True,
                              env=_clean_env(), cwd="/")
        assert proc.returncode != 0 and "No module named" in proc.stderr, f"{module} leaks into the image"


def test_the_bundle_is_the_pinned_list_and_fits_the_transfer_limit() -> None:
    _need_bundle()
    assert bundle.check(WHL) == []
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    tree = sum((REPO / f).stat().st_size for f in tracked.decode().split("\0") if f and (REPO / f).is_file())
    wheels = sum(p.stat().st_size for p in WHL.glob("*.whl"))
    assert tree + wheels < 64 * 2**20, f"tree {tree / 2**20:.1f} MiB + wheels {wheels / 2**20:.1f} MiB"


@pytest.mark.slow
def test_dry_run_passes_from_an_empty_target_installed_offline(image_python: str, tmp_path: Path) -> None:
    _need_bundle()
    target, out = tmp_path / "site", tmp_path / "out"
    target.mkdir()
    proc = subprocess.run(["bash", str(REPO / "bench" / "device" / "run"), "--dry-run", "--target", str(target),
                           "--out", str(out)], capture_output=True, text=True, timeout=1800, cwd=tmp_path,
                          env=_clean_env(PYTHON=image_python))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:] + (out / "log.txt").read_text()[-4000:]
    installed = {bundle.canonical(p.name.split("-")[0]) for p in target.glob("*.dist-info")}
    assert installed == set(bundle.pinned())
    device = json.loads((out / "device.json").read_text())
    assert device["dry_run"] is True
    assert all(s["rc"] == 0 and not s["timed_out"] for s in device["steps"].values()), device["steps"]
    s1 = json.loads((out / "stage1.json").read_text())["results"]["s1-all"]
    assert "error" not in s1 and s1["spec"] == {**s1["spec"], "adamw8bit_backend": "torchao", "grad_accum": 64}
    assert [row["micro_batches"] for row in s1["accumulation"]] == [2, 3]
    ext = s1["accumulation_summary"]
    assert ext["kept_per_micro_batch_gib"] * 2**30 >= 4 * 2 * 3 * 64 * 64, "reals and fakes at 64² in fp32"
    t2, t3 = (row["s"] for row in s1["accumulation"])
    assert ext["s_per_gen_update"] == pytest.approx(t3 + 61 * (t3 - t2))
    assert s1["plan_rows"]["text encoders"] == 0, "the preset's text cache reached the plan"
    s2 = json.loads((out / "stage2.json").read_text())["results"]["s2-all"]
    assert "error" not in s2 and s2["timing"]["iterations"] == 5
    serve = json.loads((out / "serve.json").read_text())["results"]["options"]
    assert [row["config"] for row in serve] == ["+channels-last"] and serve[0]["batch1_s"] > 0
    for plan in device["plans"].values():
        assert "error" not in plan and plan["rc"] in (0, 1), plan
