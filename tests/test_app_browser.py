"""varlib-app in a real browser: Debian's chromium and chromium-driver driven by selenium against the
``varlib-app`` command on 127.0.0.1. Opens the page, generates, waits for the gallery and the scale strip, takes an
example into the editor, draws over it, edits, and saves screenshots under the test's temporary folder
(``generate.png``, ``edit.png`` and both side by side in ``app.png``).

Skips with the reason where chromium or chromedriver is missing (``.ci/run`` installs them). The model is a tiny
random one made by the test; ``VARLIB_APP_CHECKPOINT=outputs/demo/var/model.safetensors`` runs it on another
model file (how the README's screenshot was taken).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio", reason="the app extra is not installed (pip install 'varlib[app]')")
pytest.importorskip("selenium", reason="the app extra is not installed (pip install 'varlib[app]')")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

import varlib  # noqa: E402
from varlib.app import held_out_emoji  # noqa: E402

pytestmark = pytest.mark.slow  # starts the app and a browser
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1700"]
REQUIRE_BROWSER_VARIABLE = "VARLIB_REQUIRE_BROWSER"  # set by .ci/run
WAIT_S = 600  # a bound for a stuck page, far above its longest step on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_model(path: Path) -> Path:
    torch.manual_seed(0)
    vae = varlib.MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, patch_nums=(1, 2, 4, 8, 16), ch_mult=(1, 1),
                                 num_res_blocks=1, using_sa=False, using_mid_sa=False)
    varlib.save_var(varlib.VAR(vae, varlib.VARConfig(depth=2, num_classes=3, width=64, num_heads=2)), path)
    return path


@pytest.fixture
def app_url(tmp_path):
    """The ``varlib-app`` command serving a model file on 127.0.0.1, with one held-out emoji as the example."""
    checkpoint = os.environ.get("VARLIB_APP_CHECKPOINT") or tiny_model(tmp_path / "tiny_var.safetensors")
    example = shutil.copy(held_out_emoji(1)[0], tmp_path / "example.png")
    port = free_port()
    command = [sys.executable, "-m", "varlib.cli.app", f"checkpoint={checkpoint}", "device=cpu", f"port={port}",
               f"examples=[{example}]", f"hydra.run.dir={tmp_path / 'hydra'}"]
    log = (tmp_path / "app.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            assert process.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, "varlib-app did not start listening"
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(30)
        log.close()


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None or CHROMEDRIVER is None:
        missing = ("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver); "
                   ".ci/run installs them")
        if os.environ.get(REQUIRE_BROWSER_VARIABLE):  # CI: a skipped browser test would pass unseen
            pytest.fail(f"{REQUIRE_BROWSER_VARIABLE} is set but the browser is missing: {missing}")
        pytest.skip(missing)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def loaded_images(driver, selector: str) -> list:
    """The images under ``selector`` that the browser has decoded."""
    return [image for image in driver.find_elements(By.CSS_SELECTOR, selector)
            if driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image)]


def test_generate_and_edit_in_a_browser(app_url, browser, tmp_path):
    wait = WebDriverWait(browser, WAIT_S)
    browser.get(app_url)
    wait.until(expected_conditions.element_to_be_clickable((By.ID, "generate-button"))).click()
    # one class x 4 images, then the scale strip of one image (5 scales for the tiny model, 6 for the demo's)
    wait.until(lambda d: len(loaded_images(d, "#gallery img")) == 4)
    wait.until(lambda d: len(loaded_images(d, "#scale-strip img")) >= 5)
    browser.save_screenshot(str(tmp_path / "generate.png"))
    captions = [caption.text for caption in browser.find_elements(By.CSS_SELECTOR, "#scale-strip .caption-label")]
    assert captions[0] == "1x1" and captions[-1].startswith(captions[-1].split("x")[1])
    side = int(captions[-1].split("x")[0])  # the last scale's token grid

    next(tab for tab in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if tab.text == "Edit").click()
    wait.until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "#examples button"))).click()
    wait.until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "button[aria-label=Brush]"))).click()
    canvas = browser.find_element(By.CSS_SELECTOR, "#editor canvas")
    # a stroke across the upper half of the image (offsets from the canvas centre)
    ActionChains(browser).move_to_element_with_offset(canvas, -30, -40).click_and_hold().move_by_offset(60, 0) \
        .move_by_offset(0, 15).move_by_offset(-60, 0).release().perform()
    browser.find_element(By.ID, "edit-button").click()
    status = browser.find_element(By.CSS_SELECTOR, "#edit-status textarea")
    wait.until(lambda d: "tokens regenerated" in (status.get_attribute("value") or ""))
    wait.until(lambda d: len(loaded_images(d, "#comparison img")) == 3)  # before, regenerated tokens, after
    browser.save_screenshot(str(tmp_path / "edit.png"))
    regenerated = int(status.get_attribute("value").split()[0])
    assert 0 < regenerated < side * side  # some tokens, not all (the stroke covers part of the image)

    with Image.open(tmp_path / "generate.png") as generate, Image.open(tmp_path / "edit.png") as edit:
        both = Image.new("RGB", (generate.width + edit.width, max(generate.height, edit.height)), "white")
        both.paste(generate, (0, 0))
        both.paste(edit, (generate.width, 0))
        both.save(tmp_path / "app.png")
    # the screenshots show pictures, not an empty page
    for name in ("generate.png", "edit.png"):
        with Image.open(tmp_path / name) as shot:
            assert np.asarray(shot.convert("L")).std() > 20
