from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the default writable store is the per-user data folder: tests (and the servers they start) never write into the
# user's real one, nor into the checkout
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="loraswap-test-data-")

from server.base_model import embedded_gguf_path  # noqa: E402
from tests.helpers import make_adapter, make_tiny_base  # noqa: E402

LABELS = ["negative", "neutral", "positive"]


# a GPU check runs the same tests with LORASWAP_TEST_DEVICE=cuda (references stay on the CPU)
TEST_DEVICE = os.environ.get("LORASWAP_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded base's tokenizer (or a saved copy named by LORASWAP_TEST_TOKENIZER, for machines without it)."""
    from transformers import AutoTokenizer

    if folder := os.environ.get("LORASWAP_TEST_TOKENIZER"):
        return AutoTokenizer.from_pretrained(folder)
    gguf = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_base(tmp_path_factory.mktemp("tiny-base"), tokenizer)


@pytest.fixture(scope="session")
def adapter_store(tmp_path_factory, tiny_base) -> Path:
    """A store with generation and classification adapters of different ranks and targets."""
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(tiny_base, root / "gen-a", r=4, seed=1)
    make_adapter(tiny_base, root / "gen-b", r=16, seed=2, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    make_adapter(tiny_base, root / "gen-mlp", r=8, seed=3, targets=("gate_proj", "up_proj", "down_proj", "o_proj"))
    make_adapter(tiny_base, root / "sentiment", task="SEQ_CLS", r=4, seed=4, labels=LABELS)
    make_adapter(tiny_base, root / "topic", task="SEQ_CLS", r=16, seed=5, labels=["a", "b"],
                 targets=("q_proj", "v_proj", "up_proj"))
    return root


@pytest.fixture(scope="session")
def tiny_settings(tiny_base, adapter_store, tmp_path_factory):
    from server.settings import Settings

    return Settings(
        base_model=tiny_base,
        adapters_dir=adapter_store,
        dtype="float32",
        device=TEST_DEVICE,
        cache_dir=tmp_path_factory.mktemp("cache"),
        max_loaded_adapters=6,
    )


@pytest.fixture(scope="session")
def engine(tiny_settings):
    from server.engine import Engine

    engine = Engine.from_settings(tiny_settings)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def client(tiny_settings, engine):
    from fastapi.testclient import TestClient

    from server.api import create_app

    with TestClient(create_app(tiny_settings, engine=engine)) as client:
        yield client


@pytest.fixture
def store(tmp_path, adapter_store) -> Path:
    """A writable adapter store holding one shipped plain PEFT folder."""
    import shutil

    root = tmp_path / "store"
    root.mkdir()
    shutil.copytree(adapter_store / "sentiment", root / "sentiment")
    return root


@pytest.fixture
def admin(tiny_settings, engine, store):
    """A client of an app on `store` that sends the admin token."""
    from tests.helpers import ADMIN_TOKEN, app_client

    with app_client(tiny_settings, engine, store) as client:
        client.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        yield client


def pytest_terminal_summary(terminalreporter) -> None:
    """One line that cannot be missed when the browser tests did not run (they skip where Chromium is absent)."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "needs chromium" in str(r.longrepr)]
    if skipped:
        terminalreporter.write_sep("=", f"{len(skipped)} browser tests (console, Swagger UI) SKIPPED: chromium and "
                                   "chromedriver not found; apt-get install chromium chromium-driver", yellow=True)
