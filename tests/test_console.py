"""The web console in headless Chromium (Debian's chromium + chromium-driver; .ci/run installs them)."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time

import httpx
import pytest
from pydantic import SecretStr

from tests.conftest import LABELS

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)"
)
TOKEN = "console-test-token"
TIMEOUT = 30


@pytest.fixture(scope="module")
def console_url(tiny_settings, adapter_store, tmp_path_factory):
    """A real uvicorn server (in a thread) on its own store: the upload must not change the shared one."""
    import uvicorn

    from server.api import create_app
    from server.engine import Engine

    store = tmp_path_factory.mktemp("console-store")
    for name in ("gen-a", "sentiment"):
        shutil.copytree(adapter_store / name, store / name)
    metadata = store / "sentiment" / "loraswap.json"
    metadata.write_text(json.dumps({**json.loads(metadata.read_text()), "metrics": {"accuracy": 0.91}}))
    settings = tiny_settings.model_copy(update={"adapters_dir": store, "admin_token": SecretStr(TOKEN)})
    engine = Engine.from_settings(settings)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings, engine=engine), host="127.0.0.1", port=port,
                                           log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    engine.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def wait_for(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, TIMEOUT).until(lambda d: condition(d), message)


def row_cells(driver, name: str) -> list[str]:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, f'#adapters tbody tr[data-name="{name}"]')
    return [td.get_attribute("textContent") for td in rows[0].find_elements(By.TAG_NAME, "td")] if rows else []


def run_prediction(driver, adapter: str, text: str, max_tokens: int = 6) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "try-adapter")).select_by_value(adapter)
    for field, value in (("try-input", text), ("try-max-tokens", str(max_tokens))):
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    driver.execute_script("document.getElementById('try-status').textContent = ''")
    driver.find_element(By.ID, "try-run").click()
    wait_for(driver, lambda d: d.find_element(By.ID, "try-status").get_attribute("textContent").endswith(" ms"),
             f"no answer from {adapter}")


def test_page_lists_the_adapters(browser, console_url):
    from selenium.webdriver.common.by import By

    browser.get(console_url)
    wait_for(browser, lambda d: row_cells(d, "sentiment") and row_cells(d, "gen-a"), "adapters not listed")
    name, task, rank, labels, version, _loaded, recorded, _requests, _latency = row_cells(browser, "sentiment")
    assert (name, task, rank, labels, version, recorded) == (
        "sentiment", "classification", "4", ", ".join(LABELS), "1", "accuracy=0.91"
    )
    assert row_cells(browser, "gen-a")[1:3] == ["generation", "4"]
    assert "ready" in browser.find_element(By.ID, "health").text
    options = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#try-adapter option")]
    assert options == ["", "gen-a", "sentiment"]


def test_classification_shows_label_probabilities(browser, console_url):
    from selenium.webdriver.common.by import By

    text = "a warm and funny film"
    expected = httpx.post(f"{console_url}/predict?adapter=sentiment", json={"inputs": text}).json()["outputs"][0]
    browser.get(console_url)
    wait_for(browser, lambda d: row_cells(d, "sentiment"), "adapters not listed")
    run_prediction(browser, "sentiment", text)
    assert browser.find_element(By.ID, "try-output").get_attribute("textContent") == expected["label"]
    rows = browser.find_elements(By.CSS_SELECTOR, "#try-scores tbody tr")
    shown = {r.get_attribute("data-label"): r.find_elements(By.TAG_NAME, "td")[1].text for r in rows}
    assert shown == {label: f"{100 * p:.1f} %" for label, p in expected["scores"].items()}
    # the table refreshes after a run: two requests to sentiment so far (ours and the console's)
    wait_for(browser, lambda d: row_cells(d, "sentiment")[7] == "2", "request count not updated")


def test_generation_streams_the_answer(browser, console_url):
    from selenium.webdriver.common.by import By

    text = "Write a haiku about rain"
    expected = httpx.post(
        f"{console_url}/predict?adapter=gen-a", json={"inputs": text, "parameters": {"max_new_tokens": 6}}
    ).json()["outputs"][0]
    browser.get(console_url)
    wait_for(browser, lambda d: row_cells(d, "gen-a"), "adapters not listed")
    run_prediction(browser, "gen-a", text)
    assert browser.find_element(By.ID, "try-output").get_attribute("textContent") == expected["generated_text"]
    status = browser.find_element(By.ID, "try-status").text
    assert status.startswith(f"generation, {expected['tokens']} tokens, {expected['finish_reason']}, ")
    assert browser.find_element(By.ID, "try-scores").get_attribute("hidden") == "true"


def test_upload_lists_the_new_adapter(browser, console_url, adapter_store):
    from selenium.webdriver.common.by import By

    browser.get(console_url)
    wait_for(browser, lambda d: row_cells(d, "gen-a"), "adapters not listed")
    browser.find_element(By.ID, "upload-name").send_keys("uploaded")
    browser.find_element(By.ID, "upload-token").send_keys(TOKEN)
    source = adapter_store / "gen-b"
    browser.find_element(By.ID, "upload-config").send_keys(str(source / "adapter_config.json"))
    browser.find_element(By.ID, "upload-weights").send_keys(str(source / "adapter_model.safetensors"))
    browser.find_element(By.ID, "upload-run").click()
    wait_for(browser, lambda d: row_cells(d, "uploaded"), "uploaded adapter not listed")
    assert browser.find_element(By.ID, "upload-status").text == "uploaded uploaded v1"
    assert row_cells(browser, "uploaded")[1:3] == ["generation", "16"]
