"""/metrics after known traffic, and the one log line per request (text and JSON)."""

from __future__ import annotations

import json
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

TEXT = "what a lovely day"


@pytest.fixture
def one_slot_client(tiny_settings):
    """Its own app and engine with one adapter slot, so that every switch of adapter is an eviction."""
    from fastapi.testclient import TestClient

    from server.api import create_app
    from server.engine import Engine

    settings = tiny_settings.model_copy(update={"max_loaded_adapters": 1})
    engine = Engine.from_settings(settings)
    with TestClient(create_app(settings, engine=engine)) as client:
        yield client
    engine.close()


def scrape(client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_count_the_traffic(one_slot_client, tokenizer):
    client = one_slot_client
    gen = {"inputs": TEXT, "parameters": {"max_new_tokens": 3}}
    answers = [client.post("/predict?adapter=gen-a", json=gen) for _ in range(2)]
    answers.append(client.post("/predict?adapter=gen-a", json={**gen, "stream": True}))  # counted at its end
    assert [a.status_code for a in answers] == [200] * 3
    too_long = {"inputs": TEXT, "parameters": {"max_new_tokens": 5000}}
    assert client.post("/predict?adapter=gen-a", json=too_long).status_code == 422
    assert client.post("/predict?adapter=nope", json=gen).status_code == 404
    assert client.post("/predict?adapter=gen-a", json={"inputs": ""}).status_code == 422  # refused by the schema
    assert client.post("/v1/completions", json={"model": "gen-a", "prompt": "x", "n": 2}).status_code == 400
    assert client.get("/health").status_code == 200  # not an inference request: no per-adapter metrics
    for _ in range(2):
        assert client.post("/predict?adapter=sentiment", json={"inputs": TEXT}).status_code == 200
    assert client.post("/predict", json=gen).status_code == 200

    m = scrape(client)
    requests = {labels: v for (name, labels), v in m.items() if name == "loraswap_requests_total"}
    assert requests == {
        (("adapter", "gen-a"), ("status", "200")): 3,
        (("adapter", "gen-a"), ("status", "422")): 1,
        (("adapter", "__unknown__"), ("status", "404")): 1,
        (("adapter", "__unknown__"), ("status", "422")): 1,
        (("adapter", "__unknown__"), ("status", "400")): 1,
        (("adapter", "sentiment"), ("status", "200")): 2,
        (("adapter", "__base__"), ("status", "200")): 1,
    }
    assert m[("loraswap_request_duration_seconds_count", (("adapter", "gen-a"),))] == 4
    assert m[("loraswap_request_duration_seconds_count", (("adapter", "sentiment"),))] == 2
    streamed_result = json.loads(answers[2].text.strip().split("\n\n")[-1].split("data: ", 1)[1])
    outputs = [a.json()["outputs"][0] for a in answers[:2]] + streamed_result["outputs"]
    assert m[("loraswap_input_tokens_total", (("adapter", "gen-a"),))] == sum(o["prompt_tokens"] for o in outputs)
    assert m[("loraswap_output_tokens_total", (("adapter", "gen-a"),))] == sum(o["tokens"] for o in outputs)
    assert m[("loraswap_input_tokens_total", (("adapter", "sentiment"),))] == 2 * len(tokenizer(TEXT)["input_ids"])
    assert m[("loraswap_output_tokens_total", (("adapter", "sentiment"),))] == 0
    # one slot: gen-a loads, sentiment evicts it; the 422 and the base requests load nothing
    assert m[("loraswap_adapter_load_seconds_count", (("adapter", "gen-a"),))] == 1
    assert m[("loraswap_adapter_load_seconds_count", (("adapter", "sentiment"),))] == 1
    assert m[("loraswap_adapter_evictions_total", (("adapter", "gen-a"),))] == 1
    assert ("loraswap_adapter_evictions_total", (("adapter", "sentiment"),)) not in m
    # one observation per forward: 2 classification forwards, and per generation a prefill and then decode steps
    forwards = client.app.state.services.engine.batch_sizes
    assert forwards[1] >= 2 + 4 * 3 and set(forwards) == {1}  # one request at a time: one row each
    assert m[("loraswap_batch_size_count", ())] == forwards.total()
    assert m[("loraswap_batch_size_sum", ())] == sum(size * n for size, n in forwards.items())
    assert m[("loraswap_loaded_adapters", ())] == 1
    assert m[("loraswap_queue_depth", ())] == 0
    assert m[("loraswap_decoding_rows", ())] == 0
    assert not any(name == "loraswap_merged_adapter" for name, _ in m)
    services = client.app.state.services
    slot = services.engine.acquire(services.registry.locate("sentiment"))
    try:
        services.engine.merge(slot)
        assert scrape(client)[("loraswap_merged_adapter", (("adapter", "sentiment"),))] == 1
        services.engine.unmerge()
    finally:
        services.engine.release(slot)


def test_apps_keep_their_own_metrics(tiny_settings, engine, client):
    """Two apps on one engine: each scrape shows only its own app's requests."""
    from fastapi.testclient import TestClient

    from server.api import create_app

    with TestClient(create_app(tiny_settings, engine=engine)) as other:
        other.post("/predict?adapter=sentiment", json={"inputs": TEXT})
        other_requests = {k: v for k, v in scrape(other).items() if k[0] == "loraswap_requests_total"}
    assert other_requests == {("loraswap_requests_total", (("adapter", "sentiment"), ("status", "200"))): 1}
    assert engine.observers == [client.app.state.services.metrics]  # the closed app has let go of the engine


def test_one_log_line_per_request_and_health_and_metrics_polls_at_debug(client, caplog):
    with caplog.at_level(logging.DEBUG, logger="server.requests"):
        client.post("/predict?adapter=gen-a", json={"inputs": TEXT, "parameters": {"max_new_tokens": 2}})
        client.get("/health")
        client.get("/metrics")
    first, health, metrics = [r for r in caplog.records if r.name == "server.requests"]
    assert (first.method, first.path, first.status, first.adapter) == ("POST", "/predict?adapter=gen-a", 200, "gen-a")
    assert first.tokens_out == 2 and first.tokens_in > 0 and first.latency_ms > 0
    assert first.levelno == logging.INFO and first.getMessage().startswith("POST /predict?adapter=gen-a 200 ")
    assert (health.path, health.status, health.adapter, health.tokens_in) == ("/health", 200, None, 0)
    assert (health.levelno, metrics.levelno, metrics.path) == (logging.DEBUG, logging.DEBUG, "/metrics")


def test_json_log_format_carries_the_request_fields(client, caplog):
    from server.logging_setup import JsonFormatter

    with caplog.at_level(logging.INFO, logger="server.requests"):
        client.post("/predict?adapter=sentiment", json={"inputs": TEXT})
    [record] = [r for r in caplog.records if r.name == "server.requests"]
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert set(entry) == {
        "time", "level", "logger", "message", "method", "path", "status", "latency_ms", "adapter", "tokens_in",
        "tokens_out",
    }
    assert (entry["level"], entry["logger"], entry["status"], entry["adapter"]) == (
        "INFO", "server.requests", 200, "sentiment"
    )
    assert entry["tokens_out"] == 0
