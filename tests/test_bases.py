"""Bring your own base: tiny random Llama, Mistral, Qwen2, GPT-2 (Conv1D), BERT, DistilBERT and RoBERTa bases, each with
adapters made by plain PEFT, serve exactly what PEFT computes (float32): classification within 1e-5, greedy ids
equal; mixed batches equal lone runs; merge/unmerge is exact; uploads of the unchanged PEFT folders serve and their
downloads load back into PEFT. What we do not serve is refused by name."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

from server.base_model import BaseModelError, load_base
from server.engine import Engine
from server.errors import AdapterInvalid
from server.jobs import ClassifyJob, GenerateJob
from server.settings import Settings
from server.types import AdapterLocation, GenerationParams
from tests.helpers import (
    ADMIN_TOKEN,
    app_client,
    classify_together,
    folder_files,
    generate_together,
    make_family_adapter,
    make_family_base,
    make_wordpiece_tokenizer,
    peft_reference_probs,
    peft_reference_greedy,
    upload,
)

DECODERS = ("llama", "mistral", "qwen2", "gpt2")
ENCODERS = ("bert", "distilbert", "roberta")
TEXTS = ["a stirring , funny and finally transporting film", "one long string of cliches .", "ok",
         "free prize ! call now to win cash"]
PROMPTS = ["What is the capital of France?", "Write a haiku"]
CLASSIFIERS = {"cls-3": ["negative", "neutral", "positive"], "cls-2": ["ham", "spam"]}
GENERATORS = ("gen-a", "gen-b")


class Family:
    """One tiny base with its PEFT adapters and an engine serving them."""

    def __init__(self, name: str, root: Path, tokenizer):
        self.name = name
        self.tokenizer = tokenizer
        self.base = make_family_base(root / "base", name, tokenizer)
        self.store = root / "adapters"
        for seed, (adapter, labels) in enumerate(CLASSIFIERS.items(), start=1):
            make_family_adapter(self.base, self.store / adapter, name, "SEQ_CLS", labels, r=4 * seed, seed=seed)
        if name in DECODERS:
            for seed, adapter in enumerate(GENERATORS, start=10):
                make_family_adapter(self.base, self.store / adapter, name, "CAUSAL_LM", r=4 * (seed - 9), seed=seed)
        self.settings = Settings(base_model=self.base, adapters_dir=self.store, dtype="float32",
                                 cache_dir=root / "cache", max_loaded_adapters=4, auto_merge=False)
        self.engine = Engine.from_settings(self.settings)

    def location(self, adapter: str) -> AdapterLocation:
        return AdapterLocation(adapter, 1, self.store / adapter)

    def probs(self, adapter: str, texts: list[str] = TEXTS) -> torch.Tensor:
        _, results = self.engine.predict(self.location(adapter), texts, GenerationParams())
        return torch.tensor([[r.scores[label] for label in CLASSIFIERS[adapter]] for r in results])

    def greedy(self, adapter: str | None, max_new_tokens: int = 10) -> list[list[int]]:
        params = GenerationParams(max_new_tokens=max_new_tokens)
        _, results = self.engine.predict(adapter and self.location(adapter), PROMPTS, params)
        return [r.token_ids for r in results]

    def reference_greedy(self, adapter: Path | None, max_new_tokens: int = 10) -> list[list[int]]:
        params = GenerationParams(max_new_tokens=max_new_tokens)
        return [peft_reference_greedy(self.base, adapter, ids, max_new_tokens)
                for ids in self.engine.encode_for_generation(PROMPTS, params)]


@pytest.fixture(scope="session")
def encoder_tokenizer(tmp_path_factory):
    return make_wordpiece_tokenizer(tmp_path_factory.mktemp("wordpiece"))


@pytest.fixture(scope="module", params=DECODERS + ENCODERS)
def family(request, tmp_path_factory, tokenizer, encoder_tokenizer):
    name = request.param
    built = Family(name, tmp_path_factory.mktemp(name), tokenizer if name in DECODERS else encoder_tokenizer)
    yield built
    built.engine.close()


def test_the_base_loads_as_its_family(family):
    info = family.engine.info
    assert info.model_type == family.name
    assert info.family == ("decoder" if family.name in DECODERS else "encoder")
    kinds = {type(layer.base).__name__ for layer in family.engine.layers.values()}
    assert kinds == ({"Conv1D"} if family.name == "gpt2" else {"Linear"})


def test_classification_equals_peft(family):
    for adapter, labels in CLASSIFIERS.items():
        ours = family.probs(adapter)
        reference = peft_reference_probs(family.base, family.store / adapter, family.tokenizer, TEXTS, len(labels))
        assert torch.allclose(ours, reference, atol=1e-5), (adapter, (ours - reference).abs().max())
        assert (ours - ours[0]).abs().max() > 1e-7  # the pooling sees each input: the rows differ


def test_generation_equals_peft_greedy(family):
    if family.name in ENCODERS:
        pytest.skip("encoders do not generate (test_generation_on_an_encoder_is_422)")
    base = family.reference_greedy(None)
    assert family.greedy(None) == base
    for adapter in GENERATORS:
        reference = family.reference_greedy(family.store / adapter)
        assert family.greedy(adapter) == reference, adapter
        assert reference != base, f"{adapter} does not change the answer"


def test_a_mixed_batch_equals_lone_runs(family):
    engine = family.engine
    slots = [engine.acquire(family.location(adapter)) for adapter in CLASSIFIERS]
    try:
        rows = engine.encode_for_classification(TEXTS)
        jobs = [ClassifyJob([row], slots[i % 2]) for i, row in enumerate(rows)]
        mixed = classify_together(engine, jobs)
        for job, [result] in zip(jobs, mixed):
            [[alone]] = classify_together(engine, [ClassifyJob(job.rows, job.slot)])
            assert result.label == alone.label
            assert max(abs(result.scores[k] - p) for k, p in alone.scores.items()) < 1e-5
    finally:
        for slot in slots:
            engine.release(slot)
    if family.name in ENCODERS:
        return
    params = GenerationParams(max_new_tokens=8)
    gens = [engine.acquire(family.location(adapter)) for adapter in GENERATORS]
    try:
        prompts = engine.encode_for_generation(PROMPTS, params)
        jobs = [GenerateJob([prompt], slot.index, params) for prompt in prompts for slot in gens]
        together = generate_together(engine, jobs)
        for job, [result] in zip(jobs, together):
            [[alone]] = generate_together(engine, [GenerateJob(job.prompts, job.slot_index, params)])
            assert result.token_ids == alone.token_ids
    finally:
        for slot in gens:
            engine.release(slot)


def test_merge_and_unmerge_are_exact(family):
    engine = family.engine
    pristine = {path: layer.weight.detach().clone() for path, layer in engine.layers.items()}
    tasks = [("cls-3", family.probs)] + ([("gen-a", family.greedy)] if family.name in DECODERS else [])
    for adapter, answer in tasks:
        unmerged = answer(adapter)
        slot = engine.acquire(family.location(adapter))
        try:
            engine.merge(slot)
            assert engine.merged_adapter == adapter
            assert any(not torch.equal(layer.weight, pristine[path]) for path, layer in engine.layers.items())
            merged = answer(adapter)
        finally:
            engine.unmerge()
            engine.release(slot)
        if isinstance(unmerged, torch.Tensor):
            assert torch.allclose(merged, unmerged, atol=1e-5)
        else:
            assert merged == unmerged
        assert all(torch.equal(layer.weight, pristine[path]) for path, layer in engine.layers.items())
        again = answer(adapter)
        assert torch.equal(again, unmerged) if isinstance(unmerged, torch.Tensor) else again == unmerged


def test_plain_peft_folders_upload_unchanged_serve_and_download_back(family, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    names = [*CLASSIFIERS, *(GENERATORS if family.name in DECODERS else ())]
    with app_client(family.settings, family.engine, store, max_upload_bytes=8 * 1024**2,
                    max_uncompressed_bytes=8 * 1024**2) as client:
        client.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        for name in names:
            response = upload(client, f"up-{name}", folder_files(family.store / name))
            assert response.status_code == 201, response.text
            if name in CLASSIFIERS:
                body = client.post(f"/predict?adapter=up-{name}", json={"inputs": TEXTS}).json()
                served = torch.tensor([[o["scores"][label] for label in CLASSIFIERS[name]] for o in body["outputs"]])
                reference = peft_reference_probs(family.base, family.store / name, family.tokenizer, TEXTS,
                                              len(CLASSIFIERS[name]))
                assert torch.allclose(served, reference, atol=1e-5), name
            else:
                body = client.post(f"/predict?adapter=up-{name}",
                                   json={"inputs": PROMPTS, "parameters": {"max_new_tokens": 10}}).json()
                assert [o["token_ids"] for o in body["outputs"]] == family.reference_greedy(family.store / name)
            download = client.get(f"/adapters/up-{name}/download")
            assert download.status_code == 200
            zipfile.ZipFile(io.BytesIO(download.content)).extractall(tmp_path / name)
            folder = tmp_path / name / f"up-{name}"
            if name in CLASSIFIERS:
                back = peft_reference_probs(family.base, folder, family.tokenizer, TEXTS, len(CLASSIFIERS[name]))
                assert torch.allclose(back, reference, atol=1e-6)
            else:
                assert family.reference_greedy(folder) == family.reference_greedy(family.store / name)


# ---- refusals -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert(tmp_path_factory, encoder_tokenizer):
    built = Family("bert", tmp_path_factory.mktemp("bert-refusals"), encoder_tokenizer)
    yield built
    built.engine.close()


def test_generation_on_an_encoder_is_422(bert):
    """422 on /predict; OpenAI's routes answer every invalid request 400 with an invalid_request_error."""
    with app_client(bert.settings, bert.engine, bert.store) as client:
        for path, body in [
            ("/predict", {"inputs": "Hello"}),
            ("/v1/completions", {"model": bert.engine.info.name, "prompt": "Hello"}),
            ("/v1/completions", {"model": bert.engine.info.name, "prompt": "Hello", "stream": True}),
            ("/v1/chat/completions", {"model": bert.engine.info.name, "messages": [{"role": "user", "content": "Hi"}]}),
        ]:
            response = client.post(path, json=body)
            assert response.status_code == (400 if path.startswith("/v1") else 422), (path, response.text)
            assert "BertForSequenceClassification (an encoder)" in response.text
            assert "cannot generate text" in response.text
        # what an encoder does serve still works: classification and embeddings
        assert client.post("/predict?adapter=cls-2", json={"inputs": TEXTS}).status_code == 200
        response = client.post("/v1/embeddings", json={"model": bert.engine.info.name, "input": TEXTS})
        assert response.status_code == 200 and len(response.json()["data"][0]["embedding"]) == 64


