"""Adapters saved by plain PEFT, uploaded unchanged, serve exactly like PEFT; downloads load back into PEFT; a
replace lets in-flight requests finish on the old version; a server killed mid-upload restarts unchanged."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from server.types import GenerationParams
from tests.conftest import LABELS
from tests.helpers import (
    ADMIN_TOKEN as TOKEN,
    archive_bytes,
    folder_files,
    free_port,
    peft_reference_greedy,
    peft_reference_probs,
    tree,
    upload,
    wait_for_health,
)

TEXTS = ["a stirring , funny and finally transporting film", "one long string of cliches ."]
PROMPT = "What is the capital of France?"
GENERATION = {"gen-a": "rank 4, q/v", "gen-b": "rank 16, q/k/v/o", "gen-mlp": "rank 8, o + MLP"}
CLASSIFICATION = {"sentiment": LABELS, "topic": ["a", "b"]}


def served(client, adapter: str, name: str) -> dict:
    """The answer of the served `adapter`, a copy of the test adapter `name`."""
    payload = {"inputs": TEXTS} if name in CLASSIFICATION else {"inputs": PROMPT, "parameters": {"max_new_tokens": 10}}
    response = client.post(f"/predict?adapter={adapter}", json=payload)
    assert response.status_code == 200, response.text
    return response.json()


def reference(base: Path, folder: Path, name: str, tokenizer, engine) -> list:
    if name in CLASSIFICATION:
        return peft_reference_probs(base, folder, tokenizer, TEXTS, len(CLASSIFICATION[name])).tolist()
    ids = engine.encode_for_generation([PROMPT], GenerationParams(max_new_tokens=10))[0]
    return peft_reference_greedy(base, folder, ids, 10)


def ours(body: dict, name: str) -> list:
    if name in CLASSIFICATION:
        return [[out["scores"][label] for label in CLASSIFICATION[name]] for out in body["outputs"]]
    return body["outputs"][0]["token_ids"]


def assert_same(name: str, got: list, want: list) -> None:
    if name in CLASSIFICATION:
        assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-5), name
    else:
        assert got == want, name


def test_peft_adapters_uploaded_unchanged_serve_like_peft_and_download_back(
    admin, adapter_store, tiny_base, tokenizer, engine, tmp_path
):
    names = [*GENERATION, *CLASSIFICATION]
    for name in names:  # the folders exactly as PEFT's save_pretrained wrote them, zipped
        body = archive_bytes(adapter_store / name, "zip", top=name)
        assert upload(admin, f"up-{name}", [("adapter", (f"{name}.zip", body, "application/zip"))]).status_code == 201
    expected = {name: reference(tiny_base, adapter_store / name, name, tokenizer, engine) for name in names}

    # ranks 4 and 16 side by side: concurrent requests keep both loaded at once
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda n: (n, served(admin, f"up-{n}", n)), ["gen-a", "gen-b"] * 3))
    loaded = {a["name"]: a["loaded"] for a in admin.get("/adapters").json()["adapters"]}
    assert loaded["up-gen-a"] and loaded["up-gen-b"]
    for name, body in answers:
        assert_same(name, ours(body, name), expected[name])
    for name in names:
        body = served(admin, f"up-{name}", name)
        assert body["task"] == ("classification" if name in CLASSIFICATION else "generation")
        assert_same(name, ours(body, name), expected[name])

    for name in names:  # and back: the download loads in plain PEFT with the same outputs
        response = admin.get(f"/adapters/up-{name}/download")
        zipfile.ZipFile(io.BytesIO(response.content)).extractall(tmp_path / name)
        downloaded = tmp_path / name / f"up-{name}"
        assert_same(name, reference(tiny_base, downloaded, name, tokenizer, engine), expected[name])


def test_replace_lets_in_flight_requests_finish_on_the_old_version(
    admin, adapter_store, tiny_base, tokenizer, engine
):
    registry = admin.app.state.services.registry
    old = peft_reference_probs(tiny_base, adapter_store / "sentiment", tokenizer, TEXTS, 3)
    new = peft_reference_probs(tiny_base, adapter_store / "topic", tokenizer, TEXTS, 2)
    assert upload(admin, "swap", folder_files(adapter_store / "sentiment")).status_code == 201
    v1 = registry.locate("swap")
    in_flight = engine.acquire(v1)  # a request holding version 1
    located = registry.locate("swap")  # one that located version 1 but has not loaded it yet

    replaced = upload(admin, "swap", folder_files(adapter_store / "topic"), replace=True)
    assert replaced.status_code == 201 and replaced.json()["version"] == 2

    finished = engine.classify(TEXTS, in_flight)
    assert torch.allclose(torch.tensor([[r.scores[l] for l in LABELS] for r in finished]), old, atol=1e-5)
    engine.release(in_flight)
    assert in_flight.index in engine.slots._free  # freed by its last user
    _, late = engine.predict(located, TEXTS, GenerationParams())
    assert [r.label for r in late] == [LABELS[int(i)] for i in old.argmax(-1)]

    body = served(admin, "swap", "topic")  # every later request gets version 2
    assert torch.allclose(torch.tensor(ours(body, "topic")), new, atol=1e-5)
    assert admin.get("/adapters/swap").json()["version"] == 2


# ---- a real server process -----------------------------------------------------------------------------------


class ServerProcess:
    """`python -m server` on a free port with the tiny base; killed without mercy by the test."""

    def __init__(self, base: Path, store: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "server", "--base-model", str(base), "--adapters-dir", str(store),
                "--port", str(self.port), "--dtype", "float32", "--num-threads", "1", "--admin-token", TOKEN]
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        self.log_path = log
        self.log = log.open("ab")
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        cwd=Path(__file__).resolve().parent.parent)

    def wait_ready(self, timeout: float = 120) -> None:
        wait_for_health(self.process, self.url, self.log_path, timeout)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.log.close()


def test_a_server_killed_mid_upload_restarts_with_the_same_registry(tmp_path, tiny_base, adapter_store, store):
    log = tmp_path / "server.log"
    server = ServerProcess(tiny_base, store, log)
    try:
        server.wait_ready()
        auth = {"Authorization": f"Bearer {TOKEN}"}
        first = httpx.post(f"{server.url}/adapters", data={"name": "kept"}, headers=auth, timeout=60,
                           files=folder_files(adapter_store / "gen-b"))
        assert first.status_code == 201, first.text
        before, files_before = httpx.get(f"{server.url}/adapters").json(), tree(store)

        # a slow upload: headers promise 1 MB, the body trickles in, then SIGKILL
        boundary = "slowboundary"
        part = (f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nhalf\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
                'filename="adapter_model.safetensors"\r\n\r\n').encode()
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall((f"POST /adapters HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                          f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                          f"Content-Length: {1024**2}\r\n\r\n").encode() + part)
            for _ in range(5):
                sock.sendall(b"\0" * 16384)
                time.sleep(0.1)
            server.kill()
    finally:
        if server.process.poll() is None:
            server.kill()

    restarted = ServerProcess(tiny_base, store, log)
    try:
        restarted.wait_ready()
        assert httpx.get(f"{restarted.url}/adapters").json() == before
        assert tree(store) == files_before
        served = httpx.post(f"{restarted.url}/predict?adapter=kept", json={"inputs": "hi"}, timeout=60)
        assert served.status_code == 200
    finally:
        restarted.kill()
