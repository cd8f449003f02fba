"""The web demo in a real browser: the Gradio app on a free localhost port, driven by Debian's headless
Chromium through selenium (``pip install -e ".[web-test]"``; ``apt-get install chromium chromium-driver``).
The app wraps a tiny untrained ARR-COC and a stand-in text encoder, so no benchmark model is needed."""

import os
import socket
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

pytest.importorskip("gradio", reason="the web demo needs the 'web' extra: pip install -e '.[web]'")
pytest.importorskip("selenium", reason="the browser test needs selenium, the 'web-test' extra: "
                                       "pip install -e '.[web-test]'")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="needs Debian's Chromium and its driver at /usr/bin: apt-get install -y chromium chromium-driver",
)

import arrcoc  # noqa: E402
from arrcoc.models.canvas_vit import CanvasViTConfig, build_canvas_vit  # noqa: E402
from arrcoc.web import serve  # noqa: E402

TINY = CanvasViTConfig(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def sentence_vectors(sentences: list[str]) -> torch.Tensor:
    """A stand-in text encoder: a fixed random unit vector per sentence."""
    vectors = [torch.randn(384, generator=torch.Generator().manual_seed(zlib.crc32(s.encode()))) for s in sentences]
    return torch.nn.functional.normalize(torch.stack(vectors), dim=-1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def app_url():
    model = arrcoc.attach(build_canvas_vit(TINY).eval(), budget=0.25, text_encoder=sentence_vectors)
    port = free_port()
    app = serve(model, "127.0.0.1", port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_query_and_button_show_the_answer_and_the_kept_patches(app_url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(app_url)
    wait = WebDriverWait(browser, 20)
    box = wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, "#query textarea")))
    box.clear()
    box.send_keys("which digit is green?")
    browser.find_element(By.ID, "run").click()
    wait.until(lambda driver: "Answer at 16 of 64 patch tokens" in driver.find_element(By.ID, "answer").text)
    answer = browser.find_element(By.ID, "answer").text
    assert "With all 64 tokens:" in answer
    overlay = wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#overlay img"))[0]
    wait.until(lambda driver: driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                                    overlay))
    assert browser.execute_script("return arguments[0].naturalWidth", overlay) > 300

    shot = Path(os.environ.get("ARRCOC_WEB_SCREENSHOT", tmp_path / "web_demo.png"))
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as png:
        assert png.format == "PNG" and png.width >= 1000 and png.height >= 1000
        colours = png.convert("RGB").resize((200, 240)).getcolors(maxcolors=200 * 240)
        assert len(colours) > 500  # text, a canvas and a heat map: far from a blank page
