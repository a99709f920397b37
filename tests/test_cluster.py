"""Two engine replicas on Ray Serve (server/cluster.py) behind the same HTTP API, on a tiny base.

One local Ray (2 CPUs, no dashboard, a small object store) and one Serve application for the whole module; each
replica runs torch on one thread. Answers are compared with the single-process server's (the `client` fixture)
and with the session engine run directly.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections import Counter

import httpx
import pytest

ray = pytest.importorskip("ray", reason="the cluster tests need the ray extra: pip install -e '.[test]'")
from ray import serve  # noqa: E402

from server.cluster import ENGINE_DEPLOYMENT, REPLICA_HEADER, build  # noqa: E402
from server.types import AdapterLocation, GenerationParams  # noqa: E402
from tests.helpers import ADMIN_TOKEN, folder_files, make_adapter  # noqa: E402

pytestmark = pytest.mark.ray
APP = "loraswap-test"
ADAPTERS = ["gen-a", "gen-b", "sentiment", "topic"]
GREEDY = {"max_new_tokens": 6, "temperature": 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster_store(tmp_path_factory, adapter_store):
    root = tmp_path_factory.mktemp("cluster-store")
    for name in ADAPTERS:
        shutil.copytree(adapter_store / name, root / name)
    return root


@pytest.fixture(scope="module")
def cluster(tiny_settings, cluster_store):
    """The base URL of a 2-replica application; Ray and Serve are shut down after the module."""
    from pydantic import SecretStr

    settings = tiny_settings.model_copy(update={
        "adapters_dir": cluster_store, "replicas": 2, "num_threads": 1, "admin_token": SecretStr(ADMIN_TOKEN),
        "auto_merge": False,
    })
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024**2, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(settings, app_name=APP, health_check_period_s=1), name=APP, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline, "the cluster did not become ready"
            time.sleep(0.5)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=cluster, timeout=60) as client:
        yield client


def _predict(client, adapter: str, text: str = "The movie was great", **parameters):
    body = {"inputs": text, "parameters": parameters} if parameters else {"inputs": text}
    return client.post("/predict", params={"adapter": adapter}, json=body)


def _answer(response) -> dict:
    """What an answer says, without the timing-free noise: the output of its one input."""
    assert response.status_code == 200, response.text
    return response.json()["outputs"][0]


def _same(got: dict, want: dict) -> None:
    if "scores" in want:
        assert got["label"] == want["label"]
        assert got["scores"] == pytest.approx(want["scores"], abs=1e-5)
    else:
        assert got["token_ids"] == want["token_ids"]
        assert got["generated_text"] == want["generated_text"]


def _running_replicas() -> int:
    deployment = serve.status().applications[APP].deployments[ENGINE_DEPLOYMENT]
    return deployment.replica_states.get("RUNNING", 0)


def test_answers_equal_the_single_process_server_and_name_their_replica(http, client):
    for adapter in ADAPTERS:
        parameters = GREEDY if adapter.startswith("gen") else {}
        got = _predict(http, adapter, **parameters)
        assert got.headers[REPLICA_HEADER]
        _same(_answer(got), _answer(_predict(client, adapter, **parameters)))
    base = http.post("/predict", json={"inputs": "Hello", "parameters": GREEDY})
    _same(_answer(base), _answer(client.post("/predict", json={"inputs": "Hello", "parameters": GREEDY})))
