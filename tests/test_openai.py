"""The OpenAI-compatible routes: error shapes in-process, then the official `openai` client against a real server."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import LABELS
from tests.helpers import server_process

ADAPTERS = {"gen-a", "gen-b", "gen-mlp", "sentiment", "topic"}
MESSAGES = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
]


def error(message: str, param: str | None, code: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---- in-process: shapes and statuses ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, payload, status, body",
    [
        ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404,
         error("The model 'nope' does not exist (GET /v1/models lists the models)", "model", "model_not_found")),
        ("/v1/completions", {"model": "gen-a", "prompt": "hi", "n": 2}, 400,
         error("n: Value error, only n=1 is supported", "n")),
        ("/v1/completions", {"model": "gen-a", "prompt": "hi", "max_tokens": 5000}, 400,
         error("max_tokens: 5000 is over the limit of 1024", "max_tokens")),
        ("/v1/completions", {"model": "gen-a", "prompt": "hi", "temperature": 3}, 400,
         error("temperature: Input should be less than or equal to 2", "temperature")),
        ("/v1/completions", {"model": "gen-a", "prompt": "hi", "suffix": "!"}, 400,
         error("suffix: Extra inputs are not permitted", "suffix")),
        ("/v1/completions", {"model": "gen-a", "prompt": ["a", "b"], "stream": True}, 400,
         error("prompt: a streamed request takes one prompt, not 2", "prompt")),
        ("/v1/chat/completions", {"model": "gen-a", "messages": []}, 400,
         error("messages: List should have at least 1 item after validation, not 0", "messages")),
        ("/v1/chat/completions", {"model": "gen-a", "messages": [{"role": "robot", "content": "x"}]}, 400,
         error("messages[0].role: Input should be 'system', 'user' or 'assistant'", "messages[0].role")),
        ("/v1/chat/completions", {"model": "sentiment", "messages": [{"role": "system", "content": "x"}]}, 400,
         error("messages: a classification adapter needs a non-empty user message", "messages")),
    ],
)
def test_errors_have_openai_shape_and_status(client, path, payload, status, body):
    response = client.post(path, json=payload)
    assert (response.status_code, response.json()) == (status, body)


def test_not_ready_is_503_in_openai_shape(tiny_settings):
    from fastapi.testclient import TestClient

    from server.api import create_app

    with TestClient(create_app(tiny_settings.model_copy(update={"base_model": Path("/nonexistent")}))) as client:
        response = client.get("/v1/models")
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "server_error"


def test_completions_with_several_prompts(client):
    response = client.post(
        "/v1/completions", json={"model": "sentiment", "prompt": ["great film", "awful film"], "max_tokens": 3}
    )
    assert response.status_code == 200
    body = response.json()
    expected = client.post("/predict?adapter=sentiment", json={"inputs": ["great film", "awful film"]}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["text"] for c in body["choices"]] == [o["label"] for o in expected["outputs"]]
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] > 0



def test_ignore_eos_generates_max_tokens_past_the_eos(client, engine, tiny_base):
    """EOS is made the first token greedy decoding picks that it had not picked before: the answer stops there,
    unless `ignore_eos` (vLLM's and llama.cpp's field), which generates every asked token, that one among them."""
    from server.types import GenerationParams

    prompt = "Tell me a story"  # the tiny random base often repeats one token: not on this one
    [free] = engine.generate([prompt], None, GenerationParams(max_new_tokens=6, chat=False))
    end = next(i for i, t in enumerate(free.token_ids) if i > 0 and t not in free.token_ids[:i])
    body = {"model": tiny_base.name, "prompt": prompt, "max_tokens": 6, "temperature": 0}
    eos = engine.runner.eos
    engine.runner.call(lambda: setattr(engine.runner, "eos", free.token_ids[end]))
    try:
        stopped = client.post("/v1/completions", json=body).json()
        ignored = client.post("/v1/completions", json={**body, "ignore_eos": True}).json()
    finally:
        engine.runner.call(lambda: setattr(engine.runner, "eos", eos))
    assert (stopped["choices"][0]["finish_reason"], stopped["usage"]["completion_tokens"]) == ("stop", end)
    assert (ignored["choices"][0]["finish_reason"], ignored["usage"]["completion_tokens"]) == ("length", 6)
    assert stopped["choices"][0]["text"] == engine.tokenizer.decode(free.token_ids[:end])


# ---- a real server process and the official client ------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_base, adapter_store, tmp_path_factory):
    """`python -m server` on a free port, JSON logs into a file; stopped when the module's tests are done."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with server_process(tiny_base, adapter_store, log_path, "--log-format", "json") as (url, _):
        yield url, log_path


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def base_name(tiny_base) -> str:
    return tiny_base.name


