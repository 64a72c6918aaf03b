"""Take the README's pictures from a running service: the jobs page, a job page and the student's digits.

    flashdmd demo --out /opt/flashdmd-demo --serve          # a real digits run, kept serving
    python docs/screenshots.py --url http://127.0.0.1:8765 --data-dir /opt/flashdmd-demo/service --job JOB_ID

Needs Debian's `chromium` and `chromium-driver` and the `test` extra (selenium). Writes docs/dashboard-jobs.png,
docs/dashboard-job.png and docs/digits-samples.png (a 10 x 8 grid from POST /generate: each digit, 8 seeds).
"""

from __future__ import annotations

import base64
import io
import shutil
import time
from pathlib import Path

import click
import httpx
from PIL import Image

DOCS = Path(__file__).resolve().parent
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits_grid(url: str, token: str, job: str, seeds: int = 8, scale: int = 3) -> Image.Image:
    """Ten rows (digits 0-9) of `seeds` images, each from one POST /generate, upscaled without smoothing."""
    tiles = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as client:
        for word in WORDS:
            row = []
            for first in range(0, seeds, 4):  # the service's default cap is 4 images per request
                body = {"job": job, "prompt": f"a handwritten digit {word}", "seed": first,
                        "num_images": min(4, seeds - first)}
                resp = client.post("/generate", json=body)
                while resp.status_code == 429:  # the per-token rate limit: wait as the server says
                    time.sleep(float(resp.headers.get("retry-after", "5")))
                    resp = client.post("/generate", json=body)
                resp.raise_for_status()
                row += [Image.open(io.BytesIO(base64.b64decode(i["data"]))).convert("RGB")
                        for i in resp.json()["images"]]
            tiles.append(row)
    w, h = tiles[0][0].size
    grid = Image.new("RGB", (seeds * w * scale, len(tiles) * h * scale), "white")
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            grid.paste(tile.resize((w * scale, h * scale), Image.NEAREST), (c * w * scale, r * h * scale))
    return grid


def dashboard(url: str, token: str, job: str) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800",
                "--disable-gpu", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=options)
    try:
        driver.get(f"{url}/ui")
        driver.execute_script("sessionStorage.setItem('flashdmd.token', arguments[0])", token)
        driver.get(f"{url}/ui#/jobs")
        time.sleep(3)  # the list renders from one fetch
        driver.save_screenshot(str(DOCS / "dashboard-jobs.png"))
        driver.execute_script(f"location.hash = '#/jobs/{job}'")
        time.sleep(6)  # curves, samples and the log arrive over a few requests
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, min(height + 160, 4000))
        time.sleep(2)
        driver.save_screenshot(str(DOCS / "dashboard-job.png"))
    finally:
        driver.quit()


@click.command()
@click.option("--url", required=True)
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="the service's data dir (its `token` file)")
@click.option("--job", required=True, help="a finished digits job")
def main(url: str, data_dir: Path, job: str) -> None:
    token = (data_dir / "token").read_text().strip()
    digits_grid(url, token, job).save(DOCS / "digits-samples.png", optimize=True)
    dashboard(url, token, job)
    click.echo(f"wrote {DOCS / 'digits-samples.png'}, {DOCS / 'dashboard-jobs.png'}, {DOCS / 'dashboard-job.png'}")


if __name__ == "__main__":
    main()
