"""`auto` fine-tuning: the choices per data size and base family (pure logic), the refusals of data that cannot make
a useful adapter, and jobs with only a training file on tiny GPT-2 and BERT bases (targets from the base, a held-out
validation split, its figures in events, result files and loraswap.json)."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from server import finetune_auto as auto
from server.encoding import encode_prompt
from server.finetune_auto import BaseShape, DataStats, Requested
from tests.helpers import ADMIN_TOKEN, app_client, make_family_base, make_wordpiece_tokenizer, tree

LLAMA_BLOCK = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_paths(layers: int) -> tuple[str, ...]:
    return tuple(f"model.layers.{i}.{part}.{name}" for i in range(layers)
                 for part, names in (("self_attn", LLAMA_BLOCK[:4]), ("mlp", LLAMA_BLOCK[4:])) for name in names)


SMOLLM2 = BaseShape("decoder", 30, 8192, llama_paths(30))  # the embedded base's shape
MINILM = BaseShape("encoder", 6, 512, tuple(
    f"bert.encoder.layer.{i}.{name}" for i in range(6) for name in
    ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
     "intermediate.dense", "output.dense")) + ("bert.pooler.dense",))


def classification(counts: dict[str, int], length: int = 20) -> DataStats:
    labels = [label for label, n in counts.items() for _ in range(n)]
    return DataStats("classification", [length + i % 7 for i in range(len(labels))], labels=labels)


# ---- the choices, per data size and family ---------------------------------------------------------------------


def test_targets_are_every_linear_layer_of_the_blocks_in_block_order():
    assert auto.block_layer_names(SMOLLM2.linear_paths) == LLAMA_BLOCK
    assert auto.block_layer_names(MINILM.linear_paths) == ["query", "key", "value", "dense"]  # not the pooler's own
    gpt2 = ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
            "transformer.h.0.mlp.c_proj")
    assert auto.block_layer_names(gpt2) == ["c_attn", "c_proj", "c_fc"]


def test_200_skewed_rows_on_the_embedded_base():
    """sms_spam's natural balance (13 % spam): 30 rows held out by label, 640 rows seen of the other 170 (3 epochs
    would be 510), all seven projections of the top 15 layers at 8e-4, spam's loss weighted by how rare it is."""
    stats = classification({"ham": 174, "spam": 26})
    plan = auto.plan(stats, SMOLLM2)
    assert (plan.validation_rows, plan.train_rows, plan.epochs, plan.batch_size, plan.steps) == (30, 170, 3.76, 8, 83)
    assert (plan.learning_rate, plan.target_modules, plan.top_layers) == (8e-4, LLAMA_BLOCK, 15)
    assert plan.class_weights == {"ham": round(200 / (2 * 174), 4), "spam": round(200 / (2 * 26), 4)}
    assert plan.reasons[0] == "validation: 30 of 200 rows held out of the training file, stratified by label"
    assert "class weights: ham 0.5747, spam 3.8462 (labels skewed: ham 174, spam 26)" in plan.reasons


