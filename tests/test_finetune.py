"""Files and fine-tuning jobs: checks in-process, then the official `openai` client against real server processes
that train adapters on the tiny base (each job's trainer is a separate process running train-adapter's code)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server.finetune import inspect_jsonl
from tests.helpers import ADMIN_TOKEN, app_client, server_process, tree

CHAT_ROWS = [
    {"messages": [{"role": "system", "content": "You answer with one colour."},
                  {"role": "user", "content": f"What colour is thing {i}?"},
                  {"role": "assistant", "content": ["Blue.", "Red.", "Green."][i % 3]}]}
    for i in range(12)
]
GOOD, BAD = ["great", "lovely", "superb"], ["awful", "dull", "boring"]
CLS_ROWS = [{"text": f"the film was {(GOOD if i % 2 else BAD)[i % 3]}", "label": "pos" if i % 2 else "neg"}
            for i in range(16)]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def error(message: str, param: str | None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


# ---- in-process: file checks, request checks, auth -------------------------------------------------------------


@pytest.fixture
def ft(tiny_settings, engine, store):
    with app_client(tiny_settings, engine, store) as client:
        client.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        yield client


def upload_file(client, content: bytes, name: str = "data.jsonl", purpose: str = "fine-tune"):
    return client.post("/v1/files", data={"purpose": purpose}, files={"file": (name, content, "application/jsonl")})


PROMPT_ROW = '{"prompt": "2+2?", "completion": "4"}\n'


@pytest.mark.parametrize(
    "content, message",
    [
        (PROMPT_ROW + '{"prompt": "3+3?", "completion": "6"\n', "line 2: not valid JSON (Expecting ',' delimiter: "
                                                                 "line 1 column 37 (char 36))"),
        (PROMPT_ROW + "\n[1, 2]\n", "line 3: not a JSON object"),
        (PROMPT_ROW + '{"question": "x", "answer": "y"}\n',
         "line 2: unknown row format (keys ['answer', 'question']); expected {\"messages\"}, "
         "{\"prompt\", \"completion\"} or {\"text\", \"label\"}"),
        (PROMPT_ROW + '{"text": "x", "label": "y"}\n',
         "line 2: a classification row, but the file's first row is a prompt_completion row"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}\n',
         "line 1: the last message must be the assistant's answer (what the model learns to say)"),
        ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "a"}]}\n',
         "line 1: messages[0].role must be 'system', 'user' or 'assistant'"),
        ('{"text": "fine", "label": ""}\n', "line 1: 'label' must be a non-empty string"),
        (PROMPT_ROW + '{"prompt": "x", "completion": 4}\n', "line 2: 'prompt' and 'completion' must be strings"),
        (b"\n\n", "the file has no rows"),
        (PROMPT_ROW.encode() + b'{"prompt": "\xff"}\n', "line 2: not UTF-8 (invalid byte at offset 50)"),
    ],
)
def test_a_bad_file_is_a_400_naming_its_first_bad_line(ft, store, content, message):
    before = tree(store)
    response = upload_file(ft, content if isinstance(content, bytes) else content.encode())
    assert (response.status_code, response.json()) == (400, error(f"file: {message}", "file"))
    assert tree(store) == before  # nothing stored


def test_file_limits_and_purpose(tiny_settings, engine, store):
    with app_client(tiny_settings, engine, store, max_file_rows=2, max_file_bytes=200) as client:
        client.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        too_many = upload_file(client, (PROMPT_ROW * 3).encode())
        assert too_many.json() == error("file: line 3: over the limit of 2 rows (setting max_file_rows)", "file")
        too_big = upload_file(client, PROMPT_ROW.encode() + b" " * 200)
        assert too_big.json() == error("file: the file is over the limit of 200 bytes (setting max_file_bytes)",
                                       "file")
        wrong_purpose = upload_file(client, PROMPT_ROW.encode(), purpose="assistants")
        assert wrong_purpose.json() == error(
            "purpose: 'assistants' is not supported; upload training data with purpose 'fine-tune'", "purpose")
        not_jsonl = upload_file(client, PROMPT_ROW.encode(), name="data.csv")
        assert not_jsonl.json() == error("file: 'data.csv': training files are JSONL, named *.jsonl", "file")


def test_inspect_reports_format_rows_and_labels():
    inspection = inspect_jsonl(jsonl(CLS_ROWS) + b"\n", max_rows=100)
    assert (inspection.row_format, inspection.rows, inspection.labels) == ("classification", 16, ["neg", "pos"])
    chat = inspect_jsonl(jsonl(CHAT_ROWS), max_rows=100)
    assert (chat.row_format, chat.rows, chat.labels) == ("chat", 12, None)


def test_file_upload_list_get_content_delete(ft, store):
    created = upload_file(ft, jsonl(CLS_ROWS), name="reviews.jsonl")
    assert created.status_code == 200, created.text
    record = created.json()
    assert {k: record[k] for k in ("object", "bytes", "filename", "purpose", "status")} == {
        "object": "file", "bytes": len(jsonl(CLS_ROWS)), "filename": "reviews.jsonl", "purpose": "fine-tune",
        "status": "processed"}
    assert ft.get(f"/v1/files/{record['id']}").json() == record
    assert ft.get(f"/v1/files/{record['id']}/content").content == jsonl(CLS_ROWS)
    assert [f["id"] for f in ft.get("/v1/files").json()["data"]] == [record["id"]]
    assert ft.delete(f"/v1/files/{record['id']}").json() == {"id": record["id"], "object": "file", "deleted": True}
    missing = ft.get(f"/v1/files/{record['id']}")
    assert (missing.status_code, missing.json()) == (404, error(f"no file {record['id']!r}", None))
    assert ft.get("/v1/files").json()["data"] == []
    assert sorted(os.listdir(store / ".files")) == []


def test_job_requests_are_checked_before_anything_is_queued(ft, store, tiny_base):
    file_id = upload_file(ft, jsonl(CLS_ROWS)).json()["id"]
    chat_id = upload_file(ft, jsonl(CHAT_ROWS)).json()["id"]
    one_label = upload_file(ft, jsonl([r for r in CLS_ROWS if r["label"] == "pos"])).json()["id"]
    base = tiny_base.name
    cases = [
        ({"model": "gen-a", "training_file": file_id},
         error(f"model: 'gen-a' cannot be fine-tuned here: adapters train on the loaded base, {base!r}", "model")),
        ({"model": base, "training_file": "file-nope"}, error("training_file: no file 'file-nope'", "training_file")),
        ({"model": base, "training_file": one_label},
         error("training_file: a classification file needs at least 2 labels, found ['pos']", "training_file")),
        ({"model": base, "training_file": file_id, "validation_file": chat_id},
         error("validation_file: chat rows, but the training file has classification rows", "validation_file")),
        ({"model": base, "training_file": file_id, "metadata": {"lora_rank": "big"}},
         error("metadata.lora_rank: 'big' is not a int", "metadata.lora_rank")),
        ({"model": base, "training_file": file_id, "metadata": {"lora_rnak": "4"}},
         error("metadata.lora_rnak: unknown LoRA option; known: ['lora_alpha', 'lora_dropout', 'lora_rank', "
               "'lora_target_modules', 'lora_top_layers', 'max_length', 'truncation']", "metadata.lora_rnak")),
        ({"model": base, "training_file": file_id, "metadata": {"lora_top_layers": "3"}},
         error("metadata.lora_top_layers: 3 is not between 1 and 2", "metadata.lora_top_layers")),
        ({"model": base, "training_file": file_id, "metadata": {"lora_target_modules": "q_proj lm_head"}},
         error("metadata.lora_target_modules: lm_head is not one of the base's layers ['down_proj', 'gate_proj', "
               "'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']", "metadata.lora_target_modules")),
        ({"model": base, "training_file": file_id, "suffix": "Bad Name"},
         error("suffix: 'Bad Name' does not make a valid adapter name ('Bad Name-", "suffix")),
        ({"model": base, "training_file": file_id, "hyperparameters": {"n_epochs": 0}},
         error("hyperparameters.n_epochs: Input should be greater than 0", "hyperparameters.n_epochs")),
    ]
    for body, expected in cases:
        response = ft.post("/v1/fine_tuning/jobs", json=body)
        assert response.status_code == 400, body
        got = response.json()
        if expected["error"]["message"].endswith("-"):  # the suffix case: the rest of the name is the job's id
            assert got["error"]["message"].startswith(expected["error"]["message"])
            assert got["error"]["param"] == "suffix"
        else:
            assert got == expected, body
    assert ft.get("/v1/fine_tuning/jobs").json()["data"] == []
    assert not (store / ".jobs").exists()
    missing = ft.get("/v1/fine_tuning/jobs/ftjob-nope")
    assert (missing.status_code, missing.json()) == (404, error("no fine-tuning job 'ftjob-nope'", None))


def test_writes_need_the_admin_token(tiny_settings, engine, store):
    with app_client(tiny_settings, engine, store) as client:
        for method, path in [("post", "/v1/files"), ("delete", "/v1/files/file-x"), ("post", "/v1/fine_tuning/jobs"),
                             ("post", "/v1/fine_tuning/jobs/ftjob-x/cancel")]:
            response = client.request(method.upper(), path, headers={"Authorization": "Bearer wrong"})
            assert (response.status_code, response.json()["error"]["type"]) == (401, "authentication_error"), path
        assert client.get("/v1/fine_tuning/jobs").status_code == 200  # reading needs no token
    with app_client(tiny_settings, engine, store, admin_token=None) as client:
        response = upload_file(client, PROMPT_ROW.encode())
        assert (response.status_code, response.json()["error"]["type"]) == (403, "permission_error")


# ---- real server processes and the official client --------------------------------------------------------------


def client_for(url: str, token: str = ADMIN_TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=60)


def wait_for(oai: openai.OpenAI, job_id: str, statuses: set[str], timeout: float = 180):
    deadline = time.monotonic() + timeout
    while (job := oai.fine_tuning.jobs.retrieve(job_id)).status not in statuses:
        assert time.monotonic() < deadline, f"job still {job.status} after {timeout} s"
        time.sleep(0.3)
    return job


def wait_for_steps(oai: openai.OpenAI, job_id: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not any(e.type == "metrics" for e in oai.fine_tuning.jobs.list_events(job_id, limit=5)):
        assert time.monotonic() < deadline, "no training step after {timeout} s"
        time.sleep(0.3)


def store_path(store: Path, file_id: str) -> Path:
    return store / ".files" / f"{file_id}.jsonl"


def process_gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def live_store(tmp_path_factory, adapter_store) -> Path:
    root = tmp_path_factory.mktemp("ft-store") / "adapters"
    root.mkdir()
    shutil.copytree(adapter_store / "sentiment", root / "sentiment")
    return root


@pytest.fixture(scope="module")
def live(tiny_base, live_store, tmp_path_factory) -> Iterator[str]:
    with server_process(tiny_base, live_store, tmp_path_factory.mktemp("ft-log") / "server.log") as (url, _):
        yield url


def test_chat_job_end_to_end_with_the_openai_client(live, tiny_base):
    oai = client_for(live)
    training = oai.files.create(file=("colours.jsonl", jsonl(CHAT_ROWS)), purpose="fine-tune")
    assert (training.purpose, training.bytes, training.filename) == ("fine-tune", len(jsonl(CHAT_ROWS)),
                                                                     "colours.jsonl")
    job = oai.fine_tuning.jobs.create(model=tiny_base.name, training_file=training.id, suffix="colours", seed=3,
                                      hyperparameters={"n_epochs": 2, "batch_size": 4,
                                                       "learning_rate_multiplier": 10})
    assert job.status == "queued" and job.fine_tuned_model is None
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (2, 4)
    done = wait_for(oai, job.id, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done.error
    name = done.fine_tuned_model
    assert name == f"colours-{job.id.removeprefix('ftjob-')[:8]}" and done.finished_at >= done.created_at
    assert done.trained_tokens > 0

    events = list(reversed(oai.fine_tuning.jobs.list_events(job.id, limit=100).data))  # oldest first
    steps = [e.data for e in events if e.type == "metrics" and "train_loss" in e.data]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]  # 10 rows (2 held out) / batch 4 x 2 epochs
    assert all(s["total_steps"] == 6 and s["train_loss"] > 0 for s in steps)
    messages = [e.message for e in events]
    auto_lines = [m for m in messages if m.startswith("Auto ")]  # what was not given: not epochs, batch, rate
    assert [m.split(":")[0] for m in auto_lines] == ["Auto validation", "Auto LoRA targets", "Auto layers",
                                                     "Auto max length", "Auto max new tokens"]
    assert auto_lines[0] == "Auto validation: 2 of 12 rows held out of the training file"
    assert messages[:len(auto_lines) + 4] == [
        f"Validated the training file {training.id} (12 rows, chat)", *auto_lines,
        "Hyperparameters: 2 epochs, batch size 4, learning rate 0.002, LoRA r=8 on q_proj k_proj v_proj o_proj "
        "gate_proj up_proj down_proj", "Fine-tuning job queued",
        messages[len(auto_lines) + 3]]  # the last names the trainer's process id
    assert any(m.startswith("Validation metrics: exact_match=") for m in messages)
    assert events[-1].message == "The job has successfully completed"
    page = oai.fine_tuning.jobs.list_events(job.id, limit=2)
    assert page.has_more and len(page.data) == 2

    metrics_csv = oai.files.content(done.result_files[0]).text.splitlines()
    assert metrics_csv[0] == "step,train_loss,valid_loss,valid_accuracy,valid_macro_f1"
    assert [line.split(",")[0] for line in metrics_csv[1:]] == ["0", "1", "2", "3", "4", "5", "6"]
    assert oai.files.content(done.result_files[1]).content.startswith(b"\x89PNG")

    assert name in {m.id for m in oai.models.list()}
    answer = oai.chat.completions.create(model=name, messages=CHAT_ROWS[0]["messages"][:2], max_tokens=4,
                                         temperature=0)
    assert answer.choices[0].message.content and answer.model == name
    predicted = httpx.post(f"{live}/predict?adapter={name}",
                           json={"inputs": "What colour?", "parameters": {"max_new_tokens": 3}})
    assert predicted.status_code == 200 and predicted.json()["task"] == "generation"
    assert job.id in [j.id for j in oai.fine_tuning.jobs.list()]


def test_classification_job_learns_labels_from_the_file(live, tiny_base):
    oai = client_for(live)
    training = oai.files.create(file=("train.jsonl", jsonl(CLS_ROWS)), purpose="fine-tune")
    validation = oai.files.create(file=("dev.jsonl", jsonl(CLS_ROWS[:6])), purpose="fine-tune")
    job = oai.fine_tuning.jobs.create(model=tiny_base.name, training_file=training.id, validation_file=validation.id,
                                      hyperparameters={"n_epochs": 1, "batch_size": 8},
                                      metadata={"lora_rank": "4", "lora_target_modules": "q_proj,v_proj,o_proj"})
    done = wait_for(oai, job.id, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done.error
    events = [e for e in oai.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any(e.type == "metrics" and "valid_loss" in e.data for e in events)
    assert any(e.message.startswith("Validation metrics: accuracy=") for e in events)
    record = httpx.get(f"{live}/adapters/{done.fine_tuned_model}").json()
    assert (record["task"], record["labels"], record["rank"]) == ("classification", ["neg", "pos"], 4)
    assert sorted(record["target_modules"]) == ["o_proj", "q_proj", "v_proj"]
    output = httpx.post(f"{live}/predict?adapter={done.fine_tuned_model}", json={"inputs": ["a superb film"]}).json()
    assert output["outputs"][0]["label"] in ("neg", "pos")
    chat = oai.chat.completions.create(model=done.fine_tuned_model,
                                       messages=[{"role": "user", "content": "a superb film"}])
    assert chat.choices[0].message.content == output["outputs"][0]["label"]


def test_cancel_of_a_running_job_installs_nothing(live, live_store, tiny_base):
    oai = client_for(live)
    training = oai.files.create(file=("long.jsonl", jsonl(CLS_ROWS)), purpose="fine-tune")
    job = oai.fine_tuning.jobs.create(model=tiny_base.name, training_file=training.id,
                                      hyperparameters={"n_epochs": 1000, "batch_size": 1})
    wait_for_steps(oai, job.id)
    waiting = oai.fine_tuning.jobs.create(model=tiny_base.name, training_file=training.id)
    assert oai.fine_tuning.jobs.retrieve(waiting.id).status == "queued"  # one job trains at a time
    newest = oai.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in newest.data] == [waiting.id] and newest.has_more
    assert [j.id for j in oai.fine_tuning.jobs.list(limit=1, after=waiting.id).data] == [job.id]
    assert oai.fine_tuning.jobs.cancel(waiting.id).status == "cancelled"
    assert oai.fine_tuning.jobs.list_events(waiting.id, limit=1).data[0].message == (
        "The job was cancelled; nothing was installed")
    before = set(os.listdir(live_store))
    cancelled = oai.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    assert oai.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert set(os.listdir(live_store)) == before
    assert not any(m.id.startswith("ft-" + job.id.removeprefix("ftjob-")[:8]) for m in oai.models.list())
    again = httpx.post(f"{live}/v1/fine_tuning/jobs/{job.id}/cancel",
                       headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert (again.status_code, again.json()["error"]["message"]) == (
        400, f"fine_tuning_job_id: job {job.id!r} has already cancelled")


def test_a_trainer_that_fails_fails_its_job_with_its_message(live, live_store, tiny_base):
    oai = client_for(live)
    rows = [{"text": "the film was long, slow and in the end rather " + word, "label": "pos" if word in GOOD else "neg"}
            for word in (GOOD + BAD) * 2]
    training = oai.files.create(file=("long-rows.jsonl", jsonl(rows)), purpose="fine-tune")
    before = tree(live_store)
    job = oai.fine_tuning.jobs.create(model=tiny_base.name, training_file=training.id,
                                      metadata={"max_length": "8"})
    done = wait_for(oai, job.id, {"succeeded", "failed", "cancelled"})
    assert done.status == "failed" and done.fine_tuned_model is None
    assert done.error.code == "invalid_training_file" and done.error.param == "training_file"
    assert done.error.message == (f"the trainer exited with code 2: {store_path(live_store, training.id)}: row 1 "
                                  "has 12 tokens, over --max-length 8 (raise --max-length or pass --truncation)")
    after = tree(live_store)
    assert {k: v for k, v in after.items() if not k.startswith((".jobs", ".files"))} == \
        {k: v for k, v in before.items() if not k.startswith((".jobs", ".files"))}


def test_without_the_token_the_client_is_refused(live, tiny_base):
    with pytest.raises(openai.AuthenticationError):
        client_for(live, token="wrong").files.create(file=("x.jsonl", jsonl(CLS_ROWS)), purpose="fine-tune")
    bad = client_for(live)
    with pytest.raises(openai.BadRequestError) as refused:
        bad.files.create(file=("x.jsonl", b'{"text": "a", "label": "b"}\n{"oops"\n'), purpose="fine-tune")
    assert refused.value.param == "file" and refused.value.message == (
        "Error code: 400 - file: line 2: not valid JSON (Expecting ':' delimiter: line 1 column 8 (char 7))")


def test_a_restart_during_a_job_fails_it_and_the_server_serves(tiny_base, adapter_store, tmp_path):
    store = tmp_path / "adapters"
    store.mkdir()
    shutil.copytree(adapter_store / "sentiment", store / "sentiment")
    log_path = tmp_path / "server.log"
    with server_process(tiny_base, store, log_path) as (url, process):
        oai = client_for(url)
        training = oai.files.create(file=("long.jsonl", jsonl(CLS_ROWS)), purpose="fine-tune")
        job = oai.fine_tuning.jobs.create(model=tiny_base.name, training_file=training.id,
                                          hyperparameters={"n_epochs": 1000, "batch_size": 1})
        wait_for_steps(oai, job.id)
        trainer = json.loads((store / ".jobs" / job.id / "job.json").read_text())["trainer_pid"]
        process.send_signal(signal.SIGKILL)  # a crash: no shutdown hook runs
        process.wait()
    assert process_gone(trainer), "the trainer outlived the server"
    with server_process(tiny_base, store, log_path) as (url, _):
        oai = client_for(url)
        failed = oai.fine_tuning.jobs.retrieve(job.id)
        assert failed.status == "failed" and failed.error.code == "server_restarted"
        assert failed.error.message == "the server stopped while the job was running; start a new job"
        assert oai.files.retrieve(training.id).bytes == len(jsonl(CLS_ROWS))  # files survive too
        assert {m.id for m in oai.models.list()} == {tiny_base.name, "sentiment"}
        assert not (store / ".jobs" / job.id / "work").exists()


def test_chat_rows_train_on_the_prompt_chat_completions_sends(tokenizer, tmp_path):
    """A chat row's prompt is the conversation before the last message, encoded as /v1/chat/completions encodes it;
    the loss covers the assistant's answer and the closing <|im_end|>."""
    from scripts import train_adapter
    from server.encoding import encode_chat

    path = tmp_path / "chat.jsonl"
    path.write_bytes(jsonl(CHAT_ROWS[:2]))
    args = train_adapter.build_parser().parse_args(
        ["--task", "generation", "--name", "c", "--train", str(path), "--messages-column", "messages",
         "--max-length", "256"])
    examples, prompts, answers, _ = train_adapter.generation_examples(args, tokenizer, path)
    messages = CHAT_ROWS[1]["messages"]
    prompt_ids = encode_chat(tokenizer, messages[:-1])
    assert prompts[1] == prompt_ids and answers[1] == "Red."
    assert examples[1].prompt_len == len(prompt_ids)
    assert examples[1].input_ids == prompt_ids + tokenizer("Red.", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id]
