"""The studio in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven
by selenium; no browser download): open the page, type a prompt, press Enter, watch the
per-step previews, find the image in the gallery, reuse its settings. A screenshot is saved
as studio.png in the test's tmp folder (CI keeps it as an artifact)."""

from __future__ import annotations

import os
import shutil

import pytest
from PIL import Image
from serve_server import running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# CI (.ci/run) sets BONSAI_REQUIRE_BROWSER=1: there a missing browser is a failure.
if not os.environ.get("BONSAI_REQUIRE_BROWSER"):
    pytest.importorskip("selenium.webdriver")
    pytestmark = pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
               "chromium-driver; .ci/run installs them)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--window-size=1400,1000"]
TIMEOUT = 120


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM and CHROMEDRIVER, "chromium and chromedriver must be installed"
    options = Options()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_studio_generates_and_shows_the_image_in_the_gallery(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    def by_id(name):
        return browser.find_element(By.ID, name)

    with running_server(tmp_path, preview_cache=tmp_path / "previews") as server:
        browser.get(server.url)
        wait = WebDriverWait(browser, TIMEOUT)
        wait.until(lambda d: "distilled" in by_id("model-chip").text)
        # every picture the stage shows, live previews included
        browser.execute_script("""
            window.shown = [];
            new MutationObserver(() => window.shown.push(document.getElementById('stage-img').src))
              .observe(document.getElementById('stage-img'), {attributes: true});""")
        browser.find_element(By.CSS_SELECTOR, "#size-presets button[data-kind=custom]").click()
        for name, value in (("width", "96"), ("height", "64")):
            by_id(name).clear()
            by_id(name).send_keys(value)
        by_id("steps").clear()
        by_id("steps").send_keys("3")
        prompt = by_id("prompt")
        prompt.clear()
        prompt.send_keys("a bonsai tree in a misty forest")
        prompt.send_keys(Keys.ENTER)

        tile = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .tile"))[0]
        name = tile.get_attribute("data-name")
        assert name.startswith("a-bonsai-tree-in-a-misty-forest-") and name.endswith(".png")
        with Image.open(server.output / name) as image:
            assert image.size == (96, 64)
            assert image.text["prompt"] == "a bonsai tree in a misty forest"
            assert image.text["steps"] == "3"
        wait.until(lambda d: by_id("generate").is_enabled())
        shown = browser.execute_script("return window.shown")
        previews = [src for src in shown if src.startswith("data:image/jpeg")]
        assert len(previews) == 3, shown  # one per step
        assert shown[-1].endswith(f"/gallery/{name}")
        assert "a bonsai tree" in by_id("stage-prompt").text

        # clicking the gallery image brings its settings back
        prompt.clear()
        prompt.send_keys("something else")
        tile.click()
        assert by_id("prompt").get_attribute("value") == "a bonsai tree in a misty forest"
        assert by_id("seed").get_attribute("value") == name[:-4].rsplit("-", 1)[1]

        screenshot = tmp_path / "studio.png"
        assert browser.save_screenshot(str(screenshot))
        print(f"studio screenshot: {screenshot}")
    with Image.open(screenshot) as shot:
        assert shot.size[0] >= 1000
    assert "Traceback" not in server.log.read_text()


def test_the_studio_asks_once_for_the_api_key(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with running_server(tmp_path, "--api-key", "studio-key",
                        preview_cache=tmp_path / "previews") as server:
        (server.output / "old-1.png").parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), "teal").save(server.output / "old-1.png")
        browser.get(server.url)
        wait = WebDriverWait(browser, TIMEOUT)
        dialog = wait.until(lambda d: d.find_element(By.ID, "key-dialog"))
        wait.until(lambda d: dialog.get_attribute("open") is not None)
        browser.find_element(By.ID, "key-input").send_keys("wrong")
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
        wait.until(lambda d: d.find_element(By.ID, "key-error").is_displayed())
        key = browser.find_element(By.ID, "key-input")
        key.clear()
        key.send_keys("studio-key")
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
        # the gallery (an authenticated listing and images) loads with the session cookie
        tile = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .tile"))[0]
        assert tile.get_attribute("data-name") == "old-1.png"
        wait.until(lambda d: d.execute_script(
            "return document.querySelector('#gallery .tile img').naturalWidth") == 32)
        assert dialog.get_attribute("open") is None