@pytest.mark.parametrize("rows, epochs, steps", [
    (20, 40.0, 80),  # 16 to train (2 of each label held out): at least 640 rows seen
    (200, 3.76, 83),  # 170 to train: 640 rows seen
    (600, 3.0, 192),  # 510 to train: 3 epochs
    (5000, 0.67, 402),  # 4,800 to train (200 held out, the most): at most 3,200 rows seen
])
def test_epochs_from_the_number_of_rows(rows, epochs, steps):
    plan = auto.plan(classification({"a": rows // 2, "b": rows - rows // 2}), SMOLLM2)
    assert (plan.epochs, plan.steps) == (epochs, steps)
    assert plan.class_weights is None  # balanced labels


def test_family_choices():
    encoder = auto.plan(classification({"a": 50, "b": 50}), MINILM)
    assert (encoder.learning_rate, encoder.top_layers) == (1e-3, None)  # a small encoder adapts every layer
    assert "layers: LoRA in all 6" in encoder.reasons
    tiny = auto.plan(classification({"a": 50, "b": 50}), BaseShape("decoder", 2, 256, llama_paths(2)))
    assert tiny.top_layers is None  # the top half of 2 layers is at least 2: all of them
    generation = DataStats("generation", [40, 60, 52, 48, 90, 44], prompt_lengths=[30, 50, 40, 40, 60, 30],
                           answer_lengths=[10, 10, 12, 8, 30, 14])
    gen = auto.plan(generation, SMOLLM2)
    assert (gen.learning_rate, gen.max_length, gen.truncation, gen.max_new_tokens) == (3e-4, 96, False, 38)
    assert gen.validation_rows == 0 and gen.class_weights is None  # 6 rows: too few to hold any out


def test_max_length_covers_95_percent_of_the_rows_and_cuts_the_rest():
    stats = DataStats("classification", [10] * 95 + [500] * 5, labels=["a", "b"] * 50)
    plan = auto.plan(stats, SMOLLM2)
    assert (plan.max_length, plan.truncation) == (16, True)  # at least 16
    assert "max length: 16 tokens (the 95% percentile of the rows is 10, the longest 500); 5 longer rows are cut" \
        in plan.reasons
    stats = DataStats("classification", list(range(30, 130)), labels=["a", "b"] * 50)
    assert auto.plan(stats, SMOLLM2).max_length == 128  # 124 rounded up to a multiple of 8
    over_context = DataStats("classification", [100] * 98 + [9000, 9000], labels=["a", "b"] * 50)
    assert auto.plan(over_context, SMOLLM2).max_length == 104


def test_explicit_choices_win_and_are_not_stated_as_auto():
    requested = Requested(epochs=1, batch_size=4, learning_rate=1e-4, target_modules=("q_proj",), top_layers=0,
                          max_length=64, class_weights=False)
    plan = auto.plan(classification({"ham": 174, "spam": 26}), SMOLLM2, requested, has_validation_file=True)
    assert (plan.epochs, plan.batch_size, plan.learning_rate, plan.target_modules, plan.top_layers,
            plan.max_length, plan.truncation, plan.class_weights, plan.validation_rows) == (
        1.0, 4, 1e-4, ["q_proj"], None, 64, False, None, 0)
    assert plan.reasons == []


def test_the_validation_split_is_stratified_deterministic_and_leaves_a_handful_to_train():
    labels = ["ham"] * 40 + ["spam"] * 6
    train, held = auto.split_validation(labels, len(labels), seed=0)
    assert Counter(labels[i] for i in held) == {"ham": 6, "spam": 1}  # round(15 %), at least 1
    assert sorted(train + held) == list(range(46))
    assert auto.split_validation(labels, len(labels), seed=0) == (train, held)
    assert auto.split_validation(labels, len(labels), seed=1) != (train, held)
    five = ["a"] * 20 + ["b"] * 5
    assert Counter(five[i] for i in auto.split_validation(five, 25, 0)[1]) == {"a": 3}  # b keeps its 5 to train
    assert auto.split_validation(None, 9, 0)[1] == []


@pytest.mark.parametrize("stats, message", [
    (classification({"ham": 30}), "a classification file needs at least 2 labels, found ['ham']"),
    (classification({"ham": 30, "spam": 4}),
     "label 'spam' has 4 rows; every label needs at least 5 to learn it and to check it on held-out rows"),
    (classification({"ham": 6, "spam": 6}, length=9000),
     "all 12 texts are longer than the base's context of 8192 tokens (the shortest has 9000)"),
    (DataStats("generation", [20] * 4, prompt_lengths=[10] * 4, answer_lengths=[10] * 4),
     "4 rows; a generation adapter needs at least 5"),
    (DataStats("generation", [20, 20, 9000, 20, 9010], prompt_lengths=[10, 10, 8995, 10, 9000],
               answer_lengths=[10] * 5),
     "row 3's prompt alone has 8995 tokens, over the base's context of 8192; shorten it (2 rows like it)"),
])
def test_unusable_data_is_refused(stats, message):
    with pytest.raises(auto.DataUnusable) as refused:
        auto.check_usable(stats, 8192)
    assert str(refused.value) == message


# ---- refusals of a job, before anything is queued ---------------------------------------------------------------


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def upload(client, rows: list[dict]) -> str:
    response = client.post("/v1/files", data={"purpose": "fine-tune"},
                           files={"file": ("data.jsonl", jsonl(rows), "application/jsonl")})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def test_a_job_on_data_that_cannot_make_a_useful_adapter_is_a_400(tiny_settings, engine, store, tiny_base):
    with app_client(tiny_settings, engine, store) as client:
        client.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        long_text = " ".join(["word"] * 300)  # over the tiny base's context of 256
        text_tokens = len(engine.tokenizer(long_text)["input_ids"])
        prompt_tokens = len(encode_prompt(engine.tokenizer, long_text))
        cases = {
            "training_file: label 'spam' has 3 rows; every label needs at least 5 to learn it and to check it on "
            "held-out rows": [{"text": f"hello {i}", "label": "ham"} for i in range(10)]
            + [{"text": f"win {i}", "label": "spam"} for i in range(3)],
            "training_file: all 10 texts are longer than the base's context of 256 tokens (the shortest has "
            f"{text_tokens})":
            [{"text": long_text, "label": "ham" if i % 2 else "spam"} for i in range(10)],
            "training_file: all 6 prompts are longer than the base's context of 256 tokens (the shortest has "
            f"{prompt_tokens}): no answer token fits":
            [{"prompt": long_text, "completion": "ok"}] * 6,
        }
        before = tree(store)
        for message, rows in cases.items():
            file_id = upload(client, rows)
            response = client.post("/v1/fine_tuning/jobs", json={"model": tiny_base.name, "training_file": file_id})
            assert (response.status_code, response.json()["error"]["message"]) == (400, message)
            assert response.json()["error"]["param"] == "training_file"
        assert client.get("/v1/fine_tuning/jobs").json()["data"] == []
        assert {k: v for k, v in tree(store).items() if not k.startswith(".files")} == before


# ---- jobs with only a training file on tiny GPT-2 and BERT bases ------------------------------------------------

SPAM = ["free prize call now", "win cash now", "call now to win a free prize", "free cash prize", "win win call now"]
HAM = ["meeting at noon tomorrow", "ok the movie was great", "a funny film", "tomorrow at noon ok", "the film was ok"]


def spam_rows(ham: int, spam: int) -> list[dict]:
    return [{"text": HAM[i % 5] + ("" if i < 5 else f" {HAM[(i + 2) % 5]}"), "label": "ham"} for i in range(ham)] + [
        {"text": SPAM[i % 5] + ("" if i < 5 else f" {SPAM[(i + 3) % 5]}"), "label": "spam"} for i in range(spam)]


def wait_done(client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while (job := client.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] not in (
            "succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job still {job['status']} after {timeout} s"
        time.sleep(0.3)
    return job


@pytest.mark.parametrize("family, targets, ham, spam", [
    ("gpt2", ["c_attn", "c_proj", "c_fc"], 18, 7),  # skewed: the loss is weighted
    ("bert", ["query", "key", "value", "dense"], 12, 12),
])
def test_a_job_with_only_a_training_file_on_the_family(family, targets, ham, spam, tmp_path, tokenizer):
    from server.engine import Engine
    from server.settings import Settings

    word_tokenizer = make_wordpiece_tokenizer(tmp_path / "wordpiece") if family == "bert" else tokenizer
    base = make_family_base(tmp_path / f"tiny-{family}", family, word_tokenizer)
    store = tmp_path / "adapters"
    store.mkdir()
    settings = Settings(base_model=base, adapters_dir=store, dtype="float32", cache_dir=tmp_path / "cache")
    engine = Engine.from_settings(settings)
    rows = spam_rows(ham, spam)
    try:
        with app_client(settings, engine, store) as client:
            client.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
            file_id = upload(client, rows)
            created = client.post("/v1/fine_tuning/jobs", json={"model": base.name, "training_file": file_id})
            assert created.status_code == 200, created.text
            job = wait_done(client, created.json()["id"])
            assert job["status"] == "succeeded", job["error"]
            events = [e for e in reversed(client.get(f"/v1/fine_tuning/jobs/{job['id']}/events",
                                                     params={"limit": 10_000}).json()["data"])]
            name = job["fine_tuned_model"]
            record = client.get(f"/adapters/{name}").json()
            held = auto.split_validation([r["label"] for r in rows], len(rows), seed=0)[1]
            texts = [rows[i]["text"] for i in held]
            predicted = [o["label"] for o in client.post(f"/predict?adapter={name}", json={"inputs": texts}).json()[
                "outputs"]]
            results = [client.get(f"/v1/files/{f}/content") for f in job["result_files"]]
    finally:
        engine.close()

    messages = [e["message"] for e in events]
    assert f"Auto LoRA targets: {' '.join(targets)} (every linear layer of the base's blocks)" in messages
    assert f"Auto validation: {len(held)} of {len(rows)} rows held out of the training file, stratified by label" \
        in messages
    weighted = [m for m in messages if m.startswith("Auto class weights: ")]
    assert weighted == [f"Auto class weights: ham {round(len(rows) / (2 * ham), 4):g}, spam "
                        f"{round(len(rows) / (2 * spam), 4):g} (labels skewed: ham {ham}, spam {spam})"
                        if ham != spam else f"Auto class weights: none (labels balanced: ham {ham}, spam {spam})"]
    assert sorted(record["target_modules"]) == sorted(targets) and record["labels"] == ["ham", "spam"]
    hyper = job["hyperparameters"]
    plan = auto.plan(DataStats("classification", [1] * len(rows), labels=[r["label"] for r in rows]),
                     BaseShape(engine.info.family, engine.info.num_layers, 10_000, ()))
    assert (hyper["n_epochs"], hyper["batch_size"]) == (plan.epochs, 8)

    # validation figures at each eval point (events, the step CSV), the checkpoint kept, the final metrics
    points = [e["data"] for e in events if "valid_accuracy" in e["data"]]
    assert [p["step"] for p in points][0] == 0 and len(points) == 5
    assert all(0 <= p["valid_accuracy"] <= 1 and p["valid_loss"] > 0 for p in points)
    kept = next(e for e in events if e["message"].startswith("Kept the checkpoint of step "))
    best = max(points[1:], key=lambda p: (p["valid_macro_f1"], p["valid_accuracy"], -p["valid_loss"]))
    assert kept["data"]["step"] == best["step"]
    final = next(e["data"]["metrics"] for e in events if e["message"].startswith("Validation metrics: "))
    metadata = json.loads((store / name / "loraswap.json").read_text())
    assert metadata["metrics"] == final
    table = dict(line.split(",") for line in results[2].text.splitlines())  # validation_metrics.csv
    assert (table["metric"], float(table["accuracy"]), float(table["macro_f1"]), int(table["rows"])) == (
        "value", pytest.approx(final["accuracy"], abs=1e-6), pytest.approx(final["macro_f1"], abs=1e-6), len(held))
    matrix = final["confusion_matrix"]["rows_gold_columns_predicted"]
    assert [[int(table[f"confusion.{g}.{p}"]) for p in ("ham", "spam")] for g in ("ham", "spam")] == matrix
    assert float(table["per_class.spam.f1"]) == pytest.approx(final["per_class"]["spam"]["f1"], abs=1e-6)
    gold = [rows[i]["label"] for i in held]
    assert final["rows"] == len(held) and final["accuracy"] == sum(p == g for p, g in zip(predicted, gold)) / len(held)
    assert final["accuracy"] == best["valid_accuracy"]  # served as it was measured in training
    assert final["confusion_matrix"]["labels"] == ["ham", "spam"]
    assert metadata["kept_step"] == kept["data"]["step"] and metadata["data"]["eval"]["held_out_of_train"] == len(held)
    assert metadata["hyperparameters"]["class_weights"] == (None if ham == spam else {
        "ham": round(len(rows) / (2 * ham), 4), "spam": round(len(rows) / (2 * spam), 4)})
    csv_lines = results[0].text.splitlines()
    assert csv_lines[0] == "step,train_loss,valid_loss,valid_accuracy,valid_macro_f1"
    assert results[1].content.startswith(b"\x89PNG")


# ---- one implementation: a job and train-adapter see the same data and base alike ------------------------------


@pytest.mark.parametrize("rows, options", [
    ([{"text": f"the film was {w}", "label": "pos" if i % 2 else "neg"} for i, w in enumerate(SPAM + HAM)], []),
    ([{"prompt": f"What is {i} + {i}?", "completion": str(2 * i)} for i in range(6)],
     ["--prompt-template", "{prompt}", "--answer-template", "{completion}"]),
    ([{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {i}"},
                    {"role": "assistant", "content": f"{i}!"}]} for i in range(6)],
     ["--messages-column", "messages"]),
])
def test_a_job_and_train_adapter_measure_the_same_rows_alike(rows, options, tokenizer, tmp_path):
    from scripts import train_adapter
    from server.finetune import data_stats, inspect_jsonl

    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl(rows))
    row_format = inspect_jsonl(path.read_bytes(), 100).row_format
    task = "classification" if row_format == "classification" else "generation"
    args = train_adapter.build_parser().parse_args(["--task", task, "--name", "x", "--train", str(path), *options])
    assert data_stats(path.read_bytes(), row_format, tokenizer) == train_adapter.measure(args, tokenizer)


def test_a_job_and_train_adapter_see_the_same_layers(engine, tiny_base, tmp_path):
    from scripts import train_adapter
    from server.base_model import load_base
    from server.finetune import base_shape

    model, _, info = load_base(tiny_base, tmp_path, "float32")
    assert train_adapter.base_shape(model, info) == base_shape(engine)