def test_an_unsupported_architecture_is_refused_by_name(tmp_path, tokenizer):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path)
    with pytest.raises(BaseModelError) as refused:
        load_base(tmp_path, tmp_path / "cache", "float32")
    assert "'gpt_neox' (GPTNeoXForCausalLM) is not supported" in str(refused.value)
    assert "gpt2" in str(refused.value) and "bert" in str(refused.value)  # and says what is


def test_lora_on_an_unsupported_layer_type_is_refused_by_name(bert, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(bert.base, num_labels=2)
    config = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["word_embeddings", "query"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(tmp_path / "embedding-lora")
    with pytest.raises(AdapterInvalid) as refused:
        bert.engine.check_adapter(tmp_path / "embedding-lora")
    assert refused.value.problems == [
        "module 'bert.embeddings.word_embeddings' is a Embedding layer: LoRA is served on Linear and Conv1D layers only"
    ]


def test_an_adapter_for_another_architecture_lists_every_problem(bert, family, tmp_path):
    if family.name == "bert":
        pytest.skip("the same architecture")
    with app_client(bert.settings, bert.engine, tmp_path / "store") as client:
        client.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        response = upload(client, "foreign", folder_files(family.store / "cls-2"))
    assert response.status_code == 422
    text = response.text
    if family.name != "roberta":  # RoBERTa's modules have BERT's names but not its path
        assert "none of the adapter's modules exists in the base: an adapter for another architecture" in text
    from safetensors import safe_open

    with safe_open(family.store / "cls-2" / "adapter_model.safetensors", "pt") as weights:
        modules = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in weights.keys() if ".lora_" in k}
    for module in modules:  # every problem at once
        assert f"module {module!r} does not exist in the base model" in text


def test_modules_to_save_the_base_lacks_and_a_missing_pre_classifier_are_refused(bert, family, tmp_path):
    if family.name not in ("bert", "distilbert"):
        pytest.skip("one encoder with and one without a trained pre_classifier")
    folder = shutil.copytree(family.store / "cls-2", tmp_path / "edited")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["modules_to_save"] = [*config["modules_to_save"], "no_such_module"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if family.name == "distilbert":  # drop the pre_classifier PEFT saved: a bare DistilBertModel has none trained
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "adapter_model.safetensors")
        save_file({k: v for k, v in tensors.items() if "pre_classifier" not in k}, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterInvalid) as refused:
        family.engine.check_adapter(folder)
    problems = refused.value.problems
    assert f"modules_to_save names 'no_such_module', a module the base {family.engine.info.architecture} does not " \
           "have" in problems
    if family.name == "distilbert":
        assert any(p.startswith("the adapter has no 'pre_classifier' for the base DistilBertForSequenceClassification")
                   for p in problems), problems
        assert len(problems) == 2
    else:
        assert len(problems) == 1


def test_a_store_lists_only_the_adapters_of_the_loaded_base_and_says_why_it_skipped_the_others(
    bert, tiny_settings, engine, adapter_store, tmp_path
):
    store = tmp_path / "store"
    shutil.copytree(adapter_store / "sentiment", store / "sentiment")  # made on the tiny Llama
    bert_adapter = shutil.copytree(bert.store / "cls-2", store / "spam-bert")
    info = bert.engine.info
    metadata = json.loads((bert_adapter / "loraswap.json").read_text())
    metadata["base_model"] = {"name": info.name, "fingerprint": info.fingerprint}
    (bert_adapter / "loraswap.json").write_text(json.dumps(metadata))
    with app_client(tiny_settings, engine, store) as client:
        body = client.get("/adapters").json()
    assert [a["name"] for a in body["adapters"]] == ["sentiment"]
    assert body["skipped"] == {"spam-bert": f"invalid adapter: the adapter was trained on base 'base' "
                                            f"({info.fingerprint}), not on the loaded '{engine.info.name}' "
                                            f"({engine.info.fingerprint})"}
    with app_client(bert.settings, bert.engine, store) as client:
        body = client.get("/adapters").json()
    assert [a["name"] for a in body["adapters"]] == ["spam-bert"]
    assert list(body["skipped"]) == ["sentiment"]  # no metadata: every module it lacks is named
    assert "does not exist in the base model" in body["skipped"]["sentiment"]


def test_train_adapter_trains_a_classifier_on_the_base(family, tmp_path):
    """train-adapter --base: PEFT's default targets for the architecture, the whole head saved; its adapter
    serves like PEFT, and the metrics it records are what the served adapter scores."""
    if family.name not in ("gpt2", "bert", "distilbert"):
        pytest.skip("GPT-2 (Conv1D) and two encoders cover what differs from the Llama base of test_training.py")
    from scripts import train_adapter
    from tests.test_training import sentiment_rows, write_csv

    train = write_csv(tmp_path / "train.csv", sentiment_rows(32, 1))
    dev = write_csv(tmp_path / "dev.csv", sentiment_rows(8, 2))
    out = tmp_path / "senti"
    assert train_adapter.main(["--task", "classification", "--name", "senti", "--train", str(train), "--eval",
                               str(dev), "--base", str(family.base), "--output", str(out), "--epochs", "1", "--lr",
                               "3e-3", "--rank", "4", "--eval-points", "1", "--dtype", "float32"]) == 0
    meta = json.loads((out / "loraswap.json").read_text())
    assert meta["base_model"]["fingerprint"] == family.engine.info.fingerprint
    expected_targets = {"gpt2": ["c_attn"], "bert": ["query", "value"], "distilbert": ["q_lin", "v_lin"]}[family.name]
    assert meta["hyperparameters"]["target_modules"] == expected_targets
    texts = [t for t, _ in sentiment_rows(8, 2)]
    reference = peft_reference_probs(family.base, out, family.tokenizer, texts, 2)
    _, results = family.engine.predict(AdapterLocation("senti", 1, out), texts, GenerationParams())
    ours = torch.tensor([[r.scores[label] for label in meta["labels"]] for r in results])
    assert torch.allclose(ours, reference, atol=1e-5)
    gold = [label for _, label in sentiment_rows(8, 2)]
    assert meta["metrics"]["accuracy"] == sum(meta["labels"][int(i)] == g for i, g in
                                              zip(reference.argmax(-1), gold)) / len(gold)
