"""A user's fresh clone stays clean: the server run from it, uploading, fine-tuning and deleting, writes into the
per-user data folder and never into the checkout (`git status --porcelain --ignored` is empty afterwards)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx

from tests.helpers import (
    ADMIN_TOKEN, fresh_clone, free_port, git_status, make_adapter, stop_process, wait_for_health,
)

ROWS = [{"text": f"the film was {w}", "label": "pos" if w in ("great", "lovely") else "neg"}
        for w in ("great", "awful", "lovely", "dull") * 4]


def test_serving_uploading_fine_tuning_and_deleting_leave_the_clone_clean(tmp_path, tiny_base):
    clone = fresh_clone(tmp_path / "loraswap")
    home = tmp_path / "home"  # an empty HOME: the store lands in its per-user data folder
    make_adapter(tiny_base, tmp_path / "mine", task="SEQ_CLS", r=4, seed=7, labels=["neg", "pos"])
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "LORASWAP_"))}
    env.update(HOME=str(home), PYTHONPATH=str(clone), PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1")
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "server", "--base-model", str(tiny_base), "--port", str(port), "--dtype", "float32",
             "--admin-token", ADMIN_TOKEN], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(server, url, log_path, 90)
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60)
        files = [("files", (p.name, p.read_bytes())) for p in sorted((tmp_path / "mine").iterdir())]
        assert http.post("/adapters", data={"name": "mine"}, files=files).status_code == 201
        assert http.post("/predict?adapter=mine", json={"inputs": "great"}).json()["outputs"][0]["label"] in (
            "neg", "pos")
        training = http.post("/v1/files", data={"purpose": "fine-tune"},
                             files={"file": ("rows.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS))}).json()
        job = http.post("/v1/fine_tuning/jobs", json={"model": tiny_base.name, "training_file": training["id"],
                                                      "hyperparameters": {"n_epochs": 1, "batch_size": 8}}).json()
        deadline = time.monotonic() + 180
        while (job := http.get(f"/v1/fine_tuning/jobs/{job['id']}").json())["status"] not in (
                "succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, job
            time.sleep(0.3)
        assert job["status"] == "succeeded", job["error"]
        tuned = job["fine_tuned_model"]
        assert http.post(f"/predict?adapter={tuned}", json={"inputs": "dull"}).status_code == 200
        for name in ("mine", tuned):
            assert http.delete(f"/adapters/{name}").status_code == 200
        for file_id in (training["id"], *job["result_files"]):
            assert http.delete(f"/v1/files/{file_id}").status_code == 200
    finally:
        stop_process(server, 20)
    assert git_status(clone) == ""
    store = home / ".local" / "share" / "loraswap" / "adapters"
    assert (store / ".jobs").is_dir() and (store / ".versions").is_dir()  # it all happened there