def test_models_list_has_the_base_and_every_adapter(oai, base_name):
    models = {m.id: m for m in oai.models.list()}
    assert set(models) == ADAPTERS | {base_name}
    assert models[base_name].parent is None
    assert {models[a].parent for a in ADAPTERS} == {base_name}
    assert all(m.object == "model" and m.owned_by == "loraswap" for m in models.values())


@pytest.mark.parametrize("model", ["gen-a", "base"])
def test_completion_equals_predict(oai, server, model, base_name):
    model = base_name if model == "base" else model
    completion = oai.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
    query = "" if model == base_name else f"?adapter={model}"
    expected = httpx.post(
        f"{server[0]}/predict{query}",
        json={"inputs": "Once upon a time", "parameters": {"max_new_tokens": 8, "chat": False}},
    ).json()["outputs"][0]
    [choice] = completion.choices
    assert completion.object == "text_completion" and completion.model == model
    assert (choice.text, choice.finish_reason) == (expected["generated_text"], expected["finish_reason"])
    assert completion.usage.prompt_tokens == expected["prompt_tokens"]
    assert completion.usage.completion_tokens == expected["tokens"]
    assert completion.usage.total_tokens == expected["prompt_tokens"] + expected["tokens"]


def test_completion_stream_concatenates_to_the_answer(oai):
    kwargs = {"model": "gen-b", "prompt": "The weather today", "max_tokens": 10, "temperature": 0}
    whole = oai.completions.create(**kwargs)
    chunks = list(oai.completions.create(**kwargs, stream=True))
    assert len(chunks) > 2
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert {c.id for c in chunks} == {chunks[0].id}


def test_chat_applies_the_template_to_the_whole_conversation(oai, tokenizer):
    chat = oai.chat.completions.create(model="gen-a", messages=MESSAGES, max_tokens=6, temperature=0)
    templated = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert chat.usage.prompt_tokens == len(tokenizer(templated, add_special_tokens=False)["input_ids"])
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens <= 6


def test_chat_stream_concatenates_to_the_answer(oai):
    kwargs = {"model": "gen-mlp", "messages": MESSAGES, "max_tokens": 10, "temperature": 0}
    whole = oai.chat.completions.create(**kwargs)
    chunks = list(oai.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    *_, last_choice, usage_chunk = chunks
    assert last_choice.choices[0].finish_reason == whole.choices[0].finish_reason
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage


def test_classification_adapter_answers_with_its_label(oai, server):
    text = "an absolute joy to watch"
    expected = httpx.post(f"{server[0]}/predict?adapter=sentiment", json={"inputs": text}).json()["outputs"][0]
    chat = oai.chat.completions.create(model="sentiment", messages=[{"role": "user", "content": text}])
    assert chat.choices[0].message.content == expected["label"] and expected["label"] in LABELS
    assert chat.choices[0].finish_reason == "stop"
    chunks = list(oai.chat.completions.create(
        model="sentiment", messages=[{"role": "user", "content": text}], stream=True
    ))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected["label"]


def test_client_errors(oai):
    with pytest.raises(openai.NotFoundError) as not_found:
        oai.completions.create(model="no-such-adapter", prompt="hi")
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model="gen-a", messages=[{"role": "user", "content": "hi"}], n=2)
    assert bad.value.param == "n"


