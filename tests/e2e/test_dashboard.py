"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver, installed by .ci/run),
driven by Selenium against `flashdmd up` on a temp data dir, as a user would click through it.

One tiny job is trained (4 steps); a second one is cancelled while it waits. The job page is then checked
piece by piece: grouped charts (health metrics and a guard event are added to the service's own database, as
the trainer's collapse guard would record them, with a resume), smoothing, log scale, pin/hide, captions,
zoom, the system panel, the generate form, clone, the YAML spec editor and compare by name. Screenshots of
the jobs, job and compare pages go to tmp/artifacts/ (the README's docs/dashboard-*.png are copies of them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

# On a developer's machine without the browser stack the test skips; under CI (.ci/run installs selenium,
# chromium and chromium-driver) a missing piece must fail, or the dashboard would go untested unnoticed.
REQUIRED = bool(os.environ.get("CI"))
if REQUIRED:
    from selenium import webdriver
else:
    webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tmp" / "artifacts"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
TRAIN_TIMEOUT = 300  # seconds for the tiny job, on a busy 2-core CI machine
TINY_JOB = {"spec.train.max_steps": "4", "spec.train.checkpoint_every": "2", "spec.train.sample_every": "2"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def service(tmp_path: Path, cli_env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """`flashdmd up` (SQLite, filesystem broker, worker child) on a fresh data dir: (base URL, token)."""
    data_dir, port = tmp_path / "flashdmd", _free_port()
    env = {k: v for k, v in cli_env.items() if not k.startswith("FLASHDMD_") or k == "FLASHDMD_CACHE"}
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        up = subprocess.Popen([sys.executable, "-m", "api", "up", "--data-dir", str(data_dir), "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            assert up.poll() is None, log_path.read_text()
            try:
                return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _until(healthy, 90, "flashdmd up to answer /healthz")
        yield base, (data_dir / "token").read_text().strip()
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        (ARTIFACTS / "up.log").parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(log_path, ARTIFACTS / "up.log")


def _until(predicate, timeout: float, what: str):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    if not (CHROMIUM and CHROMEDRIVER):
        if REQUIRED:
            pytest.fail("CI needs Debian's chromium and chromium-driver on PATH (.ci/run installs them)")
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: CI runs as root, where Chromium refuses its sandbox; the pages are our own.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800",
                "--disable-gpu", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _css(driver, selector: str):  # noqa: ANN001, ANN202
    return driver.find_element(By.CSS_SELECTOR, selector)


def _wait(driver, condition, timeout: float = 30, what: str = ""):  # noqa: ANN001, ANN202
    # The pages re-render rows as updates arrive: an element may go stale between finding and reading it.
    return WebDriverWait(driver, timeout, poll_frequency=0.2,
                         ignored_exceptions=(StaleElementReferenceException, NoSuchElementException),
                         ).until(lambda d: condition(d), what)


def _type(driver, selector: str, value: str) -> None:  # noqa: ANN001
    element = _css(driver, selector)
    element.clear()
    element.send_keys(value)


def test_dashboard_end_to_end(service, browser, tmp_path: Path) -> None:
    base, token = service
    driver = browser
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    # Login: the token goes to sessionStorage, never into the URL.
    driver.get(f"{base}/ui")
    _wait(driver, lambda d: d.current_url.endswith("#/login"), what="the login page")
    _type(driver, "input[name=token]", "fdmd_not_a_token")
    _css(driver, "#login-form button[type=submit]").click()
    _wait(driver, lambda d: "not accepted" in _css(d, "#login-form .error").text, what="the bad token refused")
    _type(driver, "input[name=token]", token)
    _css(driver, "#login-form button[type=submit]").click()
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#jobs"), what="the jobs page")
    assert token not in driver.current_url
    assert driver.execute_script("return sessionStorage.getItem('flashdmd.token')") == token
    # A page reload would drop this marker: it proves everything below updates in place.
    driver.execute_script("window.__noReload = true")

    # New job: a bad field gets the server's message next to it.
    driver.execute_script("location.hash = '#/new'")
    # The default preset is the digits recipe (real images in minutes); this test trains the tiny smoke test.
    _wait(driver, lambda d: '"toy:digits"' in _css(d, "textarea[name=spec]").get_attribute("value"), what="presets")
    groups = [g.get_attribute("label") for g in driver.find_elements(By.CSS_SELECTOR, "select[name=preset] optgroup")]
    assert groups == ["CPU", "One GPU", "Many GPUs", "Eval"]
    Select(_css(driver, "select[name=preset]")).select_by_value("CPU / tiny (smoke test, seconds)")
    _wait(driver, lambda d: '"tiny:sdxl"' in _css(d, "textarea[name=spec]").get_attribute("value"), what="tiny")
    _type(driver, "input[name='spec.train.max_steps']", "0")
    _css(driver, "#new-job button[type=submit]").click()
    box = '.field[data-field="spec.train.max_steps"] .field-error'
    message = _wait(driver, lambda d: _css(d, box).text, what="the 422 next to max_steps")
    tiny = httpx.get(f"{base}/ui/presets.json").json()["CPU / tiny (smoke test, seconds)"]
    bad = {**tiny, "train": {**tiny["train"], "max_steps": 0}}
    server = httpx.post(f"{base}/jobs", json={"spec": bad}, headers={"Authorization": f"Bearer {token}"})
    assert server.status_code == 422 and message == server.json()["error"]["message"], message
    assert not _css(driver, '.field[data-field="spec.model.teacher"] .field-error').text

    # A tiny job from the form: the page moves to the new job.
    for name, value in TINY_JOB.items():
        _type(driver, f"input[name='{name}']", value)
    _type(driver, "input[name=name]", "ui-tiny")
    _css(driver, "#new-job button[type=submit]").click()
    _wait(driver, lambda d: "#/jobs/j" in d.current_url, what="the new job's page")
    job_id = driver.current_url.rsplit("/", 1)[1]

    # A second job waits behind the first (one worker); it is cancelled from its page.
    headers = {"Authorization": f"Bearer {token}"}
    spec = httpx.get(f"{base}/jobs/{job_id}", headers=headers).json()["spec"]
    spec["train"]["max_steps"] = 50  # it must not finish before the click, whenever the worker reaches it
    second = httpx.post(f"{base}/jobs", json={"spec": spec, "name": "to-cancel"}, headers=headers).json()["id"]
    driver.execute_script(f"location.hash = '#/jobs/{second}'")
    _wait(driver, lambda d: _css(d, "#cancel").is_enabled(), what="cancel to be offered")
    assert not _css(driver, "#resume").is_enabled()
    _css(driver, "#cancel").click()
    # Cancelled at once while it waits; if a fast worker already started it, at its next step boundary.
    _wait(driver, lambda d: _css(d, "#job-status").text == "cancelled", 120, what="the second job to be cancelled")
    _wait(driver, lambda d: _css(d, "#resume").is_enabled() and not _css(d, "#cancel").is_enabled(),
          what="the buttons to follow the state")

    # The jobs list: both jobs, and the first one's bar fills up live.
    driver.execute_script("location.hash = '#/jobs'")
    row = f'tr[data-job="{job_id}"]'
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, row), what="the job in the list")
    _wait(driver, lambda d: _css(d, f'tr[data-job="{second}"]').get_attribute("data-status") == "cancelled")

    def full(d) -> bool:  # noqa: ANN001
        bar = _css(d, f"{row} progress")
        return bar.get_attribute("value") == bar.get_attribute("max") == "4"

    _wait(driver, full, TRAIN_TIMEOUT, what="the progress bar to reach 100%")
    _wait(driver, lambda d: _css(d, row).get_attribute("data-status") == "succeeded", 60, what="succeeded")
    _wait(driver, lambda d: _css(d, f"{row} .steps").text == "4/4")
    driver.save_screenshot(str(ARTIFACTS / "dashboard-jobs.png"))
    # Filter by status: only the cancelled job is left.
    Select(_css(driver, "select[name=status]")).select_by_value("cancelled")
    _wait(driver, lambda d: [r.get_attribute("data-job") for r in d.find_elements(By.CSS_SELECTOR, "#jobs-body tr")]
          == [second], what="the status filter")

    # What the collapse guard records (health/* metrics, a `guard` event) and a resume (the trainer's `started`
    # event with resumed=true), written into the service's database as the worker's ingest would.
    _seed_health(tmp_path / "flashdmd", job_id)
    assert httpx.get(f"{base}/favicon.ico").status_code == 200  # public: a browser asks without a token

    driver.execute_script(f"location.hash = '#/jobs/{job_id}'")
    _check_curves(driver)
    _check_samples(driver, base, headers, job_id)
    _check_job_extras(driver, base, headers, job_id)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(height + 160, 4000))  # the whole page in one image
    driver.save_screenshot(str(ARTIFACTS / "dashboard-job.png"))
    driver.set_window_size(1280, 800)
    assert driver.execute_script("return window.__noReload") is True

    # A cancelled job has no ETA (not "0 s").
    driver.execute_script(f"location.hash = '#/jobs/{second}'")
    _wait(driver, lambda d: _css(d, "#job-status").text == "cancelled", what="the cancelled job")
    assert _css(driver, "#job-eta").text == "–"

    _check_clone_and_yaml(driver, base, headers, job_id)

    # Compare: one metric of both jobs overlaid, the legend names them (the cancelled one has no points).
    driver.execute_script(f"location.hash = '#/compare?jobs={job_id},{second}&key=loss/generator'")
    legend = "#compare-chart .u-legend"
    _wait(driver, lambda d: "ui-tiny" in _css(d, legend).text and "to-cancel" in _css(d, legend).text,
          what="compare by name")
    assert job_id not in _css(driver, legend).text
    assert _css(driver, "#compare-chart canvas").size["width"] > 100
    driver.save_screenshot(str(ARTIFACTS / "dashboard-compare.png"))

    # Phone width: the page folds to one column instead of scrolling sideways.
    fits = "return document.documentElement.scrollWidth <= window.innerWidth + 1"
    driver.set_window_size(390, 844)
    for page in (f"#/jobs/{job_id}", "#/jobs", "#/new"):
        driver.execute_script(f"location.hash = '{page}'")
        _wait(driver, lambda d: d.execute_script(fits), what=f"{page} to fit a phone's width")
    _wait(driver, lambda d: _css(d, "textarea[name=spec]").get_attribute("value"), what="presets")
    driver.save_screenshot(str(ARTIFACTS / "dashboard-new-phone.png"))


HEALTH = {"health/saturation": [0.02, 0.05, 0.31, 0.64], "health/diversity": [0.9, 0.85, 0.4, 0.2]}


def _seed_health(data_dir: Path, job_id: str) -> None:
    from api import crud
    from api.db import make_engine, make_sessionmaker
    from api.models import Metric

    engine = make_engine(f"sqlite:///{data_dir / 'flashdmd.db'}")
    try:
        with make_sessionmaker(engine)() as session:
            for key, values in HEALTH.items():
                for step, value in enumerate(values, start=1):
                    session.merge(Metric(job_id=job_id, key=key, step=step, wall_time=time.time(), value=value))
            crud.add_event(session=session, job_id=job_id, kind="started", message="distillation from step 2",
                           data={"step": 2, "resumed": True})
            crud.add_event(session=session, job_id=job_id, kind="guard",
                           message="health/saturation 0.64 above 0.5 for 2 validations", data={"step": 4})
            session.commit()
    finally:
        engine.dispose()
    # A colourised line, as some libraries print it: the log panel must show its text without the escapes.
    with (data_dir / "storage" / "jobs" / job_id / "trainer.log").open("a") as log:
        log.write("\x1b[33mWARNING\x1b[0m coloured \x1b[1mlibrary\x1b[0m line\n")


def _chart(driver, key: str):  # noqa: ANN001, ANN202
    return _css(driver, f'.chart[data-key="{key}"]')


def _check_curves(driver) -> None:  # noqa: ANN001
    # Grouping: losses, the seeded health metrics, and the turn flag folded into "other".
    loss = '#group-losses .chart[data-key^="loss/"]'
    _wait(driver, lambda d: int(_css(d, loss).get_attribute("data-points") or 0) > 1, what="a loss curve")
    assert _css(driver, f"{loss} canvas").size["width"] > 100
    _wait(driver, lambda d: _chart(d, "health/saturation").get_attribute("data-group") == "health", what="health")
    assert _css(driver, "#group-health").is_displayed()
    folded = driver.find_elements(By.CSS_SELECTOR, "#group-other .chart")
    assert "generator_turn" in [c.get_attribute("data-key") for c in folded]
    assert _css(driver, "#group-other").get_attribute("open") is None  # collapsed until asked
    # Resume and guard markers on the charts, and the guard's event and banner.
    _wait(driver, lambda d: _css(d, "#curves").get_attribute("data-markers") == "resume@2,guard@4", what="markers")
    _wait(driver, lambda d: "above 0.5" in _css(d, '#events li[data-kind="guard"]').text, what="the guard event")
    assert "above 0.5" in _css(driver, "#guard-alert").text and _css(driver, "#guard-alert").is_displayed()

    # Smoothing: at 0 the drawn curve is the raw last value; at .9 the moving average lags behind it.
    def set_range(value: float) -> None:
        driver.execute_script("const r = document.getElementById('smoothing'); r.value = arguments[0];"
                              "r.dispatchEvent(new Event('input'))", value)

    last = lambda: float(_chart(driver, "health/saturation").get_attribute("data-last"))  # noqa: E731
    set_range(0)
    assert last() == HEALTH["health/saturation"][-1]
    set_range(0.9)
    assert last() < 0.64 - 0.05
    # Log scale, pin and hide are remembered (localStorage) across a reload.
    _css(driver, "#log-scale").click()
    _wait(driver, lambda d: _chart(d, "health/saturation").get_attribute("data-log") == "1", what="log scale")
    _css(driver, '.chart[data-key="health/diversity"] .pin').click()
    _css(driver, '.chart[data-key="health/saturation"] .hide').click()
    assert _chart(driver, "health/diversity").get_attribute("data-group") == "pinned"
    assert not _chart(driver, "health/saturation").is_displayed()
    driver.refresh()
    driver.execute_script("window.__noReload = true")
    _wait(driver, lambda d: _chart(d, "health/diversity").get_attribute("data-group") == "pinned", what="pin kept")
    _wait(driver, lambda d: _css(d, '#hidden-charts .chip[data-key="health/saturation"]'), what="hidden kept")
    assert _chart(driver, "health/diversity").get_attribute("data-log") == "1"
    assert driver.execute_script("return +document.getElementById('smoothing').value") == 0.9
    _css(driver, '#hidden-charts .chip[data-key="health/saturation"]').click()
    assert _chart(driver, "health/saturation").is_displayed()
    _css(driver, '.chart[data-key="health/diversity"] .pin').click()  # back to its group for the screenshot
    _css(driver, "#log-scale").click()
    set_range(0.6)


def _check_samples(driver, base: str, headers: dict[str, str], job_id: str) -> None:  # noqa: ANN001
    samples = httpx.get(f"{base}/jobs/{job_id}/samples", headers=headers).json()["data"]
    prompt = samples[-1]["cells"][0]["prompt"]  # the trainer's step-N.json, through the ingest
    sample_loaded = "const i = document.getElementById('sample'); return i.complete && i.naturalWidth > 0"
    _wait(driver, lambda d: d.execute_script(sample_loaded), what="a sample image")
    assert _css(driver, "#sample").get_attribute("src").startswith("blob:")
    _wait(driver, lambda d: prompt in _css(d, "#sample-captions").text, what="the captions")
    # Zoom: the lightbox shows the grid at full size or a whole multiple of it; Esc closes it.
    _css(driver, ".sample-frame").click()
    _wait(driver, lambda d: _css(d, "#lightbox").is_displayed(), what="the lightbox")
    zoomed = _css(driver, "#lightbox img.zoomed")
    _wait(driver, lambda d: d.execute_script("return arguments[0].naturalWidth", zoomed) > 0, what="zoomed image")
    natural = driver.execute_script("return arguments[0].naturalWidth", zoomed)
    assert zoomed.size["width"] >= natural and prompt in _css(driver, "#lightbox").text
    driver.save_screenshot(str(ARTIFACTS / "dashboard-zoom.png"))
    _css(driver, "body").send_keys(Keys.ESCAPE)
    _wait(driver, lambda d: not _css(d, "#lightbox").is_displayed(), what="Esc to close the lightbox")


def _check_job_extras(driver, base: str, headers: dict[str, str], job_id: str) -> None:  # noqa: ANN001
    # The system panel: what the worker sent with its heartbeat while the job ran (a CPU worker here).
    system = httpx.get(f"{base}/jobs/{job_id}", headers=headers).json()["system"]
    assert system["device"] == "cpu" and system["process"]["rss_bytes"] > 0
    _wait(driver, lambda d: "CPU" in _css(d, "#sys-device").text, what="the system panel")
    assert "MiB" in _css(driver, "#sys-memory").text or "GiB" in _css(driver, "#sys-memory").text
    # One generate form: the checkpoint's own step counts and only the export formats it supports.
    ckpts = httpx.get(f"{base}/jobs/{job_id}/checkpoints", headers=headers).json()["data"]
    newest = ckpts[-1]
    _wait(driver, lambda d: _css(d, "#gen-checkpoint").get_attribute("value") == str(newest["step"]), what="form")
    assert len(driver.find_elements(By.CSS_SELECTOR, "form.generate")) == 1
    shown = [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#gen-steps option")]
    assert shown == [str(n) for n in newest["steps"]] and newest["steps"] == [newest["meta"]["num_steps"]]
    formats = [li.get_attribute("data-format") for li in driver.find_elements(By.CSS_SELECTOR, "#export-hints li")]
    assert formats == newest["formats"]
    if newest["meta"]["generator"] != "lora":
        assert "lora" not in formats and "lora-kohya" not in formats
    _css(driver, "#generate button[type=submit]").click()
    generated = "const i = document.querySelector('img.generated'); return i.complete && i.naturalWidth > 0"
    _wait(driver, lambda d: d.execute_script(generated), 120, what="a generated image")
    _wait(driver, lambda d: "WARNING coloured library line" in _css(d, "#log").text, what="the trainer log")
    assert "\x1b" not in _css(driver, "#log").get_attribute("textContent")


def _check_clone_and_yaml(driver, base: str, headers: dict[str, str], job_id: str) -> None:  # noqa: ANN001
    driver.execute_script(f"location.hash = '#/jobs/{job_id}'")
    _wait(driver, lambda d: _css(d, "#clone").is_displayed(), what="the clone button")
    _css(driver, "#clone").click()
    _wait(driver, lambda d: "clone of ui-tiny" in _css(d, "h1").text, what="the clone form")
    _wait(driver, lambda d: _css(d, "input[name=name]").get_attribute("value") == "ui-tiny-2", what="the name")
    spec = httpx.get(f"{base}/jobs/{job_id}", headers=headers).json()["spec"]
    assert f'"{spec["model"]["teacher"]}"' in _css(driver, "textarea[name=spec]").get_attribute("value")
    assert _css(driver, "input[name='spec.train.max_steps']").get_attribute("value") == "4"
    # YAML in the spec box: a syntax error is named with its line; a valid one reaches POST /jobs, whose 422
    # lands next to the field (the quick field is emptied, so the YAML's own max_steps is what is sent).
    _css(driver, "input[name='spec.train.max_steps']").clear()
    box = _css(driver, "textarea[name=spec]")
    box.clear()
    box.send_keys("model:\n  teacher: [tiny\n")
    _css(driver, "#new-job button[type=submit]").click()
    _wait(driver, lambda d: "not valid YAML at line" in _css(d, '.field[data-field="spec"] .field-error').text,
          what="the YAML error")
    box.clear()
    box.send_keys(f"kind: distill\nmodel:\n  teacher: {spec['model']['teacher']}\ndata:\n  builtin: digits\n"
                  "train:\n  max_steps: 0\n")
    _css(driver, "#new-job button[type=submit]").click()
    _wait(driver, lambda d: "max_steps" in _css(d, '.field[data-field="spec.train.max_steps"] .field-error').text,
          what="the 422 of a YAML spec")
