"""Token logprobs (OpenAI's logprobs, echo and top_logprobs; /predict details) against plain PEFT's log-softmax."""

from __future__ import annotations

import pytest

from tests.helpers import peft_reference_logprobs

TOLERANCE = 1e-4


def check_entries(tokens, token_logprobs, top_logprobs, ids, reference, decode, top_n) -> None:
    """Legacy completions logprobs of `ids` (its first token unscored) against a [len(ids), vocab] reference."""
    assert tokens == [decode([t]) for t in ids]
    assert token_logprobs[0] is None and top_logprobs[0] is None
    for t in range(1, len(ids)):
        expected = reference[t - 1]
        assert token_logprobs[t] == pytest.approx(float(expected[ids[t]]), abs=TOLERANCE)
        best = expected.topk(top_n)
        wanted = {decode([int(i)]): float(v) for i, v in zip(best.indices, best.values)}
        wanted.setdefault(tokens[t], float(expected[ids[t]]))
        assert top_logprobs[t].keys() == wanted.keys()
        assert list(top_logprobs[t].values()) == pytest.approx(list(wanted.values()), abs=TOLERANCE)


def test_echo_scores_token_id_prompts_of_different_lengths(client, tiny_base, adapter_store, tokenizer):
    """What lm-evaluation-harness sends for a log-likelihood: ids, echo, max_tokens 0; rows padded to one width."""
    prompts = [tokenizer("The quick brown fox jumps over")["input_ids"], tokenizer("A short one")["input_ids"]]
    body = {"model": "gen-b", "prompt": prompts, "echo": True, "logprobs": 3, "max_tokens": 0, "temperature": 0}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert response.json()["usage"] == {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": 0,
                                        "total_tokens": sum(map(len, prompts))}
    for choice, ids in zip(choices, prompts):
        assert choice["text"] == tokenizer.decode(ids) and choice["finish_reason"] == "length"
        logprobs = choice["logprobs"]
        reference = peft_reference_logprobs(tiny_base, adapter_store / "gen-b", ids)
        check_entries(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], ids, reference,
                      tokenizer.decode, 3)
        lengths = [len(t) for t in logprobs["tokens"]]
        assert logprobs["text_offset"] == [sum(lengths[:i]) for i in range(len(ids))]


def test_generated_tokens_logprobs_come_from_their_own_step(client, tiny_base, adapter_store, tokenizer):
    """echo + generation: the prompt's logprobs from the prefill, each new token's from the step that chose it,
    all equal to one PEFT forward over prompt + answer."""
    prompt = "Once upon a time"
    body = {"model": "gen-a", "prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 6, "temperature": 0}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    answer = client.post("/predict?adapter=gen-a", json={
        "inputs": prompt, "parameters": {"max_new_tokens": 6, "chat": False, "details": True}}).json()["outputs"][0]
    assert choice["text"] == prompt + answer["generated_text"]
    ids = tokenizer(prompt)["input_ids"] + answer["token_ids"]
    reference = peft_reference_logprobs(tiny_base, adapter_store / "gen-a", ids)
    logprobs = choice["logprobs"]
    check_entries(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], ids, reference,
                  tokenizer.decode, 2)
    generated = range(len(ids) - len(answer["token_ids"]), len(ids))
    assert [entry["token_id"] for entry in answer["logprobs"]] == answer["token_ids"]
    assert [entry["logprob"] for entry in answer["logprobs"]] == pytest.approx(
        [float(reference[t - 1, ids[t]]) for t in generated], abs=TOLERANCE)
    assert all(reference[t - 1].argmax() == ids[t] for t in generated)  # greedy: the chosen token is the best


def generated_ids(client, model: str | None, prompt: str, max_new_tokens: int, chat: bool) -> list[int]:
    query = f"?adapter={model}" if model else ""
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "chat": chat}}
    return client.post(f"/predict{query}", json=body).json()["outputs"][0]["token_ids"]


def test_without_echo_only_the_answer_is_scored(client, tiny_base, tokenizer):
    body = {"model": tiny_base.name, "prompt": "Hello there", "logprobs": 0, "max_tokens": 4, "temperature": 0}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    prompt_ids = tokenizer("Hello there")["input_ids"]
    answer_ids = generated_ids(client, None, "Hello there", 4, chat=False)
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [tokenizer.decode([t]) for t in answer_ids] and logprobs["text_offset"][0] == 0
    reference = peft_reference_logprobs(tiny_base, None, prompt_ids + answer_ids)
    expected = [float(reference[len(prompt_ids) + i - 1, t]) for i, t in enumerate(answer_ids)]
    assert logprobs["token_logprobs"] == pytest.approx(expected, abs=TOLERANCE)
    assert [list(top) for top in logprobs["top_logprobs"]] == [[token] for token in logprobs["tokens"]]


def test_chat_logprobs_with_top_logprobs(client, tiny_base, adapter_store, tokenizer):
    messages = [{"role": "user", "content": "Name a colour."}]
    body = {"model": "gen-mlp", "messages": messages, "max_tokens": 5, "temperature": 0, "logprobs": True,
            "top_logprobs": 4}
    content = client.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
    prompt_ids = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False)["input_ids"]
    answer_ids = generated_ids(client, "gen-mlp", "Name a colour.", 5, chat=True)
    assert [entry["token"] for entry in content] == [tokenizer.decode([t]) for t in answer_ids]
    reference = peft_reference_logprobs(tiny_base, adapter_store / "gen-mlp", prompt_ids + answer_ids)
    for i, entry in enumerate(content):
        expected = reference[len(prompt_ids) + i - 1]
        assert entry["bytes"] == list(entry["token"].encode())
        assert entry["logprob"] == pytest.approx(float(expected[answer_ids[i]]), abs=TOLERANCE)
        best = expected.topk(4)
        assert [t["token"] for t in entry["top_logprobs"]] == [tokenizer.decode([int(i)]) for i in best.indices]
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(best.values.tolist(), abs=TOLERANCE)


