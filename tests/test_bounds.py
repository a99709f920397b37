"""Bounded work per request (issue: no single request can exhaust the server): body size, input length before
tokenization, undecodable text, hostile JSONL, control characters in log lines, metrics of deleted adapters, and
streams cut by their client."""

from __future__ import annotations

import json
import logging
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.encoding import InputEncoder
from server.logging_setup import TEXT_FORMAT, JsonFormatter, TextFormatter
from server.request_context import RequestIdFilter
from server.types import GenerationParams
from tests.helpers import ADMIN_TOKEN, app_client, folder_files, serve_in_thread, upload


@pytest.fixture
def small_bodies(tiny_settings, engine, store):
    with app_client(tiny_settings, engine, store, max_body_bytes=4096) as client:
        client.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        yield client


# ---- request bodies ---------------------------------------------------------------------------------------------


def test_a_body_over_the_bound_is_413_before_it_is_parsed(small_bodies):
    big = json.dumps({"inputs": "x" * 5000})
    response = small_bodies.post("/predict?adapter=sentiment", content=big,
                                 headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json() == {
        "detail": f"the request body is {len(big)} bytes, over the limit of 4096 (setting max_body_bytes)"
    }
    # not even JSON: refused for its size, not for its syntax
    response = small_bodies.post("/v1/completions", content=b"{" * 5000, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["message"].startswith("the request body is 5000 bytes, over the limit of 4096")
    # within the bound it is served as before
    assert small_bodies.post("/predict?adapter=sentiment", json={"inputs": "fine"}).status_code == 200


def test_a_streamed_body_without_length_is_cut_at_the_bound(tiny_settings, engine, store):
    from server.api import create_app

    settings = tiny_settings.model_copy(update={"adapters_dir": store, "max_body_bytes": 4096})
    with serve_in_thread(create_app(settings, engine=engine)) as url:
        def chunks():
            yield b'{"inputs": "'
            for _ in range(100):
                yield b"x" * 1000  # chunked transfer encoding: no Content-Length to judge by

        response = httpx.post(f"{url}/predict?adapter=sentiment", content=chunks(),
                              headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert response.json() == {
            "detail": "the request body is over the limit of 4096 bytes (setting max_body_bytes)"
        }
        assert httpx.get(f"{url}/health").status_code == 200


def test_uploads_keep_their_own_bound(small_bodies, adapter_store):
    """max_body_bytes (4 KiB here) does not apply to adapter uploads: max_upload_bytes does."""
    response = upload(small_bodies, "topic2", folder_files(adapter_store / "topic"))
    assert response.status_code == 201, response.text


# ---- inputs: length before tokenization, undecodable text -------------------------------------------------------


class CountingTokenizer:
    """A tokenizer that records the length of every text it tokenizes."""

    def __init__(self, tokenizer):
        self.inner = tokenizer
        self.lengths: list[int] = []

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.inner(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)


def test_text_over_the_character_bound_is_refused_untokenized(tokenizer):
    counting = CountingTokenizer(tokenizer)
    encoder = InputEncoder(counting, 256, "tiny")
    longest = max(len(t) for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    assert encoder.max_chars == 256 * longest
    with pytest.raises(Exception) as refused:
        encoder.for_classification(["ok", "y" * (encoder.max_chars + 1)])
    assert str(refused.value) == (f"inputs[1]: input has {encoder.max_chars + 1} characters: no text over "
                                  f"{encoder.max_chars} fits the model's context of 256 tokens")
    assert counting.lengths == [2]  # only the first input was tokenized


def test_a_long_text_is_tokenized_only_until_it_is_over_the_context(tokenizer):
    counting = CountingTokenizer(tokenizer)
    encoder = InputEncoder(counting, 256, "tiny")
    text = "the cat sat on the mat. " * 800  # 19,200 characters: far over 256 tokens, under the character bound
    with pytest.raises(Exception) as refused:
        encoder.for_classification([text])
    assert str(refused.value) == "inputs[0]: input has more than 256 tokens, over the model's context of 256"
    assert counting.lengths == [16 * 256]  # one prefix told it
    # a text within the context is tokenized whole, exactly as before
    counting.lengths.clear()
    assert encoder.for_classification(["the cat sat"]) == [tokenizer("the cat sat")["input_ids"]]
    # generation: the prompt's exact count, with the new tokens
    with pytest.raises(Exception) as refused:
        encoder.for_generation(["a b c " * 80], GenerationParams(max_new_tokens=100, chat=False))
    assert "input has 241 tokens + 100 new tokens, over the model's context of 256" in str(refused.value)


SURROGATE = {"inputs": "fine \udfff here"}


def post_escaped(client, path: str, body: dict):
    """JSON as a client may send it: a lone surrogate as a \\u escape (valid JSON, not valid UTF-8 text)."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


@pytest.mark.parametrize("path, body, field", [
    ("/predict?adapter=sentiment", SURROGATE, "inputs[0]"),
    ("/predict?adapter=gen-a", SURROGATE, "inputs[0]"),
    ("/predict", {"inputs": ["ok", "\ud800"]}, "inputs[1]"),
])
def test_a_lone_surrogate_is_a_422_naming_the_input(client, path, body, field):
    response = post_escaped(client, path, body)
    assert response.status_code == 422
    assert response.json()["detail"].startswith(f"{field}: not valid Unicode text: a lone surrogate (U+")


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"model": "gen-a", "prompt": "a \udfff"}, "inputs[0]"),
    ("/v1/chat/completions", {"model": "gen-a", "messages": [{"role": "user", "content": "\udfff"}]},
     "messages[0].content"),
    ("/v1/embeddings", {"model": "gen-a", "input": ["x", "\udfff"]}, "input[1]"),
])
def test_a_lone_surrogate_on_the_openai_routes_is_a_400_naming_it(client, path, body, param):
    response = post_escaped(client, path, body)
    assert response.status_code in (400, 422)
    assert "not valid Unicode text: a lone surrogate (U+DFFF)" in response.json()["error"]["message"]
    assert param in response.json()["error"]["message"]


# ---- fine-tuning files --------------------------------------------------------------------------------------------


def test_jsonl_nested_too_deeply_is_a_400_naming_the_line(small_bodies):
    content = b'{"prompt": "a", "completion": "b"}\n' + b"[" * 50_000 + b"\n"
    response = small_bodies.post("/v1/files", data={"purpose": "fine-tune"},
                                 files={"file": ("deep.jsonl", content, "application/jsonl")})
    assert response.status_code == 400
    assert response.json()["error"]["message"].endswith("line 2: JSON nested too deeply")


# ---- log lines ----------------------------------------------------------------------------------------------------


def test_a_client_value_cannot_forge_or_break_a_log_line(client, caplog):
    id_filter = RequestIdFilter()
    caplog.handler.addFilter(id_filter)
    caplog.set_level(logging.INFO, logger="server.requests")
    try:
        forged = "x\n2026-12-06 11:00:00,000 WARNING server.registry [-]: forged\x00"
        assert client.get("/adapters/" + forged.replace("\n", "%0a").replace("\x00", "%00")).status_code == 404
    finally:
        caplog.handler.removeFilter(id_filter)
    [record] = [r for r in caplog.records if r.name == "server.requests"]
    text = TextFormatter(TEXT_FORMAT).format(record)
    assert "\n" not in text and "\x00" not in text
    assert "/adapters/x\\x0a2026-12-06 11:00:00,000 WARNING server.registry [-]: forged\\x00 404" in text
    line = JsonFormatter().format(record)
    assert "\n" not in line and json.loads(line)["path"] == "/adapters/" + forged


# ---- metrics of deleted adapters ---------------------------------------------------------------------------------


def test_a_deleted_adapters_series_leave_metrics(admin, adapter_store):
    sizes = []
    for cycle in range(3):
        name = f"churn{cycle}"
        assert upload(admin, name, folder_files(adapter_store / "topic")).status_code == 201
        assert admin.post(f"/predict?adapter={name}", json={"inputs": "a"}).status_code == 200
        assert f'adapter="{name}"' in admin.get("/metrics").text
        assert admin.delete(f"/adapters/{name}").status_code == 200
        text = admin.get("/metrics").text
        assert f'adapter="{name}"' not in text
        sizes.append(len(text.splitlines()))
    assert sizes[0] == sizes[1] == sizes[2]  # bounded by the adapters alive, not by the ones ever served


# ---- streams cut by their client ---------------------------------------------------------------------------------


def test_a_stream_its_client_left_is_logged_as_499(tiny_settings, engine, store, caplog):
    from server.api import create_app

    caplog.set_level(logging.INFO, logger="server.requests")
    settings = tiny_settings.model_copy(update={"adapters_dir": store})
    with serve_in_thread(create_app(settings, engine=engine)) as url:
        body = json.dumps({"inputs": "go on", "stream": True,
                           "parameters": {"max_new_tokens": 200, "temperature": 0}}).encode()
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # the stream has started
        deadline_s = 5.0
        import time

        end = time.monotonic() + deadline_s
        while not [r for r in caplog.records if r.name == "server.requests" and r.path == "/predict"]:
            assert time.monotonic() < end, "no log line for the stream"
            time.sleep(0.01)
    [record] = [r for r in caplog.records if r.name == "server.requests" and r.path == "/predict"]
    assert record.status == 499


# ---- shutdown past the drain timeout ------------------------------------------------------------------------------


def test_past_the_drain_timeout_work_is_cut_with_503_and_the_process_exits(tiny_base, adapter_store, tmp_path):
    """A request of 64 rows in about 4,000 chunks is still running when the 1 s drain timeout passes."""
    import shutil
    import signal
    import time

    from tests.helpers import server_process

    store = tmp_path / "store"
    shutil.copytree(adapter_store / "sentiment", store / "sentiment")
    log_path = tmp_path / "server.log"
    flags = ("--num-threads", "1", "--max-batch-tokens", "4", "--drain-timeout-s", "1")
    with server_process(tiny_base, store, log_path, *flags) as (url, process):
        with ThreadPoolExecutor(1) as pool:
            big = pool.submit(httpx.post, f"{url}/predict?adapter=sentiment", timeout=120,
                              json={"inputs": ["word " * 240] * 64})
            deadline = time.monotonic() + 30
            while "loraswap_admitted_rows 64.0" not in httpx.get(f"{url}/metrics").text:
                assert time.monotonic() < deadline, "the request was not admitted"
                time.sleep(0.05)
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            response = big.result()
        assert response.status_code == 503, response.text
        assert response.json() == {"detail": "the server is shutting down: the request was cut at its drain timeout"}
        assert process.wait(timeout=30) == 0
        exited_s = time.monotonic() - signalled
    assert exited_s < 1 + 20, exited_s  # the bar: the drain timeout + 20 s
    assert "drain timeout: 1 requests still in flight are cut (503); exiting" in log_path.read_text()
