"""lm-evaluation-harness against a running server (its `local-completions` model: logprobs + echo for
log-likelihoods, stop strings for generation), equal to the harness's own `hf` model with `peft=` on the same
adapter. Both tasks are written here, on local files: nothing comes from a dataset hub."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.test_openai import server  # noqa: F401 - the fixture: `python -m server` on the tiny base

ADAPTER = "gen-a"
WORDS = ["red", "blue", "green", "cat", "dog", "river", "stone", "light", "music", "bread", "cloud", "table"]
MC_TASK = """
task: loraswap_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
"""
GEN_TASK = """
task: loraswap_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """Two task folders for the harness's TaskManager: 24 four-way questions and 6 open ones, made up here."""
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    rng = random.Random(0)
    mc = [{"question": f"Which word goes with {' '.join(rng.sample(WORDS, 3))}?",
           "choices": [" " + w for w in rng.sample(WORDS, 4)], "answer": rng.randrange(4)} for _ in range(24)]
    gen = [{"question": f"Say {rng.choice(WORDS)} again:", "answer": " " + rng.choice(WORDS)} for _ in range(6)]
    for name, docs, template in (("mc", mc, MC_TASK), ("gen", gen, GEN_TASK)):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        (root / f"{name}.yaml").write_text(template.format(data=data))
    return root


def evaluate(model: str, model_args: dict, tasks: Path, names: list[str]) -> dict:
    import lm_eval  # imported here: it takes seconds, and only this test needs it
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=names, log_samples=True,
                                   task_manager=TaskManager(include_path=str(tasks)))


def test_harness_against_the_server_equals_its_hf_model(server, tasks, tiny_base, adapter_store):  # noqa: F811
    api = evaluate("local-completions", {
        "model": ADAPTER, "base_url": f"{server[0]}/v1/completions", "tokenizer": str(tiny_base),
        "tokenizer_backend": "huggingface", "max_retries": 1, "batch_size": 8,  # 8 prompts a request
    }, tasks, ["loraswap_mc", "loraswap_gen"])
    hf = evaluate("hf", {"pretrained": str(tiny_base), "peft": str(adapter_store / ADAPTER), "dtype": "float32",
                         "device": "cpu"}, tasks, ["loraswap_mc", "loraswap_gen"])
    for metric in ("acc,none", "acc_norm,none"):
        assert api["results"]["loraswap_mc"][metric] == hf["results"]["loraswap_mc"][metric]
    assert 0 < api["results"]["loraswap_mc"]["acc,none"] < 1  # a random adapter: some right, some wrong

    def loglikelihoods(result: dict) -> list[float]:
        return [resp[0][0] for sample in result["samples"]["loraswap_mc"] for resp in sample["resps"]]

    assert loglikelihoods(api) == pytest.approx(loglikelihoods(hf), abs=1e-4)
    generated = {run: [s["filtered_resps"][0] for s in result["samples"]["loraswap_gen"]]
                 for run, result in (("api", api), ("hf", hf))}
    assert len(generated["api"]) == 6 and generated["api"] == generated["hf"]
