"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver, installed by .ci/run),
driven by Selenium against `flashdmd up` on a temp data dir, as a user would click through it.

One tiny job is trained (4 steps); a second one is cancelled while it waits. Screenshots of the jobs page
and the job page go to tmp/artifacts/ (the README's docs/dashboard-*.png are copies of them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
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
    import time

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


def test_dashboard_end_to_end(service, browser) -> None:
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
    _wait(driver, lambda d: '"tiny:sdxl"' in _css(d, "textarea[name=spec]").get_attribute("value"), what="presets")
    _type(driver, "input[name='spec.train.max_steps']", "0")
    _css(driver, "#new-job button[type=submit]").click()
    box = '.field[data-field="spec.train.max_steps"] .field-error'
    message = _wait(driver, lambda d: _css(d, box).text, what="the 422 next to max_steps")
    presets = httpx.get(f"{base}/ui/presets.json").json()
    bad = {**next(iter(presets.values())), "train": {**next(iter(presets.values()))["train"], "max_steps": 0}}
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

    # The job page: curves, a sample grid, and a generated image from a checkpoint.
    driver.execute_script(f"location.hash = '#/jobs/{job_id}'")
    loss = '.chart[data-key^="loss/"]'
    _wait(driver, lambda d: int(_css(d, loss).get_attribute("data-points") or 0) > 1, what="a loss curve")
    assert _css(driver, f"{loss} canvas").size["width"] > 100
    sample_loaded = "const i = document.getElementById('sample'); return i.complete && i.naturalWidth > 0"
    _wait(driver, lambda d: d.execute_script(sample_loaded), what="a sample image")
    assert _css(driver, "#sample").get_attribute("src").startswith("blob:")
    _wait(driver, lambda d: "succeeded" in _css(d, "#events").text, what="the events")
    _wait(driver, lambda d: _css(d, "#log").text.strip(), what="the trainer log")
    _css(driver, ".checkpoint .generate button[type=submit]").click()
    generated = "const i = document.querySelector('img.generated'); return i.complete && i.naturalWidth > 0"
    _wait(driver, lambda d: d.execute_script(generated), 120, what="a generated image")
    # The whole page in one image: a window as tall as the document.
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(height + 160, 4000))
    driver.save_screenshot(str(ARTIFACTS / "dashboard-job.png"))
    assert driver.execute_script("return window.__noReload") is True

    # Compare: one metric of both jobs overlaid (the cancelled one has no points, only a legend entry).
    driver.set_window_size(1280, 800)
    driver.execute_script(f"location.hash = '#/compare?jobs={job_id},{second}&key=loss/generator'")
    legend = "#compare-chart .u-legend"
    _wait(driver, lambda d: job_id in _css(d, legend).text and second in _css(d, legend).text, what="compare")
    assert _css(driver, "#compare-chart canvas").size["width"] > 100

    # Phone width: the page folds to one column instead of scrolling sideways.
    fits = "return document.documentElement.scrollWidth <= window.innerWidth + 1"
    driver.set_window_size(390, 844)
    for page in (f"#/jobs/{job_id}", "#/jobs", "#/new"):
        driver.execute_script(f"location.hash = '{page}'")
        _wait(driver, lambda d: d.execute_script(fits), what=f"{page} to fit a phone's width")
    _wait(driver, lambda d: _css(d, "textarea[name=spec]").get_attribute("value"), what="presets")
    driver.save_screenshot(str(ARTIFACTS / "dashboard-new-phone.png"))
