"""The console's fine-tuning section in headless Chromium: upload a file, start a job, watch its curve, try it."""

from __future__ import annotations

import json
import shutil

import pytest
from pydantic import SecretStr

from tests.helpers import serve_in_thread
from tests.test_console import CHROMEDRIVER, CHROMIUM, browser, wait_for  # noqa: F401 (browser is a fixture)
from tests.test_finetune import CLS_ROWS

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)"
)
TOKEN = "finetune-console-token"


@pytest.fixture(scope="module")
def finetune_url(tiny_settings, adapter_store, tmp_path_factory):
    """A real uvicorn server (in a thread) on its own store, with the admin token."""
    from server.api import create_app
    from server.engine import Engine

    store = tmp_path_factory.mktemp("finetune-console-store")
    shutil.copytree(adapter_store / "sentiment", store / "sentiment")
    settings = tiny_settings.model_copy(update={"adapters_dir": store, "admin_token": SecretStr(TOKEN)})
    engine = Engine.from_settings(settings)
    try:
        with serve_in_thread(create_app(settings, engine=engine)) as url:
            yield url
    finally:
        engine.close()


def test_upload_train_watch_and_try(browser, finetune_url, tmp_path):  # noqa: F811 (browser is the fixture)
    from selenium.webdriver.common.by import By

    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CLS_ROWS))
    browser.get(finetune_url)
    browser.find_element(By.ID, "ft-token").send_keys(TOKEN)
    browser.find_element(By.ID, "ft-file").send_keys(str(data))
    browser.find_element(By.ID, "ft-upload-run").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "ft-status").text.startswith("uploaded reviews.jsonl as file-"),
             "file not uploaded")
    epochs = browser.find_element(By.ID, "ft-epochs")
    epochs.clear()
    epochs.send_keys("2")
    browser.find_element(By.ID, "ft-job-run").click()
    wait_for(browser, lambda d: ": succeeded, step 4, training loss " in d.find_element(By.ID, "ft-job-status").text,
             "the job did not succeed in the console")
    curve = browser.find_element(By.CSS_SELECTOR, '#ft-curve polyline[data-series="train"]')
    assert curve.get_attribute("data-count") == "4"  # 14 rows (2 held out) / batch 8 x 2 epochs
    auto = [item.text for item in browser.find_elements(By.CSS_SELECTOR, "#ft-auto li")]
    assert auto[0] == "auto validation: 2 of 16 rows held out of the training file, stratified by label"
    assert not any(line.startswith("auto epochs") for line in auto)  # given: 2
    assert "auto LoRA targets: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj (every linear layer of the " \
        "base's blocks)" in auto
    assert browser.find_element(By.ID, "ft-validation-figures").text.startswith("Validation metrics: accuracy=")
    model = browser.find_element(By.ID, "ft-try-model").get_attribute("value")
    assert model.startswith("ft-")
    assert browser.find_element(By.CSS_SELECTOR, '#ft-jobs tbody tr td:nth-child(3)').text == model
    browser.find_element(By.ID, "ft-try-input").send_keys("a superb film")
    browser.find_element(By.ID, "ft-try-run").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "ft-try-output").text in ("neg", "pos"), "no label shown")