def test_server_logs_one_json_line_per_request(oai, server):
    oai.completions.create(model="topic", prompt="a request to find in the log", max_tokens=2)

    def entries() -> list[dict]:  # every line, the base's loading included, is one JSON object
        return [json.loads(line) for line in server[1].read_text().splitlines()]

    deadline = time.monotonic() + 10  # the line is written once the answer has gone out
    while not any(e.get("adapter") == "topic" for e in entries()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(e["logger"].startswith("uvicorn") for e in entries())  # uvicorn's own lines are JSON too
    last = [e for e in entries() if e["logger"] == "server.requests"][-1]
    assert (last["method"], last["path"], last["status"], last["adapter"]) == ("POST", "/v1/completions", 200, "topic")
    assert last["tokens_in"] > 0 and last["tokens_out"] == 0 and last["latency_ms"] > 0


def test_concurrent_chat_requests_share_forwards(tiny_settings):
    """Non-streamed chat completions go through the scheduler like /predict: concurrent ones batch together."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from server.api import create_app
    from server.engine import Engine

    settings = tiny_settings.model_copy(update={"max_wait_ms": 200.0, "auto_merge": False})
    engine = Engine.from_settings(settings)
    try:
        with TestClient(create_app(settings, engine=engine)) as client:

            def ask(model: str) -> str:
                body = {"model": model, "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
                response = client.post("/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
                return response.json()["choices"][0]["message"]["content"]

            alone = {model: ask(model) for model in ("gen-a", "gen-b")}
            engine.batch_sizes.clear()
            with ThreadPoolExecutor(max_workers=4) as pool:
                together = list(pool.map(lambda m: (m, ask(m)), ["gen-a", "gen-b"] * 2))
    finally:
        engine.close()
    assert max(engine.batch_sizes) > 1, engine.batch_sizes
    assert all(text == alone[model] for model, text in together)


# ---- logprobs through the official client ------------------------------------------------------------------------


def test_completion_logprobs_and_echo(oai, tokenizer):
    prompt = "The weather today"
    plain = oai.completions.create(model="gen-b", prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    echoed = oai.completions.create(model="gen-b", prompt=prompt, max_tokens=5, temperature=0, logprobs=2, echo=True)
    prompt_tokens = len(tokenizer(prompt)["input_ids"])
    [choice], [echo] = plain.choices, echoed.choices
    assert echo.text == prompt + choice.text
    assert echo.logprobs.tokens[prompt_tokens:] == choice.logprobs.tokens
    assert echo.logprobs.token_logprobs[prompt_tokens:] == pytest.approx(choice.logprobs.token_logprobs, abs=1e-5)
    assert echo.logprobs.token_logprobs[0] is None and echo.logprobs.top_logprobs[0] is None
    assert all(len(top) in (2, 3) for top in echo.logprobs.top_logprobs[1:])  # n best + the chosen one
    scored = oai.completions.create(model="gen-b", prompt=tokenizer(prompt)["input_ids"], max_tokens=0, echo=True,
                                    logprobs=1)
    assert scored.choices[0].logprobs.token_logprobs == pytest.approx(
        echo.logprobs.token_logprobs[:prompt_tokens], abs=1e-5)


def test_streamed_logprobs_equal_the_whole_answers(oai):
    kwargs = {"model": "gen-a", "prompt": "Tell me a story", "max_tokens": 8, "temperature": 0, "logprobs": 3}
    whole = oai.completions.create(**kwargs).choices[0].logprobs
    chunks = [c.choices[0] for c in oai.completions.create(**kwargs, stream=True)]
    streamed = [c.logprobs for c in chunks if c.logprobs is not None]
    assert [t for lp in streamed for t in lp.tokens] == whole.tokens
    assert [t for lp in streamed for t in lp.text_offset] == whole.text_offset
    assert [x for lp in streamed for x in lp.token_logprobs] == pytest.approx(whole.token_logprobs, abs=1e-5)
    assert [x for lp in streamed for x in lp.top_logprobs] == whole.top_logprobs

    chat = {"model": "gen-a", "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "logprobs": True,
            "top_logprobs": 2}
    content = oai.chat.completions.create(**chat).choices[0].logprobs.content
    stream = list(oai.chat.completions.create(**chat, stream=True))
    streamed_content = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed_content] == [t.token for t in content]
    assert [t.logprob for t in streamed_content] == pytest.approx([t.logprob for t in content], abs=1e-5)
    assert [[a.token for a in t.top_logprobs] for t in streamed_content] == [
        [a.token for a in t.top_logprobs] for t in content]


def test_chat_top_logprobs(oai):
    chat = oai.chat.completions.create(model="gen-mlp", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for token in content:
        assert len(token.top_logprobs) == 3 and token.bytes == list(token.token.encode())
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob, abs=1e-6)  # greedy takes the best
        assert [t.logprob for t in token.top_logprobs] == sorted((t.logprob for t in token.top_logprobs), reverse=True)


def test_embeddings_through_the_client(oai, base_name, tiny_base, adapter_store, tokenizer):
    """The client asks for base64 by default and decodes it; the vectors are PEFT's, and the adapter's own."""
    import torch

    from tests.helpers import peft_reference_embeddings

    texts = ["a gorgeous, witty film", "dull and lifeless"]
    adapted = oai.embeddings.create(model="gen-mlp", input=texts)
    base = oai.embeddings.create(model=base_name, input=texts)
    ours = torch.tensor([d.embedding for d in adapted.data])
    assert ours.shape == (2, 64) and torch.allclose(ours.norm(dim=-1), torch.ones(2), atol=1e-6)
    reference = peft_reference_embeddings(tiny_base, adapter_store / "gen-mlp", texts, tokenizer)
    assert torch.allclose(ours, reference, atol=1e-5)
    assert (ours - torch.tensor([d.embedding for d in base.data])).abs().max() > 1e-2
    assert adapted.usage.prompt_tokens == sum(len(tokenizer(t)["input_ids"]) for t in texts)
    floats = oai.embeddings.create(model="gen-mlp", input=texts, encoding_format="float")
    assert [d.embedding for d in floats.data] == [d.embedding for d in adapted.data]
    with pytest.raises(openai.BadRequestError) as refused:
        oai.embeddings.create(model="gen-mlp", input=texts, dimensions=16)
    assert refused.value.param == "dimensions"
