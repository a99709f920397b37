"""Streaming generation: the engine's generate_stream and /predict as server-sent events."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.encoding import TextDeltas
from server.engine import Engine
from server.types import AdapterLocation, GenerationParams

PROMPT = "Tell me a story about a dragon"


def split_stream(items: list) -> tuple[list[str], object]:
    *deltas, final = items
    assert all(isinstance(d, str) and d for d in deltas)
    return deltas, final


@pytest.mark.parametrize("adapter", [None, "gen-b"])
def test_stream_ends_with_the_non_streaming_answer(engine, adapter_store, adapter):
    location = None if adapter is None else AdapterLocation(adapter, 1, adapter_store / adapter)
    params = GenerationParams(max_new_tokens=12)
    _, [expected] = engine.predict(location, [PROMPT], params)
    deltas, final = split_stream(list(engine.predict_stream(location, PROMPT, params)))
    assert final == expected
    assert "".join(deltas) == expected.generated_text
    assert len(deltas) > 1


def test_concurrent_streams_share_forwards_and_each_gets_its_own_answer(tiny_settings, adapter_store):
    """Streams of different adapters and budgets, with a non-streamed request, go through one generate call."""
    engine = Engine.from_settings(tiny_settings.model_copy(update={"max_wait_ms": 300.0, "auto_merge": False}))
    cases = [(None, 12), ("gen-a", 5), ("gen-b", 9), ("gen-a", 12)]
    locations = {name: AdapterLocation(name, 1, adapter_store / name) for name in ("gen-a", "gen-b")}
    try:
        alone = [engine.predict(locations.get(name), [PROMPT], GenerationParams(max_new_tokens=n))[1][0]
                 for name, n in cases]
        engine.batch_sizes.clear()

        def stream(case):
            name, n = case
            params = GenerationParams(max_new_tokens=n)
            return split_stream(list(engine.predict_stream(locations.get(name), PROMPT, params)))

        with ThreadPoolExecutor(max_workers=5) as pool:
            plain = pool.submit(engine.predict, locations["gen-b"], [PROMPT], GenerationParams(max_new_tokens=9))
            streamed = list(pool.map(stream, cases))
    finally:
        engine.close()
    assert max(engine.batch_sizes) > 1, engine.batch_sizes
    assert plain.result()[1][0] == alone[2]
    for (deltas, final), expected in zip(streamed, alone):
        assert final == expected
        assert "".join(deltas) == expected.generated_text


def test_a_streamed_row_survives_a_failed_step_and_sends_each_token_once(tiny_settings):
    """A decode step that fails mid-stream is rerun row by row from the cache as it was before it; the stream still
    concatenates to its answer (no token sent twice), and its batch mate still gets its own."""
    engine = Engine.from_settings(tiny_settings.model_copy(update={"max_wait_ms": 300.0, "auto_merge": False}))
    params = GenerationParams(max_new_tokens=10)
    failures = []
    two_row_steps = []

    def fail_once(rows: int) -> None:
        if rows == 2:  # a decode step of the two rows
            two_row_steps.append(1)
            if len(two_row_steps) == 4 and not failures:
                failures.append(1)
                raise RuntimeError("step failed")

    try:
        alone = engine.predict(None, [PROMPT], params)[1][0]
        other_alone = engine.predict(None, ["another prompt"], params)[1][0]
        assert alone.tokens > 5
        layer = next(iter(engine.layers.values()))  # the eager step's forwards, and the C step's
        engine.runner.call(lambda: layer.register_forward_pre_hook(
            lambda module, args: fail_once(args[0].shape[0]) if args[0].shape[1] == 1 else None))
        lean = engine.runner.lean
        serving = lean.fused if lean.fused is not None else lean.row_step  # the C step, else the compiled one
        step = serving.step

        def failing_step(first, *args):  # type: ignore[no-untyped-def]
            fail_once(first.shape[0])  # its first argument has a row per row
            return step(first, *args)

        serving.step = failing_step  # type: ignore[method-assign]
        with ThreadPoolExecutor(max_workers=1) as pool:
            other = pool.submit(engine.predict, None, ["another prompt"], params)
            deltas, final = split_stream(list(engine.predict_stream(None, PROMPT, params)))
    finally:
        engine.close()
    assert failures  # the shared step did fail
    assert final == alone
    assert "".join(deltas) == alone.generated_text
    assert other.result()[1][0] == other_alone


def test_stream_with_a_stop_string_never_sends_text_past_it(engine, adapter_store):
    location = AdapterLocation("gen-a", 1, adapter_store / "gen-a")
    free = engine.predict(location, ["x"], GenerationParams(max_new_tokens=12))[1][0].generated_text
    if len(free) < 6:
        pytest.skip("the tiny model produced too little text to pick a stop string")
    params = GenerationParams(max_new_tokens=12, stop=(free[4:6],))
    _, [expected] = engine.predict(location, ["x"], params)
    deltas, final = split_stream(list(engine.predict_stream(location, "x", params)))
    assert final == expected and expected.finish_reason == "stop"
    assert "".join(deltas) == expected.generated_text == free[: free.find(free[4:6])]


def test_text_deltas_hold_back_unfinished_characters(tokenizer):
    text = "Café 🙂 naïve 東京 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # multi-byte characters span several byte-level tokens
    deltas = TextDeltas(tokenizer, ())
    sent = [deltas.add(i) for i in ids]
    assert all("\ufffd" not in d for d in sent)
    assert "".join(sent) + deltas.finish(text) == text


def test_text_deltas_hold_back_a_possible_stop_string(tokenizer):
    ids = tokenizer("one two three four", add_special_tokens=False)["input_ids"]
    deltas = TextDeltas(tokenizer, ("three",))
    sent = "".join(deltas.add(i) for i in ids)
    assert sent == "one two "
    assert deltas.finish("one two ") == ""


def test_closing_a_stream_early_frees_its_row(engine):
    forwards_before = sum(engine.batch_sizes.values())
    stream = engine.predict_stream(None, PROMPT, GenerationParams(max_new_tokens=200))
    assert isinstance(next(stream), str)
    stream.close()
    _, [result] = engine.predict(None, ["hi"], GenerationParams(max_new_tokens=2))
    assert result.tokens == 2
    assert engine.runner.decoding == 0  # the abandoned row left at its next step
    assert sum(engine.batch_sizes.values()) - forwards_before < 50  # not 200 steps
    assert engine.queue_depth == 0


def events(response) -> list[tuple[str, dict]]:
    out = []
    for block in response.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_predict_stream_events_end_with_the_non_streaming_body(client):
    payload = {"inputs": PROMPT, "parameters": {"max_new_tokens": 10}}
    expected = client.post("/predict?adapter=gen-a", json=payload).json()
    response = client.post("/predict?adapter=gen-a", json={**payload, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    received = events(response)
    *deltas, (last_event, last) = received
    assert last_event == "result" and last == expected
    assert {name for name, _ in deltas} == {"delta"}
    assert "".join(d["text"] for _, d in deltas) == expected["outputs"][0]["generated_text"]


def test_predict_stream_of_a_classifier_is_its_result(client):
    payload = {"inputs": "a fine film"}
    expected = client.post("/predict?adapter=sentiment", json=payload).json()
    response = client.post("/predict?adapter=sentiment", json={**payload, "stream": True})
    assert events(response) == [("result", expected)]


def test_predict_stream_errors_keep_their_status(client):
    response = client.post("/predict?adapter=nope", json={"inputs": "hi", "stream": True})
    assert response.status_code == 404
    response = client.post("/predict?adapter=gen-a", json={"inputs": ["a", "b"], "stream": True})
    assert response.status_code == 422
    assert response.json() == {"detail": "inputs: a streamed request takes one input, not 2"}
    response = client.post("/predict?adapter=gen-a", json={"inputs": "word " * 400, "stream": True})
    assert response.status_code == 422 and "context" in response.json()["detail"]