def test_echo_rows_share_a_prefill_with_plain_rows(engine, adapter_store, tokenizer):
    """A row that keeps its prompt's logprobs changes nothing for its batch mates, and gets what it gets alone."""
    from server.jobs import GenerateJob
    from server.types import AdapterLocation, GenerationParams
    from tests.helpers import generate_together

    slot = engine.acquire(AdapterLocation("gen-a", 1, adapter_store / "gen-a"))
    try:
        prompts = [tokenizer("one two three four five")["input_ids"], tokenizer("six")["input_ids"]]
        scored = GenerationParams(max_new_tokens=3, chat=False, logprobs=1, prompt_logprobs=True)
        plain = GenerationParams(max_new_tokens=3, chat=False)

        def jobs():
            return [GenerateJob([prompts[0]], slot.index, scored), GenerateJob([prompts[1]], 0, plain),
                    GenerateJob([prompts[1]], slot.index, scored)]

        together = generate_together(engine, jobs())
        alone = [generate_together(engine, [job])[0] for job in jobs()]
    finally:
        engine.release(slot)
    for [mixed], [single] in zip(together, alone):
        assert mixed.token_ids == single.token_ids
        if mixed.prompt_logprobs is None:
            assert single.prompt_logprobs is None and mixed.logprobs is None
            continue
        pairs = zip(mixed.prompt_logprobs + mixed.logprobs, single.prompt_logprobs + single.logprobs)
        for a, b in pairs:
            assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top]
            assert (a.logprob is None) == (b.logprob is None)
            if a.logprob is not None:
                assert a.logprob == pytest.approx(b.logprob, abs=TOLERANCE)


@pytest.mark.parametrize(
    "path, payload, param, message",
    [
        ("/v1/completions", {"model": "gen-a", "prompt": "hi", "max_tokens": 0}, "max_tokens",
         "max_tokens: 0 generates nothing: it is only for scoring the prompt with echo"),
        ("/v1/completions", {"model": "gen-a", "prompt": "hi", "logprobs": 21}, "logprobs",
         "logprobs: Input should be less than or equal to 20"),
        ("/v1/completions", {"model": "gen-a", "prompt": [1, 2, 49152]}, "inputs[0]",
         "inputs[0]: token id 49152 is outside the vocabulary (0 to 49151)"),
        ("/v1/completions", {"model": "gen-a", "prompt": [[5], []]}, "prompt", "prompt: prompt 1 is empty"),
        ("/v1/completions", {"model": "gen-a", "prompt": "hi", "echo": True, "stream": True}, "echo",
         "echo: echo is not supported with stream"),
        ("/v1/completions", {"model": "sentiment", "prompt": "hi", "logprobs": 1}, "logprobs",
         "logprobs: 'sentiment' is a classification adapter: it has no token logprobs"),
        ("/v1/completions", {"model": "sentiment", "prompt": [5, 6]}, "prompt",
         "prompt: 'sentiment' is a classification adapter: it takes text prompts, not token ids"),
        ("/v1/chat/completions", {"model": "gen-a", "messages": [{"role": "user", "content": "x"}],
                                  "top_logprobs": 2}, None, "Value error, top_logprobs needs logprobs: true"),
        ("/v1/chat/completions", {"model": "gen-a", "messages": [{"role": "user", "content": "x"}],
                                  "max_tokens": 0}, "max_tokens",
         "max_tokens: 0 generates nothing: it is only for scoring the prompt with echo"),
        ("/v1/chat/completions", {"model": "topic", "messages": [{"role": "user", "content": "x"}],
                                  "logprobs": True}, "logprobs",
         "logprobs: 'topic' is a classification adapter: it has no token logprobs"),
    ],
)
def test_bad_logprob_requests_are_400_naming_the_param(client, path, payload, param, message):
    response = client.post(path, json=payload)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["message"]) == (param, message)


PROMPT_WITH_VARIED_ANSWER = "Tell me a story"  # the tiny random base often repeats one token: not on this one


def test_the_eos_that_ends_an_answer_is_scored(engine):
    """lm-evaluation-harness drops the last scored token (the one it asked for): it must be there even when it is
    EOS, as OpenAI and vLLM give it. Here EOS is made the token greedy decoding picks at the fourth step."""
    from server.types import GenerationParams, TokenLogprob

    params = GenerationParams(max_new_tokens=6, chat=False, logprobs=2)
    [free] = engine.generate([PROMPT_WITH_VARIED_ANSWER], None, params)
    end = next(i for i, t in enumerate(free.token_ids) if i > 0 and t not in free.token_ids[:i])
    assert end == 3
    eos = engine.runner.eos
    engine.runner.call(lambda: setattr(engine.runner, "eos", free.token_ids[end]))
    try:
        [ended] = engine.generate([PROMPT_WITH_VARIED_ANSWER], None, params)
        streamed = list(engine.generate_stream(PROMPT_WITH_VARIED_ANSWER, None, params))
    finally:
        engine.runner.call(lambda: setattr(engine.runner, "eos", eos))
    assert (ended.token_ids, ended.finish_reason) == (free.token_ids[:end], "stop")
    assert ended.logprobs == free.logprobs[: end + 1]
    assert [item for item in streamed if isinstance(item, TokenLogprob)] == ended.logprobs
