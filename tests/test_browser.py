"""The real page in a real browser: upload an image, see every exit's map and the answering exit.

Starts ``streamlit run`` on a free port with tiny checkpoints and drives Debian's Chromium with
Playwright. Skipped (with the reason) when Chromium or Playwright is missing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageOps
from test_app import write_root

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"
WAIT_S = 60

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited early with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A headless Streamlit server on a free port; always terminated."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is absent (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    root = write_root(tmp_path_factory.mktemp("ckpts"))
    port = _free_port()
    log = tmp_path_factory.mktemp("log") / "streamlit.log"
    env = {**os.environ, "EGT_CHECKPOINTS": str(root), "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "0"}
    cmd = [
        sys.executable, "-m", "streamlit", "run", "app/streamlit_app.py",
        "--server.port", str(port), "--server.headless", "true",
        "--server.address", "127.0.0.1", "--server.fileWatcherType", "none",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/_stcore/health", proc, WAIT_S)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.returncode not in (0, -15, None):
            print(log.read_text()[-2000:])


def test_upload_shows_maps_and_answering_exit(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    # A "product photo": dark sandal on white, bigger than 28 px; the app inverts and shrinks it.
    image = Image.open(REPO / "app" / "samples" / "fashion-mnist" / "05_sandal.png")
    upload = tmp_path / "my-sandal.png"
    ImageOps.invert(image.convert("L")).resize((112, 112), Image.Resampling.BICUBIC).save(upload)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
            ],
        )  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1500})
            page.set_default_timeout(WAIT_S * 1000)
            page.goto(server, wait_until="domcontentloaded")
            page.wait_for_selector("input[type=file]", state="attached")
            page.set_input_files("input[type=file]", str(upload))
            # the results caption names the upload (the uploader's own chip does not say 112×112)
            expect(page.get_by_text("(112×112 L)")).to_be_visible(timeout=WAIT_S * 1000)
            # one answering exit per model, scores for every early exit, charts drawn
            expect(page.get_by_text("answers here")).to_have_count(2, timeout=WAIT_S * 1000)
            expect(page.get_by_text("Exit 3 (final)").first).to_be_visible()
            body = page.inner_text("body")
            assert "reference map" in body
            assert "IoU" in body or "flat map" in body
            assert "mean Pearson" in body
            assert "computed in" in body or "from cache" in body
            page.wait_for_selector(".js-plotly-plot", state="visible")
            page.wait_for_timeout(500)  # let the last images paint
            page.screenshot(path=str(ARTIFACTS / "browser.png"), full_page=True)

            page.set_viewport_size({"width": 1600, "height": 2600})
            page.get_by_role("tab", name="Dataset results").click()
            expect(page.get_by_text("Headline numbers")).to_be_visible()
            expect(page.locator(".js-plotly-plot")).to_have_count(6)
            page.wait_for_timeout(500)
            page.screenshot(path=str(ARTIFACTS / "browser-dataset.png"), full_page=True)
        finally:
            browser.close()
