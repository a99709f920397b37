"""train-adapter / eval-adapter on a tiny random base: end to end, reproducibility, bad data, metrics, upload."""

from __future__ import annotations

import json
import random
import shutil
from email.parser import BytesParser
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from scripts import eval_adapter, train_adapter
from scripts.adapter_data import data_sha256, read_rows
from scripts.metrics import classification_metrics, extract_decision, generation_metrics, rouge_l, token_f1
from server.adapter_format import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE
from server.base_model import load_base
from server.engine import Engine
from server.types import AdapterLocation, GenerationParams
from tests.helpers import peft_reference_greedy, peft_reference_probs

GOOD = ["great", "wonderful", "moving", "funny", "brilliant"]
BAD = ["dull", "boring", "awful", "tedious", "clumsy"]
PROMPT = "Question: {question}\nContext: {context}"
ANSWER = "{answer}. {long_answer}"


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "text,label") -> Path:
    path.write_text(header + "\n" + "".join(f'"{t}",{label}\n' for t, label in rows), encoding="utf-8")
    return path


def sentiment_rows(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 else "negative"
        word = rng.choice(GOOD if label == "positive" else BAD)
        rows.append((f"the film was {word} and {rng.choice(GOOD + BAD)} at times", label))
    return rows


def qa_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        answer = ["yes", "no", "maybe"][i % 3]
        context = "The trial " + " ".join(rng.choices(GOOD + BAD, k=12))
        long_answer = f"It {'helps' if answer == 'yes' else 'may not help'}."
        rows.append({"question": f"Does drug {i} help?", "context": context, "answer": answer,
                     "long_answer": long_answer})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {
        "cls_train": write_csv(root / "train.csv", sentiment_rows(48, 1)),
        "cls_dev": write_csv(root / "dev.csv", sentiment_rows(12, 2)),
        "gen_train": write_jsonl(root / "train.jsonl", qa_rows(24, 3)),
        "gen_dev": write_jsonl(root / "dev.jsonl", qa_rows(6, 4)),
        "root": root,
    }


def cls_args(base: Path, data: dict, out: Path, *extra: str) -> list[str]:
    return ["--task", "classification", "--name", "senti", "--train", str(data["cls_train"]),
            "--eval", str(data["cls_dev"]), "--base-model", str(base), "--output", str(out), "--epochs", "2",
            "--lr", "3e-3", "--rank", "4", "--eval-dtype", "float32", "--dtype", "float32", *extra]


def gen_args(base: Path, data: dict, out: Path, *extra: str) -> list[str]:
    return ["--task", "generation", "--name", "qa", "--train", str(data["gen_train"]), "--eval", str(data["gen_dev"]),
            "--base-model", str(base), "--output", str(out), "--prompt-template", PROMPT, "--answer-template", ANSWER,
            "--decision-column", "answer", "--truncate-column", "context=40", "--max-length", "96", "--epochs", "2",
            "--lr", "3e-3", "--rank", "4", "--max-new-tokens", "8", "--eval-dtype", "float32", "--dtype", "float32",
            *extra]


@pytest.fixture(scope="module")
def cls_adapter(tiny_base, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cls") / "senti"
    assert train_adapter.main(cls_args(tiny_base, data, out)) == 0
    return out


@pytest.fixture(scope="module")
def gen_adapter(tiny_base, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "qa"
    assert train_adapter.main(gen_args(tiny_base, data, out)) == 0
    return out


@pytest.fixture(scope="module")
def tiny_engine(tiny_base, tmp_path_factory):
    engine = Engine(*load_base(tiny_base, tmp_path_factory.mktemp("cache"), "float32"))
    yield engine
    engine.close()


def test_classification_adapter_is_standard_peft_and_served_alike(cls_adapter, tiny_base, tiny_engine, tokenizer, data):
    files = {p.name for p in cls_adapter.iterdir()}
    assert {CONFIG_FILE, WEIGHTS_FILE, METADATA_FILE, train_adapter.PLOT_FILE} <= files
    meta = json.loads((cls_adapter / METADATA_FILE).read_text())
    assert meta["task"] == "classification" and meta["labels"] == ["negative", "positive"]
    assert meta["base_model"]["fingerprint"] == tiny_engine.info.fingerprint
    assert meta["data"]["train"][0]["sha256"] == data_sha256(data["cls_train"])
    assert meta["hyperparameters"]["rank"] == 4 and meta["steps"] == 12 and meta["wall_seconds"] > 0
    assert len(meta["eval_loss_curve"]) == 5  # before training + 4 points
    assert len(meta["train_losses"]) == meta["steps"]

    texts = [t for t, _ in sentiment_rows(12, 2)]
    reference = peft_reference_probs(tiny_base, cls_adapter, tokenizer, texts, 2)
    _, results = tiny_engine.predict(AdapterLocation("senti", 1, cls_adapter), texts, GenerationParams())
    ours = torch.tensor([[r.scores[label] for label in meta["labels"]] for r in results])
    assert torch.allclose(ours, reference, atol=1e-5)
    gold = [label for _, label in sentiment_rows(12, 2)]
    predicted = [meta["labels"][int(i)] for i in reference.argmax(-1)]
    assert meta["metrics"] == classification_metrics(gold, predicted, meta["labels"])


def test_generation_adapter_is_standard_peft_and_served_alike(gen_adapter, tiny_base, tiny_engine, tokenizer):
    meta = json.loads((gen_adapter / METADATA_FILE).read_text())
    assert meta["task"] == "generation" and meta["decision_labels"] == ["maybe", "no", "yes"]
    assert meta["prompt_template"] == PROMPT and meta["truncate_columns"] == {"context": 40}
    assert {"decision_accuracy", "token_f1", "rouge_l"} <= set(meta["metrics"])
    prompt = PROMPT.format(question="Does drug 1 help?", context="The trial great dull")
    params = GenerationParams(max_new_tokens=8)
    _, [served] = tiny_engine.predict(AdapterLocation("qa", 1, gen_adapter), [prompt], params)
    ids = tiny_engine.encode_for_generation([prompt], params)[0]
    assert served.token_ids == peft_reference_greedy(tiny_base, gen_adapter, ids, 8)
    # the LoRA weights were trained: the adapter's logits differ from the base's
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    with torch.no_grad():
        before = base(torch.tensor([ids])).logits
        after = PeftModel.from_pretrained(base, gen_adapter)(torch.tensor([ids])).logits
    assert (before - after).abs().max() > 1e-3


def test_generation_loss_covers_only_the_answer_and_its_end(tokenizer):
    prompt_ids = [1, 5, 6, 7]
    example = train_adapter.Example([*prompt_ids, 20, 21, tokenizer.eos_token_id], prompt_len=len(prompt_ids))
    batch = train_adapter.collate([example, train_adapter.Example([1, 5, 30, 2], prompt_len=3)], tokenizer.pad_token_id)
    targets = batch["input_ids"][:, 1:][batch["answer"][:, :-1]]
    assert targets.tolist() == [20, 21, tokenizer.eos_token_id, 2]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 4 + [0] * 3]


def test_same_seed_same_metrics(cls_adapter, tiny_base, data, tmp_path):
    assert train_adapter.main(cls_args(tiny_base, data, tmp_path / "again")) == 0
    first = json.loads((cls_adapter / METADATA_FILE).read_text())
    second = json.loads((tmp_path / "again" / METADATA_FILE).read_text())
    assert first["metrics"] == second["metrics"]
    assert first["eval_loss_curve"] == second["eval_loss_curve"]
    assert (cls_adapter / WEIGHTS_FILE).read_bytes() == (tmp_path / "again" / WEIGHTS_FILE).read_bytes()


def test_default_output_is_outside_the_store_and_never_overwritten_silently(tiny_base, data, tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--task", "classification", "--name", "quick", "--train", str(data["cls_train"]), "--eval",
            str(data["cls_dev"]), "--base-model", str(tiny_base), "--limit", "10", "--batch-size", "4", "--rank", "4"]
    assert train_adapter.main(args) == 0
    output = tmp_path / "trained" / "quick"
    meta = json.loads((output / METADATA_FILE).read_text())
    assert (meta["data"]["train_rows"], meta["data"]["eval"]["rows"], meta["data"]["limit"]) == (10, 10, 10)
    assert meta["steps"] == 3  # ceil(10 rows / batch 4) in one epoch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trained"]  # nothing but the adapter, no adapters/ folder
    assert (output.stat().st_mode & 0o777, (output / WEIGHTS_FILE).stat().st_mode & 0o777) == (0o755, 0o644)
    weights = (output / WEIGHTS_FILE).read_bytes()

    monkeypatch.setattr(train_adapter, "build_model", lambda *a: pytest.fail("training started"))
    capsys.readouterr()
    assert train_adapter.main([*args, "--seed", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "train-adapter: error: trained/quick already exists; pass --overwrite to replace it, or choose another "
        "--output")
    assert (output / WEIGHTS_FILE).read_bytes() == weights
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)

    assert train_adapter.main([*args, "--seed", "1", "--overwrite"]) == 0
    assert (output / WEIGHTS_FILE).read_bytes() != weights
    assert sorted(p.name for p in (tmp_path / "trained").iterdir()) == ["quick"]  # no staging folder left


@pytest.mark.parametrize("layout", ["save_to_disk", "data folder"])
def test_a_hugging_face_dataset_trains_the_same_adapter_as_its_files(layout, cls_adapter, tiny_base, data, tmp_path):
    """--dataset reads through the datasets library (offline here: a DatasetDict saved with save_to_disk, whose
    labels are a ClassLabel, or a folder of CSV files named by split, as load_dataset reads it)."""
    import datasets

    splits = {"train": data["cls_train"], "validation": data["cls_dev"]}
    folder = tmp_path / "dataset"
    if layout == "save_to_disk":
        names = sorted({row["label"] for path in splits.values() for row in read_rows(path)})
        features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
        datasets.DatasetDict({
            split: datasets.Dataset.from_list([{"text": r["text"], "label": names.index(r["label"])}
                                               for r in read_rows(path)], features=features)
            for split, path in splits.items()}).save_to_disk(str(folder))
    else:
        folder.mkdir()
        for split, path in splits.items():
            shutil.copy(path, folder / f"{split}.csv")
    args = cls_args(tiny_base, data, tmp_path / "out")
    at = args.index("--train")
    del args[at:at + 4]  # --train FILE --eval FILE
    assert train_adapter.main([*args, "--dataset", str(folder), "--eval-split", "validation"]) == 0
    meta = json.loads((tmp_path / "out" / METADATA_FILE).read_text())
    assert meta["data"]["train"][0]["file"] == f"{folder}[train]" and meta["data"]["eval"]["rows"] == 12
    assert meta["metrics"] == json.loads((cls_adapter / METADATA_FILE).read_text())["metrics"]
    assert (tmp_path / "out" / WEIGHTS_FILE).read_bytes() == (cls_adapter / WEIGHTS_FILE).read_bytes()


def test_train_or_dataset_is_required_and_not_both(tiny_base, data, tmp_path, capsys):
    args = cls_args(tiny_base, data, tmp_path / "out")
    assert train_adapter.main([*args, "--dataset", "x"]) == 2
    at = args.index("--train")
    assert train_adapter.main(args[:at] + args[at + 2:]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "train-adapter: error: give the training data as --train FILE ... or as --dataset NAME (one of them)"] * 2


def test_limit_must_be_positive(tiny_base, data, tmp_path, capsys):
    assert train_adapter.main(cls_args(tiny_base, data, tmp_path / "out", "--limit", "0")) == 2
    assert capsys.readouterr().err.strip() == "train-adapter: error: --limit must be at least 1, not 0"


def bad_data(root: Path) -> dict[str, tuple[list[str], str]]:
    """case -> (files to pass as train, eval; the expected message part)."""
    rows = sentiment_rows(8, 5)
    (root / "empty.csv").write_text("text,label\n")
    (root / "latin1.csv").write_bytes("text,label\ncafé crème,positive\n".encode("latin-1"))
    write_csv(root / "nolabel.csv", rows, header="text,sentiment")
    write_csv(root / "neutral.csv", rows + [("so so", "neutral")])
    write_csv(root / "long.csv", rows + [(" ".join(["word"] * 300), "negative")])
    write_csv(root / "ok.csv", rows)
    return {
        "missing column": (["ok.csv", "nolabel.csv"], "no column 'label'"),
        "empty file": (["empty.csv", "ok.csv"], "no data rows"),
        "label only in eval": (["ok.csv", "neutral.csv"], "label 'neutral' appears only in the eval data"),
        "not utf-8": (["latin1.csv", "ok.csv"], "not UTF-8"),
        "too long": (["long.csv", "ok.csv"], "row 9 has 300 tokens, over --max-length 256"),
        "eval is train": (["ok.csv", "ok.csv"], "the eval file is also a training file"),
    }


@pytest.mark.parametrize(
    "case", ["missing column", "empty file", "label only in eval", "not utf-8", "too long", "eval is train"]
)
def test_bad_data_fails_before_training(case, tiny_base, tmp_path, capsys, monkeypatch):
    (train, dev), message = bad_data(tmp_path)[case]
    monkeypatch.setattr(train_adapter, "build_model", lambda *a: pytest.fail("training started"))
    args = ["--task", "classification", "--name", "x", "--train", str(tmp_path / train), "--eval",
            str(tmp_path / dev), "--base-model", str(tiny_base), "--output", str(tmp_path / "out")]
    assert train_adapter.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train-adapter: error: ") and message in err[-1], err[-1]
    assert not (tmp_path / "out").exists()


def test_generation_missing_template_column_fails(tiny_base, data, tmp_path, capsys):
    args = gen_args(tiny_base, data, tmp_path / "out")
    args[args.index(ANSWER)] = "{verdict}"
    assert train_adapter.main(args) == 2
    assert "no column 'verdict'" in capsys.readouterr().err


def test_classification_metrics_by_hand():
    gold = ["ham", "ham", "ham", "spam", "spam"]
    pred = ["ham", "spam", "ham", "spam", "ham"]
    m = classification_metrics(gold, pred, ["ham", "spam"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["per_class"]["spam"] == pytest.approx({"precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2})
    assert m["per_class"]["ham"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["ham"]["f1"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"]["rows_gold_columns_predicted"] == [[2, 1], [1, 1]]


def test_generation_metrics_by_hand():
    assert token_f1("The cat sat.", "the cat sat on the mat") == pytest.approx(2 * 1 * 0.5 / 1.5)
    # LCS of "a b c d" and "a c b d" is 3 tokens: P = R = 3/4
    assert rouge_l("a b c d", "a c b d") == pytest.approx(0.75)
    assert rouge_l("", "x") == 0.0 and token_f1("", "") == 1.0
    assert extract_decision("Maybe. The data suggest no effect.", ["maybe", "no", "yes"]) == "maybe"
    assert extract_decision("Unknown, nothing", ["maybe", "no", "yes"]) is None
    m = generation_metrics(["yes. it helps", "no idea", "it is unclear"], ["yes. it helps", "maybe. unclear", "no. x"],
                           ["yes", "maybe", "no"], ["maybe", "no", "yes"])
    assert m["decision_accuracy"] == pytest.approx(1 / 3)
    assert m["no_decision"] == 1
    assert m["token_f1"] == pytest.approx((1.0 + 0.0 + 0.0) / 3)


def test_push_uploads_the_adapter_files(cls_adapter):
    seen = {}

    def server(request: httpx.Request) -> httpx.Response:
        seen["url"], seen["auth"] = str(request.url), request.headers["authorization"]
        message = BytesParser().parsebytes(
            b"Content-Type: " + request.headers["content-type"].encode() + b"\r\n\r\n" + request.read())
        for part in message.get_payload():
            seen[part.get_param("name", header="content-disposition")] = part.get_payload(decode=True)
        return httpx.Response(201, json={"name": "senti", "version": 1})

    answer = train_adapter.push(cls_adapter, "http://srv:8000/", "senti", "T0K", replace=True,
                                client=httpx.Client(transport=httpx.MockTransport(server)))
    assert answer == {"name": "senti", "version": 1}
    assert seen["url"] == "http://srv:8000/adapters" and seen["auth"] == "Bearer T0K"
    assert seen["name"] == b"senti" and seen["replace"] == b"true"
    for name in (CONFIG_FILE, WEIGHTS_FILE, METADATA_FILE):
        assert seen[name] == (cls_adapter / name).read_bytes()


def test_push_failure_is_reported(cls_adapter):
    client = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(401, json={"detail": "bad token"})))
    with pytest.raises(RuntimeError, match="HTTP 401: bad token"):
        train_adapter.push(cls_adapter, "http://srv", "senti", "nope", replace=False, client=client)


def test_eval_adapter_through_predict_gives_the_recorded_metrics(cls_adapter, gen_adapter, tiny_base, tiny_engine,
                                                                 data, tmp_path):
    from fastapi.testclient import TestClient

    from server.api import create_app
    from server.settings import Settings

    store = tmp_path / "store"
    store.mkdir()
    for folder in (cls_adapter, gen_adapter):
        (store / folder.name).symlink_to(folder)
    settings = Settings(base_model=tiny_base, adapters_dir=store, dtype="float32", cache_dir=tmp_path)
    with TestClient(create_app(settings, engine=tiny_engine)) as client:
        for folder, dev in ((cls_adapter, data["cls_dev"]), (gen_adapter, data["gen_dev"])):
            meta = json.loads((folder / METADATA_FILE).read_text())
            spec = eval_adapter.EvalSpec.from_metadata(meta)
            rows = eval_adapter.read_rows(dev)
            assert eval_adapter.evaluate(client, folder.name, spec, rows, dev, max_new_tokens=8) == meta["metrics"]


def test_truncate_column_keeps_the_start_or_the_end():
    from scripts.adapter_data import DataError, parse_truncate, render

    rows = [{"c": "abcdef", "q": "x"}]
    assert render("{q}:{c}", rows, Path("f"), parse_truncate(["c=2"])) == ["x:ab"]
    assert render("{q}:{c}", rows, Path("f"), parse_truncate(["c=-2"])) == ["x:ef"]
    with pytest.raises(DataError, match="COLUMN=CHARS"):
        parse_truncate(["c=0"])


def test_eval_adapter_command_reads_metadata_and_prints_metrics(cls_adapter, data, monkeypatch, capsys):
    def server(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/predict" and request.url.params["adapter"] == "senti"
        inputs = json.loads(request.read())["inputs"]
        return httpx.Response(200, json={"outputs": [{"label": "positive", "score": 0.9,
                                                      "scores": {"negative": 0.1, "positive": 0.9}}] * len(inputs)})

    real_client = httpx.Client
    monkeypatch.setattr(eval_adapter.httpx, "Client",
                        lambda **kw: real_client(transport=httpx.MockTransport(server), **kw))
    args = ["--url", "http://srv", "--adapter", "senti", "--data", str(data["cls_dev"]), "--metadata",
            str(cls_adapter), "--json", "--batch-size", "5"]
    assert eval_adapter.main(args) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["accuracy"] == 0.5 and metrics["rows"] == 12
    assert metrics["per_class"]["positive"]["recall"] == 1.0


def test_eval_adapter_refuses_a_gold_label_the_adapter_lacks(cls_adapter, tmp_path, capsys):
    dev = tmp_path / "dev.csv"
    write_csv(dev, sentiment_rows(4, 3) + [("so so", "neutral")])
    args = ["--url", "http://127.0.0.1:9", "--adapter", "senti", "--data", str(dev), "--metadata", str(cls_adapter)]
    assert eval_adapter.main(args) == 2  # refused before any request: nothing listens on port 9
    assert "label 'neutral' appears only in the eval data" in capsys.readouterr().err
