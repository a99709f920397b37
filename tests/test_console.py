"""The web console in headless Chromium (Debian's chromium + chromium-driver; .ci/run installs them).

The shipped adapters' loraswap.json and training.png are served on tiny adapters of the same task and labels: the
console renders only the record, the metadata and the plot, and the real base would cost a minute per run.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from server.settings import SHIPPED_ADAPTERS
from tests.helpers import archive_bytes, make_adapter, serve_in_thread

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)"
)
SHIPPED = ("spam", "sentiment", "pubmedqa")
TOKEN = "console-test-token"
TIMEOUT = 30
HOSTILE_LABELS = ['<img src=x onerror="window.xssFired=1">', "<script>window.xssFired=2</script>"]
HOSTILE_DESCRIPTION = '<img src=x onerror="window.xssFired=3"> <b>bold?</b>'
UNROUNDED = re.compile(r"\d\.\d{5,}")  # a float printed with more than 4 decimals


def shipped_metadata(name: str) -> dict:
    return json.loads((SHIPPED_ADAPTERS / name / "loraswap.json").read_text())


def png_width(path: Path) -> int:
    return struct.unpack(">I", path.read_bytes()[16:20])[0]  # the IHDR chunk's width


@pytest.fixture(scope="module")
def console_store(tmp_path_factory, tiny_base, adapter_store) -> Path:
    """gen-a (no metadata, no plot); tiny spam, sentiment and pubmedqa carrying the shipped loraswap.json and
    training.png; `hostile`, whose labels, description and metrics hold HTML."""
    store = tmp_path_factory.mktemp("console-store")
    shutil.copytree(adapter_store / "gen-a", store / "gen-a")
    for seed, name in enumerate(SHIPPED, start=10):
        metadata = shipped_metadata(name)
        if metadata["task"] == "classification":
            make_adapter(tiny_base, store / name, task="SEQ_CLS", labels=metadata["labels"], seed=seed)
        else:
            make_adapter(tiny_base, store / name, seed=seed)
        # all of it but the real base's fingerprint, which the tiny base would refuse
        del metadata["base_model"]
        (store / name / "loraswap.json").write_text(json.dumps(metadata))
        shutil.copy(SHIPPED_ADAPTERS / name / "training.png", store / name / "training.png")
    hostile = make_adapter(tiny_base, store / "hostile", task="SEQ_CLS", labels=HOSTILE_LABELS, seed=20)
    per_class = {label: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2} for label in HOSTILE_LABELS}
    metrics = {"accuracy": 0.5, "per_class": per_class,
               "confusion_matrix": {"labels": HOSTILE_LABELS, "rows_gold_columns_predicted": [[1, 1], [1, 1]]}}
    (hostile / "loraswap.json").write_text(json.dumps(
        {"task": "classification", "labels": HOSTILE_LABELS, "description": HOSTILE_DESCRIPTION, "metrics": metrics}
    ))
    return store


@contextmanager
def serving(settings) -> Iterator[str]:
    """A real uvicorn server (in a thread) of an app on `settings`; yields its URL."""
    from server.api import create_app
    from server.engine import Engine

    engine = Engine.from_settings(settings)
    try:
        with serve_in_thread(create_app(settings, engine=engine), TIMEOUT) as url:
            yield url
    finally:
        engine.close()


@pytest.fixture(scope="module")
def console_url(tiny_settings, console_store):
    """On its own store: the uploads must not change the shared one."""
    settings = tiny_settings.model_copy(update={"adapters_dir": console_store, "admin_token": SecretStr(TOKEN)})
    with serving(settings) as url:
        yield url


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


def text_of(driver, selector: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.get_attribute("textContent") for e in driver.find_elements(By.CSS_SELECTOR, selector)]


def row_cells(driver, name: str) -> list[str]:
    return text_of(driver, f'#adapters tbody tr[data-name="{name}"] td')


def open_page(driver, url: str) -> None:
    driver.get(url)
    # the table is filled at once: one row means all of them
    wait_for(driver, lambda d: text_of(d, "#adapters tbody tr") and text_of(d, "#live-adapters tbody td"),
             "page not loaded")


def open_detail(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f'#adapters tbody tr[data-name="{name}"]').click()
    wait_for(driver, lambda d: d.execute_script(
        "const d = document.getElementById('detail'); return d.open && d.dataset.ready && d.dataset.name;"
    ) == name, f"the detail view of {name} did not open")


def close_detail(driver) -> None:
    driver.execute_script("document.getElementById('detail').close()")


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


def curl_request(driver) -> tuple[str, dict]:
    """The URL and JSON body of the curl command the try box shows."""
    words = [w for w in shlex.split(text_of(driver, "#try-curl")[0]) if w != "\n"]
    assert words[:4] == ["curl", "-sN", "-X", "POST"] and words[5:7] == ["-H", "content-type: application/json"]
    assert words[7] == "-d" and len(words) == 9
    return words[4], json.loads(words[8])


def post(url: str, **kwargs) -> httpx.Response:
    return httpx.post(url, timeout=TIMEOUT, **kwargs)


def streamed_result(url: str, body: dict) -> dict:
    """The `result` event of a streamed /predict answer."""
    text = post(url, json=body).text
    return json.loads(text.split("event: result\ndata: ")[1].split("\n")[0])


def test_page_lists_the_adapters_with_rounded_metrics(browser, console_url):
    from selenium.webdriver.common.by import By

    open_page(browser, console_url)
    spam = shipped_metadata("spam")["metrics"]
    assert row_cells(browser, "spam")[:6] == ["spam", "classification", "4", "ham, spam", "1", "no"]
    assert text_of(browser, '#adapters tr[data-name="spam"] .metric') == [
        f"accuracy {100 * spam['accuracy']:.1f} %", f"macro F1 {spam['macro_f1']:.3f}", f"rows {spam['rows']}"
    ] == ["accuracy 98.8 %", "macro F1 0.973", "rows 518"]
    pubmedqa = shipped_metadata("pubmedqa")["metrics"]
    assert text_of(browser, '#adapters tr[data-name="pubmedqa"] .metric') == [
        f"decision accuracy {100 * pubmedqa['decision_accuracy']:.1f} %", f"token F1 {pubmedqa['token_f1']:.3f}",
        f"ROUGE-L {pubmedqa['rouge_l']:.3f}", "no decision 0", "rows 51",
    ]
    assert row_cells(browser, "gen-a")[1:3] == ["generation", "4"]
    assert text_of(browser, '#adapters tr[data-name="gen-a"] .metric') == []
    assert "ready" in browser.find_element(By.ID, "health").text
    options = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#try-adapter option")]
    assert options == ["", "gen-a", "hostile", "pubmedqa", "sentiment", "spam"]


def shown_texts(driver, url: str, names: tuple[str, ...]) -> dict[str, str]:
    """The page's text, and the text of each adapter's detail view."""
    open_page(driver, url)
    texts = {"page": driver.execute_script("return document.body.innerText")}
    for name in names:
        open_detail(driver, name)
        texts[name] = driver.execute_script("return document.getElementById('detail').innerText")
        close_detail(driver)
    return texts


def assert_no_raw_values(texts: dict[str, str]) -> None:
    for where, text in texts.items():
        for raw in ("[object Object]", "undefined", "NaN"):
            assert raw not in text, f"{raw} in {where}"
        assert not UNROUNDED.findall(text), f"unrounded floats in {where}: {UNROUNDED.findall(text)}"


def test_no_raw_values_anywhere_on_the_page(browser, console_url):
    texts = shown_texts(browser, console_url, SHIPPED)
    assert_no_raw_values(texts)
    settings = {}
    for name in ("spam", "pubmedqa"):
        open_detail(browser, name)
        settings[name] = dict(browser.execute_script(
            "return [...document.querySelectorAll('#detail-settings tr')]"
            ".map(tr => [...tr.cells].map(c => c.textContent))"
        ))
        close_detail(browser)
    # the settings and data hashes are there, as people read them
    shown = {key: settings["spam"][key] for key in ("lr", "dropout", "top layers", "train seconds", "final train loss")}
    assert shown == {"lr": "8e-4", "dropout": "0.05", "top layers": "16", "train seconds": "29.7 min",
                     "final train loss": "0.0028"}
    assert (settings["pubmedqa"]["truncate columns"], settings["pubmedqa"]["top layers"]) == ("context -1600", "–")
    assert "decision macro F1 0.344" in texts["pubmedqa"]


@pytest.mark.real_base
def test_no_raw_values_with_the_shipped_adapters_on_the_real_base(browser, tmp_path):
    """The same check on the shipped adapters, served on the embedded base."""
    import os

    from server.settings import Settings

    cache = Path(os.environ.get("LORASWAP_CACHE_DIR", Path.home() / ".cache" / "loraswap"))
    with serving(Settings(adapters_dir=tmp_path / "store", dtype="float32", cache_dir=cache)) as url:
        texts = shown_texts(browser, url, SHIPPED)
        assert all(row_cells(browser, name) for name in SHIPPED)
    assert_no_raw_values(texts)
    assert "accuracy 98.8 %" in texts["page"] and "decision accuracy 60.8 %" in texts["page"]


@pytest.mark.parametrize("name", ["spam", "pubmedqa"])
def test_detail_shows_the_recorded_confusion_matrix_scores_data_and_plot(browser, console_url, name):
    metadata = shipped_metadata(name)
    recorded = metadata["metrics"] if name == "spam" else metadata["metrics"]["decision"]
    matrix = recorded["confusion_matrix"]
    open_page(browser, console_url)
    open_detail(browser, name)
    cells = browser.execute_script(
        "return [...document.querySelectorAll('#detail-confusion td')]"
        ".map(td => [Number(td.dataset.gold), Number(td.dataset.predicted), td.textContent])"
    )
    shown = [[None] * len(matrix["labels"]) for _ in matrix["labels"]]
    for gold, predicted, text in cells:
        shown[gold][predicted] = int(text)
    assert shown == matrix["rows_gold_columns_predicted"]
    assert text_of(browser, "#detail-confusion thead th")[1:] == matrix["labels"]
    assert text_of(browser, "#detail-confusion tbody th") == matrix["labels"]
    per_class = {r[0]: r[1:] for r in browser.execute_script(
        "return [...document.querySelectorAll('#detail-per-class tbody tr')]"
        ".map(tr => [...tr.cells].map(td => td.textContent))"
    )}
    assert per_class == {
        label: [f"{s['precision']:.3f}", f"{s['recall']:.3f}", f"{s['f1']:.3f}", str(s["support"])]
        for label, s in recorded["per_class"].items()
    }
    hashes = text_of(browser, "#detail-data td.hash")
    assert hashes == [f["sha256"] for f in metadata["data"]["train"]] + [metadata["data"]["eval"]["sha256"]]
    wait_for(browser, lambda d: d.execute_script("return document.getElementById('detail-plot').naturalWidth") > 0,
             "training.png did not load")
    width = browser.execute_script("return document.getElementById('detail-plot').naturalWidth")
    assert width == png_width(SHIPPED_ADAPTERS / name / "training.png")
    assert text_of(browser, "#detail-settings th")[:2] == ["rank / alpha", "target modules"]


def test_detail_of_an_adapter_without_metadata_says_so(browser, console_url):
    open_page(browser, console_url)
    open_detail(browser, "gen-a")
    wait_for(browser, lambda d: d.find_element("id", "detail-plot-missing").is_displayed(), "missing plot not shown")
    assert text_of(browser, "#detail-metrics") == ["no metrics recorded"]
    assert text_of(browser, "#detail-confusion caption") == ["no confusion matrix recorded"]
    assert text_of(browser, "#detail-data caption") == ["no data recorded"]
    assert browser.execute_script("return document.getElementById('detail-plot').hidden") is True


def live_row(driver, adapter: str) -> list[str]:
    return text_of(driver, f'#live-adapters tr[data-adapter="{adapter}"] td')


def test_live_panel_moves_after_traffic(browser, console_url):
    open_page(browser, console_url)
    before = live_row(browser, "sentiment")
    count_before = int(before[4]) if before else 0
    batches_before = browser.execute_script(
        "return [...document.querySelectorAll('#live-batch-chart rect')].reduce((s, r) => s + +r.dataset.value, 0)"
    )
    unknown_before = int(live_row(browser, "__unknown__")[5]) if live_row(browser, "__unknown__") else 0
    assert post(f"{console_url}/predict?adapter=nope", json={"inputs": "x"}).status_code == 404
    for text in ("good", "bad", "fine"):
        assert post(f"{console_url}/predict?adapter=sentiment", json={"inputs": text}).status_code == 200
    wait_for(browser, lambda d: live_row(d, "sentiment") and live_row(d, "sentiment")[4] == str(count_before + 3),
             "the live panel did not count the requests")
    name, rate, p50, p99, _, errors = live_row(browser, "sentiment")
    assert name == "sentiment" and float(rate) > 0 and errors == "0"
    assert live_row(browser, "__unknown__")[5] == str(unknown_before + 1)  # the 404 is an error
    for latency in (p50, p99):
        assert re.fullmatch(r"\d+(\.\d)? ms|\d+\.\d\d s", latency), latency
    batches = browser.execute_script(
        "return [...document.querySelectorAll('#live-batch-chart rect')].reduce((s, r) => s + +r.dataset.value, 0)"
    )
    assert batches >= batches_before + 1
    assert float(text_of(browser, "#live-rate")[0]) > 0
    assert int(text_of(browser, "#live-loaded")[0]) >= 1
    assert text_of(browser, "#live-queue") == ["0"]
    line = browser.execute_script(
        "return document.querySelector('#live-rate-chart polyline[data-series=\"sentiment\"]').getAttribute('points')"
    )
    assert len(line.split()) >= 1
    # the adapters table shows the same totals, and that the adapter is in memory now
    wait_for(browser, lambda d: row_cells(d, "sentiment")[7] == str(count_before + 3), "table totals not updated")
    wait_for(browser, lambda d: row_cells(d, "sentiment")[5] == "yes", "the table does not show sentiment loaded")


def test_metrics_are_read_and_quantiles_estimated_as_prometheus_does(browser, console_url):
    from prometheus_client.parser import text_string_to_metric_families

    open_page(browser, console_url)
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
    assert post(f"{console_url}/predict?adapter=gen-a", json=body).status_code == 200
    text = httpx.get(f"{console_url}/metrics").text
    parsed = browser.execute_async_script(
        """const [text, done] = arguments;
        import("/console/prometheus.js").then(({parseMetrics, quantile}) => {
          const scrape = parseMetrics(text);
          const requests = Object.fromEntries(Object.entries(scrape.adapters).map(([k, v]) => [k, v.requests]));
          const histogram = {count: 10, sum: 0, buckets: new Map([[0.1, 2], [0.25, 6], [Infinity, 10]])};
          done({requests, batches: scrape.batch.count, loaded: scrape.loaded,
                p50: quantile(histogram, 0.5), p99: quantile(histogram, 0.99), p10: quantile(histogram, 0.1)});
        });""",
        text,
    )
    expected: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "loraswap_requests_total":
                expected[sample.labels["adapter"]] = expected.get(sample.labels["adapter"], 0) + sample.value
            elif sample.name == "loraswap_batch_size_count":
                assert parsed["batches"] == sample.value
            elif sample.name == "loraswap_loaded_adapters":
                assert parsed["loaded"] == sample.value
    assert parsed["requests"] == expected and expected["gen-a"] >= 1
    # rank 5 of 10 lies in the (0.1, 0.25] bucket holding ranks 3..6; rank 9.9 in +Inf: the highest finite bound
    assert parsed["p50"] == pytest.approx(0.1 + 0.15 * 3 / 4)
    assert parsed["p10"] == pytest.approx(0.05)
    assert parsed["p99"] == 0.25


def test_classification_shows_a_bar_per_label_and_its_curl(browser, console_url):
    text = "a warm and funny film"
    expected = post(f"{console_url}/predict?adapter=sentiment", json={"inputs": text}).json()["outputs"][0]
    open_page(browser, console_url)
    run_prediction(browser, "sentiment", text)
    assert text_of(browser, "#try-output") == [expected["label"]]
    rows = browser.execute_script(
        "return [...document.querySelectorAll('#try-scores tbody tr')]"
        ".map(tr => [tr.dataset.label, tr.cells[1].textContent, tr.querySelector('.bar').style.width])"
    )
    assert {label: (shown, width) for label, shown, width in rows} == {
        label: (f"{100 * p:.1f} %", f"{100 * p:.1f}%") for label, p in expected["scores"].items()
    }
    url, body = curl_request(browser)
    assert url == f"{console_url}/predict?adapter=sentiment"
    assert body == {"inputs": text, "stream": True}  # a classifier takes no generation parameters
    assert streamed_result(url, body)["outputs"][0] == expected


def test_generation_streams_the_answer_and_its_curl_repeats_it(browser, console_url):
    text = "Write a haiku about 'rain'"
    expected = post(
        f"{console_url}/predict?adapter=gen-a", json={"inputs": text, "parameters": {"max_new_tokens": 6}}
    ).json()["outputs"][0]
    open_page(browser, console_url)
    run_prediction(browser, "gen-a", text)
    assert text_of(browser, "#try-output") == [expected["generated_text"]]
    status = text_of(browser, "#try-status")[0]
    assert status.startswith(f"generation, {expected['tokens']} tokens, {expected['finish_reason']}, ")
    assert browser.find_element("id", "try-scores").get_attribute("hidden") == "true"
    url, body = curl_request(browser)
    assert body["inputs"] == text  # the quote survives the shell quoting
    assert streamed_result(url, body)["outputs"][0]["generated_text"] == expected["generated_text"]


def upload_files(driver, name: str, files: list[Path]) -> None:
    from selenium.webdriver.common.by import By

    for field, value in (("upload-name", name), ("upload-token", TOKEN)):
        driver.find_element(By.ID, field).clear()
        driver.find_element(By.ID, field).send_keys(value)
    driver.find_element(By.ID, "upload-files").send_keys("\n".join(str(f) for f in files))
    driver.execute_script("document.getElementById('upload-status').textContent = ''")
    driver.find_element(By.ID, "upload-run").click()
    wait_for(driver, lambda d: re.match(r"uploaded |error ", text_of(d, "#upload-status")[0]), "upload not answered")


def test_upload_shows_its_progress_and_lists_the_new_adapter(browser, console_url, adapter_store):
    source = adapter_store / "gen-b"
    files = [source / "adapter_config.json", source / "adapter_model.safetensors",
             SHIPPED_ADAPTERS / "spam" / "training.png"]
    open_page(browser, console_url)
    upload_files(browser, "uploaded", files)
    assert text_of(browser, "#upload-status") == ["uploaded uploaded v1"]
    value, maximum = browser.execute_script(
        "const p = document.getElementById('upload-progress'); return [p.value, p.max]"
    )
    assert value == maximum > sum(f.stat().st_size for f in files)  # the whole multipart body went up
    wait_for(browser, lambda d: row_cells(d, "uploaded"), "uploaded adapter not listed")
    assert row_cells(browser, "uploaded")[1:3] == ["generation", "16"]
    assert text_of(browser, "#upload-problems li") == []
    open_detail(browser, "uploaded")
    wait_for(browser, lambda d: d.execute_script("return document.getElementById('detail-plot').naturalWidth") > 0,
             "the uploaded training.png did not load")


def test_upload_of_one_archive(browser, console_url, adapter_store, tmp_path):
    archive = tmp_path / "gen-mlp.zip"
    archive.write_bytes(archive_bytes(adapter_store / "gen-mlp", "zip"))
    open_page(browser, console_url)
    upload_files(browser, "from-zip", [archive])
    assert text_of(browser, "#upload-status") == ["uploaded from-zip v1"]
    wait_for(browser, lambda d: row_cells(d, "from-zip"), "the adapter uploaded as a zip is not listed")
    assert row_cells(browser, "from-zip")[1:3] == ["generation", "8"]


def test_a_refused_upload_lists_every_problem(browser, console_url, adapter_store, tmp_path):
    pickle = tmp_path / "weights.bin"
    pickle.write_bytes(b"not really a pickle")
    files = [adapter_store / "gen-b" / "adapter_config.json", pickle]
    direct = post(
        f"{console_url}/adapters", headers={"Authorization": f"Bearer {TOKEN}"}, data={"name": "refused"},
        files=[("files", (f.name, f.read_bytes())) for f in files],
    )
    assert direct.status_code == 422 and len(direct.json()["problems"]) == 2
    open_page(browser, console_url)
    upload_files(browser, "refused", files)
    assert text_of(browser, "#upload-status") == ["error 422: refused, 2 problems found"]
    assert text_of(browser, "#upload-problems li") == direct.json()["problems"]
    assert not row_cells(browser, "refused")


def test_html_in_labels_and_description_renders_as_text(browser, console_url):
    open_page(browser, console_url)
    assert row_cells(browser, "hostile")[3] == ", ".join(HOSTILE_LABELS)
    open_detail(browser, "hostile")
    assert text_of(browser, "#detail-description") == [HOSTILE_DESCRIPTION]
    assert text_of(browser, "#detail-confusion thead th")[1:] == HOSTILE_LABELS
    assert text_of(browser, "#detail-per-class tbody td:first-child") == HOSTILE_LABELS
    close_detail(browser)
    run_prediction(browser, "hostile", "anything")
    assert sorted(text_of(browser, "#try-scores tbody td:first-child")) == sorted(HOSTILE_LABELS)
    assert browser.execute_script("return window.xssFired") is None
    assert browser.execute_script("return document.querySelectorAll('img:not(#detail-plot), script:not([src])')"
                                  ".length") == 0


def test_mixtures_in_memory_are_listed_with_their_parts(browser, console_url):
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 2},
            "adapters": [{"name": "gen-a", "weight": 0.7}, {"name": "pubmedqa", "weight": 0.3}]}
    assert post(f"{console_url}/predict", json=body).status_code == 200
    open_page(browser, console_url)
    wait_for(browser, lambda d: "gen-a" in " ".join(text_of(d, "#mixtures li")), "the mixture is not listed")
    assert text_of(browser, "#mixtures li") == ["linear: gen-a v1 × 0.7 + pubmedqa v1 × 0.3"]


# ---- Swagger UI (/docs): Authorize sends the admin token ---------------------------------------------------------


def swagger_operation(driver, operation_id: str):
    """Expand an operation of /docs and press its "Try it out"; returns the operation's element."""
    from selenium.webdriver.common.by import By

    block = wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f"[id$='-{operation_id}']"),
                     f"{operation_id} not in /docs")[0]
    block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait_for(driver, lambda d: block.find_elements(By.CSS_SELECTOR, ".try-out__btn"), "no Try it out")[0].click()
    return block


def swagger_execute(driver, block) -> tuple[str, str]:
    """Press Execute; the status and body Swagger UI shows for the answer."""
    from selenium.webdriver.common.by import By

    block.find_element(By.CSS_SELECTOR, ".btn.execute").click()
    status = wait_for(driver, lambda d: block.find_elements(By.CSS_SELECTOR,
                                                            ".live-responses-table tbody .response-col_status"),
                      "no response shown")[0]
    body = block.find_element(By.CSS_SELECTOR, ".live-responses-table .response-col_description pre").text
    return status.text.strip(), body


def test_swagger_authorize_then_upload_and_delete(browser, console_url, adapter_store):
    from selenium.webdriver.common.by import By

    browser.get(f"{console_url}/docs")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".btn.authorize"), "no Authorize button")[0].click()
    modal = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".modal-ux"), "no authorize dialog")[0]
    modal.find_element(By.CSS_SELECTOR, "input").send_keys(TOKEN)
    modal.find_element(By.CSS_SELECTOR, ".btn.authorize").click()
    modal.find_element(By.CSS_SELECTOR, ".btn-done").click()

    block = swagger_operation(browser, "upload_adapter_adapters_post")
    name = block.find_element(By.CSS_SELECTOR, "tr[data-property-name='name'] input")
    name.clear()  # Swagger fills in the schema's example
    name.send_keys("from-swagger")
    source = adapter_store / "gen-a"
    for index, path in enumerate((source / "adapter_config.json", source / "adapter_model.safetensors")):
        inputs = block.find_elements(By.CSS_SELECTOR, "tr[data-property-name='files'] input[type=file]")
        if index == len(inputs):
            block.find_element(By.CSS_SELECTOR, "tr[data-property-name='files'] .json-schema-form-item-add").click()
            inputs = block.find_elements(By.CSS_SELECTOR, "tr[data-property-name='files'] input[type=file]")
        inputs[index].send_keys(str(path))
    status, body = swagger_execute(browser, block)
    assert status == "201", body
    assert json.loads(body)["name"] == "from-swagger"
    assert httpx.get(f"{console_url}/adapters/from-swagger").json()["version"] == 1

    block = swagger_operation(browser, "delete_adapter_adapters__name__delete")
    block.find_element(By.CSS_SELECTOR, "tr[data-param-name='name'] input").send_keys("from-swagger")
    status, body = swagger_execute(browser, block)
    assert status == "200", body
    assert httpx.get(f"{console_url}/adapters/from-swagger").status_code == 404
