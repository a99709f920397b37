"""Fine-tuning over HTTP: uploaded data files, and jobs that train an adapter beside the serving base.

Storage lives in hidden folders of the adapter store (the registry never reads names starting with '.'):

    .files/<id>.json             a file's record; its bytes in .files/<id><suffix> (.jsonl uploads, .csv/.png results)
    .jobs/<id>/job.json          a job's record, replaced atomically at each change
    .jobs/<id>/events.jsonl      its events, appended as they happen
    .jobs/<id>/work/             the trainer's progress, log and output; removed when the job ends

Every hyperparameter a job does not set is chosen when it is created, from its data and the loaded base
(server/finetune_auto.py, the same choices train-adapter makes), and stated in its events; data that cannot make a
useful adapter is refused then, before anything is queued.

One job trains at a time, in its own process (`python -m server.finetune_worker`, i.e. train-adapter's code) at a
lower CPU priority and with its own thread count, while the server keeps serving. The trainer writes only into the
job's work folder; a finished adapter enters the store through `Registry.add`, the same checked, atomic path as an
upload. A trainer that crashes fails its job with its last words and leaves the store untouched.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, Protocol

from . import finetune_auto as auto
from .adapter_format import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE
from .archive import ArchiveLimits
from .encoding import encode_chat, encode_prompt
from .engine_api import EngineAPI
from .errors import InvalidInput, LoraswapError, NotFound
from .registry import Registry, valid_name
from .settings import Settings

if TYPE_CHECKING:
    from .base_model import BaseInfo

log = logging.getLogger(__name__)

FILES_DIR = ".files"
JOBS_DIR = ".jobs"
PLOT_FILE = "training.png"  # written by train-adapter next to the adapter
VALIDATION_METRICS_FILE = "validation_metrics.csv"
BASE_LEARNING_RATE = 2e-4  # learning_rate_multiplier 1
# our LoRA options (metadata); None is auto (server/finetune_auto.py)
LORA_DEFAULTS = {"lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.05, "lora_target_modules": None,
                 "lora_top_layers": None, "max_length": None, "truncation": None}
FINISHED = {"succeeded", "failed", "cancelled"}
VALIDATION_FIGURES = ("eval_loss", "accuracy", "macro_f1")  # train-adapter's figures at each eval point
SUMMARY_KEYS = ("accuracy", "macro_f1", "decision_accuracy", "exact_match", "token_f1", "rouge_l")
SERVER_PACKAGE_PARENT = Path(__file__).resolve().parent.parent  # the trainer imports server/ and scripts/ from here

RowFormat = Literal["chat", "prompt_completion", "classification"]
FORMAT_KEYS: dict[RowFormat, set[str]] = {
    "chat": {"messages"}, "prompt_completion": {"prompt", "completion"}, "classification": {"text", "label"},
}
FORMAT_TASK: dict[RowFormat, str] = {
    "chat": "generation", "prompt_completion": "generation", "classification": "classification",
}


class FileInvalid(InvalidInput):
    """An uploaded data file that cannot be trained on; the message names the first bad line."""

    def __init__(self, message: str):
        super().__init__("file", message)


class JobStateError(InvalidInput):
    def __init__(self, message: str):
        super().__init__("fine_tuning_job_id", message)


# ---- data files --------------------------------------------------------------------------------------------------


def _now() -> int:
    return int(time.time())


@dataclass
class FileRecord:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    suffix: str  # of the stored bytes
    row_format: RowFormat | None = None  # uploads for training
    rows: int = 0
    labels: list[str] | None = None  # classification files

    def as_openai(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "expires_at": None,
                "status_details": None}


@dataclass
class Inspection:
    row_format: RowFormat
    rows: int
    labels: list[str] | None


def _check_chat(row: dict) -> str | None:
    messages = row["messages"]
    if not isinstance(messages, list) or len(messages) < 2:
        return "'messages' must be a list of at least 2 messages"
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content", "name", "weight"}:
            return f"messages[{index}] must be an object with 'role' and 'content'"
        if message.get("role") not in ("system", "user", "assistant"):
            return f"messages[{index}].role must be 'system', 'user' or 'assistant'"
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            return f"messages[{index}].content must be a non-empty string"
    if messages[-1]["role"] != "assistant":
        return "the last message must be the assistant's answer (what the model learns to say)"
    return None


def _check_row(row: dict, row_format: RowFormat) -> str | None:
    if row_format == "chat":
        return _check_chat(row)
    if row_format == "prompt_completion":
        if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
            return "'prompt' and 'completion' must be strings"
        if not row["prompt"].strip() or not row["completion"].strip():
            return "'prompt' and 'completion' must not be empty"
        return None
    if not isinstance(row["text"], str) or not row["text"].strip():
        return "'text' must be a non-empty string"
    if not isinstance(row["label"], str) or not row["label"].strip():
        return "'label' must be a non-empty string"
    return None


def _format_of(row: dict) -> RowFormat | None:
    return next((f for f, keys in FORMAT_KEYS.items() if keys <= set(row)), None)


def inspect_jsonl(data: bytes, max_rows: int) -> Inspection:
    """Check a training file line by line; FileInvalid names the first bad line and what is wrong with it."""
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise FileInvalid(f"line {line}: not UTF-8 (invalid byte at offset {exc.start})") from None
    row_format: RowFormat | None = None
    rows, labels = 0, set()
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise FileInvalid(f"line {number}: not valid JSON ({exc})") from None
        except RecursionError:
            raise FileInvalid(f"line {number}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise FileInvalid(f"line {number}: not a JSON object")
        found = _format_of(row)
        if found is None:
            raise FileInvalid(f"line {number}: unknown row format (keys {sorted(row)}); expected {{\"messages\"}}, "
                              "{\"prompt\", \"completion\"} or {\"text\", \"label\"}")
        if row_format is not None and found != row_format:
            raise FileInvalid(f"line {number}: a {found} row, but the file's first row is a {row_format} row")
        if problem := _check_row(row, found):
            raise FileInvalid(f"line {number}: {problem}")
        row_format = found
        rows += 1
        if rows > max_rows:
            raise FileInvalid(f"line {number}: over the limit of {max_rows} rows (setting max_file_rows)")
        if found == "classification":
            labels.add(row["label"])
    if row_format is None:
        raise FileInvalid("the file has no rows")
    return Inspection(row_format, rows, sorted(labels) if row_format == "classification" else None)


class TrainingEngine(Protocol):
    """What a job's plan reads of the local engine it trains beside: the base, its tokenizer, the layers it wrapped."""

    info: BaseInfo
    tokenizer: Any
    layers: dict[str, Any]


def base_shape(engine: TrainingEngine) -> auto.BaseShape:
    """The loaded base as `auto` sees it: its family, depth, context and the layers the engine wrapped."""
    info = engine.info
    return auto.BaseShape(info.family, info.num_layers, info.max_context, tuple(engine.layers))


def data_stats(data: bytes, row_format: RowFormat, tokenizer) -> auto.DataStats:
    """Token lengths of a checked training file's rows, encoded as train-adapter encodes them (classification: the
    raw text; generation: the prompt in the chat template, then the answer and the end token)."""
    rows = [json.loads(line) for line in data.decode("utf-8").removeprefix("\ufeff").split("\n") if line.strip()]
    if row_format == "classification":
        lengths = [len(ids) for ids in tokenizer([row["text"] for row in rows])["input_ids"]]
        return auto.DataStats("classification", lengths, labels=[row["label"] for row in rows])
    if row_format == "chat":
        prompts = [encode_chat(tokenizer, [{"role": m["role"], "content": m["content"]} for m in row["messages"][:-1]])
                   for row in rows]
        answers = [row["messages"][-1]["content"] for row in rows]
    else:
        prompts = [encode_prompt(tokenizer, row["prompt"]) for row in rows]
        answers = [row["completion"] for row in rows]
    answer_lengths = [len(ids) + 1 for ids in tokenizer(answers, add_special_tokens=False)["input_ids"]]
    prompt_lengths = [len(ids) for ids in prompts]
    return auto.DataStats("generation", [p + a for p, a in zip(prompt_lengths, answer_lengths)],
                          prompt_lengths=prompt_lengths, answer_lengths=answer_lengths)


class FileStore:
    """Uploaded training files and the result files of jobs, with their records."""

    def __init__(self, root: Path):
        self.root = root
        self._lock = threading.Lock()
        self._records: dict[str, FileRecord] = {}
        for partial in root.glob(".*.partial") if root.is_dir() else []:  # a write cut short by a crash
            partial.unlink()
        for path in sorted(root.glob("*.json")) if root.is_dir() else []:
            record = FileRecord(**json.loads(path.read_text()))
            if self.path(record).is_file():
                self._records[record.id] = record

    def path(self, record: FileRecord) -> Path:
        return self.root / f"{record.id}{record.suffix}"

    def add(self, filename: str, purpose: str, content: bytes, suffix: str, inspection: Inspection | None = None
            ) -> FileRecord:
        record = FileRecord(id="file-" + uuid.uuid4().hex[:24], filename=filename, purpose=purpose,
                            bytes=len(content), created_at=_now(), suffix=suffix)
        if inspection is not None:
            record.row_format, record.rows, record.labels = inspection.row_format, inspection.rows, inspection.labels
        self.root.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.path(record), content)
        _write_atomically(self.root / f"{record.id}.json", json.dumps(asdict(record)).encode())  # the commit point
        with self._lock:
            self._records[record.id] = record
        log.info("stored file %s (%s, %s, %d bytes)", record.id, filename, purpose, record.bytes)
        return record

    def get(self, file_id: str) -> FileRecord:
        with self._lock:
            record = self._records.get(file_id)
        if record is None:
            raise NotFound(f"no file {file_id!r}")
        return record

    def records(self) -> list[FileRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: (r.created_at, r.id))

    def delete(self, file_id: str) -> None:
        record = self.get(file_id)
        with self._lock:
            (self.root / f"{record.id}.json").unlink()  # the commit point
            self.path(record).unlink(missing_ok=True)
            del self._records[file_id]
        log.info("deleted file %s", file_id)


def _write_atomically(path: Path, content: bytes) -> None:
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    with partial.open("wb") as out:
        out.write(content)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)


# ---- jobs --------------------------------------------------------------------------------------------------------


@dataclass
class JobSpec:
    """What a job trains: as requested (None: auto), then every value resolved when it is created."""

    model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int
    n_epochs: float | None
    batch_size: int | None
    learning_rate_multiplier: float | None
    lora: dict  # LORA_DEFAULTS' keys
    metadata: dict[str, str] | None = None
    class_weights: dict[str, float] | None = None  # classification: the loss weight per label (skewed labels)
    validation_rows: int = 0  # held out of the training file (no validation file given)
    max_new_tokens: int | None = None  # generation: per validation answer
    auto: list[str] = field(default_factory=list)  # each automatic choice and why

    def resolve(self, plan: auto.Plan) -> None:
        self.n_epochs, self.batch_size = plan.epochs, plan.batch_size
        self.learning_rate_multiplier = round(plan.learning_rate / BASE_LEARNING_RATE, 6)
        self.lora = {**self.lora, "lora_target_modules": " ".join(plan.target_modules),
                     "lora_top_layers": plan.top_layers, "max_length": plan.max_length, "truncation": plan.truncation}
        self.class_weights, self.validation_rows = plan.class_weights, plan.validation_rows
        self.max_new_tokens, self.auto = plan.max_new_tokens, plan.reasons

    def requested(self) -> auto.Requested:
        lora = self.lora
        return auto.Requested(
            epochs=self.n_epochs, batch_size=self.batch_size,
            learning_rate=None if self.learning_rate_multiplier is None
            else BASE_LEARNING_RATE * self.learning_rate_multiplier,
            target_modules=tuple(lora["lora_target_modules"].split()) if lora["lora_target_modules"] else None,
            top_layers=lora["lora_top_layers"], max_length=lora["max_length"], truncation=lora["truncation"])


@dataclass
class Job:
    id: str
    spec: JobSpec
    row_format: RowFormat
    adapter_name: str
    created_at: int
    status: str = "validating_files"
    finished_at: int | None = None
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    error: dict | None = None
    result_files: list[str] = field(default_factory=list)
    trainer_pid: int | None = None  # the running trainer's process id (not shown to clients)

    def as_openai(self) -> dict:
        spec = self.spec
        hyperparameters = {"n_epochs": spec.n_epochs, "batch_size": spec.batch_size,
                           "learning_rate_multiplier": spec.learning_rate_multiplier}
        return {
            "object": "fine_tuning.job", "id": self.id, "model": spec.model, "created_at": self.created_at,
            "finished_at": self.finished_at, "fine_tuned_model": self.fine_tuned_model,
            "organization_id": "loraswap", "result_files": self.result_files, "status": self.status,
            "training_file": spec.training_file, "validation_file": spec.validation_file,
            "hyperparameters": hyperparameters, "trained_tokens": self.trained_tokens, "error": self.error,
            "seed": spec.seed, "suffix": spec.suffix, "estimated_finish": None, "integrations": [],
            "metadata": spec.metadata, "lora": spec.lora,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        }

    @classmethod
    def from_dict(cls, data: dict) -> Job:
        return cls(**{**data, "spec": JobSpec(**data["spec"])})


def adapter_name_for(job_id: str, suffix: str | None) -> str:
    return f"{suffix or 'ft'}-{job_id.removeprefix('ftjob-')[:8]}"


class FineTuning:
    """Files, jobs and the one runner thread that trains queued jobs in order."""

    def __init__(self, settings: Settings, registry: Registry, ready_engine: Callable[[], EngineAPI]):
        self.settings = settings
        self.registry = registry
        self.ready_engine = ready_engine
        self.files = FileStore(registry.root / FILES_DIR)
        self.jobs_root = registry.root / JOBS_DIR
        self._lock = threading.Lock()  # guards _jobs, job records on disk and the cancel of a running job
        self._jobs: dict[str, Job] = {}
        self._queue: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._running: tuple[str, subprocess.Popen] | None = None
        self._cancelled: set[str] = set()
        self._thread: threading.Thread | None = None
        self._recover()

    # ---- life cycle -----------------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Read the jobs back after a restart: one that was running fails, queued ones wait again."""
        folders = sorted(self.jobs_root.iterdir()) if self.jobs_root.is_dir() else []
        jobs = [Job.from_dict(json.loads((f / "job.json").read_text())) for f in folders if (f / "job.json").is_file()]
        for job in sorted(jobs, key=lambda j: (j.created_at, j.id)):
            self._jobs[job.id] = job
            shutil.rmtree(self._folder(job) / "work", ignore_errors=True)
            if job.status in ("running", "validating_files"):
                self._finish(job, "failed", error={
                    "code": "server_restarted", "param": None,
                    "message": "the server stopped while the job was running; start a new job"})
            elif job.status == "queued":
                self._queue.put(job.id)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run_queue, name="finetune-runner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the runner; a running trainer is killed and its job fails (a restart cannot resume it)."""
        self._stop.set()
        self._queue.put("")  # wakes the runner
        with self._lock:
            if self._running is not None:
                _kill(self._running[1])
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- files ----------------------------------------------------------------------------------------------

    def add_file(self, filename: str, purpose: str, content: BinaryIO) -> FileRecord:
        if purpose != "fine-tune":
            raise InvalidInput("purpose", f"{purpose!r} is not supported; upload training data with purpose "
                                          "'fine-tune'")
        data = content.read(self.settings.max_file_bytes + 1)
        if len(data) > self.settings.max_file_bytes:
            raise InvalidInput("file", f"the file is over the limit of {self.settings.max_file_bytes} bytes "
                                       "(setting max_file_bytes)")
        if not filename.endswith(".jsonl"):
            raise InvalidInput("file", f"{filename!r}: training files are JSONL, named *.jsonl")
        inspection = inspect_jsonl(data, self.settings.max_file_rows)
        return self.files.add(filename, purpose, data, ".jsonl", inspection)

    def delete_file(self, file_id: str) -> None:
        self.files.get(file_id)
        with self._lock:
            users = [j.id for j in self._jobs.values() if j.status not in FINISHED
                     and file_id in (j.spec.training_file, j.spec.validation_file)]
            if users:
                raise InvalidInput("file_id", f"{file_id!r} is used by {users[0]}, which has not finished")
            self.files.delete(file_id)

    # ---- jobs -----------------------------------------------------------------------------------------------

    def create_job(self, spec: JobSpec, engine: TrainingEngine) -> Job:
        """Check the files a job names and that its data can make a useful adapter, decide every `auto` choice,
        then queue it; nothing is kept if a check fails."""
        training = self._training_file(spec.training_file, "training_file")
        if training.row_format == "classification" and len(training.labels or []) < 2:
            raise InvalidInput("training_file", f"a classification file needs at least 2 labels, found "
                                                f"{training.labels}")
        if spec.validation_file is not None:
            validation = self._training_file(spec.validation_file, "validation_file")
            if validation.id == training.id:
                raise InvalidInput("validation_file", "the validation file is the training file; use held-out rows")
            if validation.row_format != training.row_format:
                raise InvalidInput("validation_file", f"{validation.row_format} rows, but the training file has "
                                                      f"{training.row_format} rows")
            unseen = sorted(set(validation.labels or []) - set(training.labels or []))
            if unseen:
                raise InvalidInput("validation_file", f"label {unseen[0]!r} is not in the training file")
        stats = data_stats(self.files.path(training).read_bytes(), training.row_format, engine.tokenizer)
        shape = base_shape(engine)
        try:
            auto.check_usable(stats, shape.max_context)
        except auto.DataUnusable as exc:
            raise InvalidInput("training_file", str(exc)) from None
        spec.resolve(auto.plan(stats, shape, spec.requested(), spec.validation_file is not None, spec.seed))
        job_id = "ftjob-" + uuid.uuid4().hex[:24]
        name = adapter_name_for(job_id, spec.suffix)
        if not valid_name(name):
            raise InvalidInput("suffix", f"{spec.suffix!r} does not make a valid adapter name ({name!r}): use a-z, "
                                         "0-9, '.', '_', '-'")
        job = Job(job_id, spec, training.row_format, name, created_at=_now())
        with self._lock:
            self._jobs[job.id] = job
            self._save(job)
            self._event(job, f"Validated the training file {training.id} ({training.rows} rows, "
                             f"{training.row_format})")
            for reason in spec.auto:
                self._event(job, f"Auto {reason}")
            rate = BASE_LEARNING_RATE * spec.learning_rate_multiplier
            self._event(job, f"Hyperparameters: {spec.n_epochs:g} epochs, batch size {spec.batch_size}, learning "
                             f"rate {rate:g}, LoRA r={spec.lora['lora_rank']} on {spec.lora['lora_target_modules']}",
                        data={"hyperparameters": {**asdict(spec), "learning_rate": rate}})
            job.status = "queued"
            self._save(job)
            self._event(job, "Fine-tuning job queued")
        self._queue.put(job.id)
        log.info("queued fine-tuning job %s -> adapter %s", job.id, name)
        return job

    def _training_file(self, file_id: str, param: str) -> FileRecord:
        try:
            record = self.files.get(file_id)
        except NotFound:
            raise InvalidInput(param, f"no file {file_id!r}") from None
        if record.purpose != "fine-tune":
            raise InvalidInput(param, f"{file_id!r} has purpose {record.purpose!r}, not 'fine-tune'")
        return record

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no fine-tuning job {job_id!r}")
        return job

    def jobs(self) -> list[Job]:
        """Newest first, as OpenAI lists them."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: (j.created_at, j.id), reverse=True)

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        with self._lock:
            if job.status in FINISHED:
                raise JobStateError(f"job {job_id!r} has already {job.status}")
            if self._running is not None and self._running[0] == job_id:
                self._cancelled.add(job_id)
                _kill(self._running[1])  # the runner sees it exit and ends the job cancelled
            else:
                self._finish(job, "cancelled")
                return job
        deadline = time.monotonic() + 30
        while job.status not in FINISHED and time.monotonic() < deadline:  # the runner ends it once the trainer exits
            time.sleep(0.05)
        return job

    def events(self, job_id: str) -> list[dict]:
        """Newest first."""
        path = self._folder(self.get(job_id)) / "events.jsonl"
        with self._lock:
            lines = path.read_text().splitlines() if path.is_file() else []
        return [json.loads(line) for line in reversed(lines)]

    # ---- the runner -----------------------------------------------------------------------------------------

    def _run_queue(self) -> None:
        while not self._stop.is_set():
            job_id = self._queue.get()
            if self._stop.is_set() or not job_id:
                return
            while not self._stop.is_set():  # after a restart the base may still be loading
                try:
                    engine = self.ready_engine()
                    break
                except LoraswapError:
                    self._stop.wait(0.5)
            else:
                return
            job = self.get(job_id)
            if job.status != "queued":  # cancelled while it waited
                continue
            try:
                self._train(job, engine)
            except Exception as exc:  # the runner must survive any one job
                log.exception("fine-tuning job %s failed", job.id)
                with self._lock:
                    if job.status not in FINISHED:
                        self._finish(job, "failed", error={"code": "internal_error", "param": None,
                                                           "message": f"{exc.__class__.__name__}: {exc}"})

    def _train(self, job: Job, engine: EngineAPI) -> None:
        work = self._folder(job) / "work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        progress_path, log_path = work / "progress.jsonl", work / "trainer.log"
        progress_path.touch()
        command = [sys.executable, "-m", "server.finetune_worker", str(progress_path), *self._trainer_args(job, work)]
        threads = str(self.settings.finetune_threads)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(SERVER_PACKAGE_PARENT), os.environ.get("PYTHONPATH")]))}
        with self._lock:
            if self._stop.is_set() or job.status != "queued":
                return
            with log_path.open("wb") as trainer_log:
                process = subprocess.Popen(command, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=trainer_log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
            try:
                os.setpriority(os.PRIO_PROCESS, process.pid, self.settings.finetune_nice)
            except OSError:  # it may have exited already; its exit code tells what happened
                pass
            self._running = (job.id, process)
            job.status, job.trained_tokens, job.trainer_pid = "running", 0, process.pid
            self._save(job)
            self._event(job, f"Fine-tuning job started: training process {process.pid}, nice "
                             f"{self.settings.finetune_nice}, {threads} thread(s)")
        log.info("fine-tuning job %s started (trainer pid %d)", job.id, process.pid)
        tracker = _ProgressTracker(progress_path)
        while process.poll() is None:
            time.sleep(0.2)
            self._follow(job, tracker)
        self._follow(job, tracker)
        with self._lock:
            self._running = None
            job.trainer_pid = None
            try:
                if job.id in self._cancelled:
                    self._finish(job, "cancelled")
                elif self._stop.is_set():
                    self._finish(job, "failed", error={"code": "server_restarted", "param": None,
                                                       "message": "the server stopped while the job was running; "
                                                                  "start a new job"})
                elif process.returncode != 0:
                    self._finish(job, "failed", error={
                        "code": "invalid_training_file" if process.returncode == 2 else "trainer_failed",
                        "param": "training_file" if process.returncode == 2 else None,
                        "message": _last_words(log_path, process.returncode)})
                else:
                    self._install(job, engine, work / "adapter", tracker)
            finally:
                self._cancelled.discard(job.id)
                shutil.rmtree(work, ignore_errors=True)

    def _trainer_args(self, job: Job, work: Path) -> list[str]:
        spec, lora, settings = job.spec, job.spec.lora, self.settings
        args = ["--task", FORMAT_TASK[job.row_format], "--name", job.adapter_name,
                "--train", str(self.files.path(self.files.get(spec.training_file))), "--output", str(work / "adapter"),
                "--cache-dir", str(settings.cache_dir), "--threads", str(settings.finetune_threads),
                "--epochs", str(spec.n_epochs), "--batch-size", str(spec.batch_size),
                "--lr", str(BASE_LEARNING_RATE * spec.learning_rate_multiplier), "--seed", str(spec.seed),
                "--rank", str(lora["lora_rank"]), "--alpha", str(lora["lora_alpha"]),
                "--dropout", str(lora["lora_dropout"]), "--target-modules", *lora["lora_target_modules"].split(),
                "--top-layers", str(lora["lora_top_layers"] or 0), "--max-length", str(lora["max_length"]),
                "--class-weights", "on" if spec.class_weights else "off", "--device", settings.device]
        if settings.base_model is not None:
            args += ["--base-model", str(settings.base_model)]
        if lora["truncation"]:
            args.append("--truncation")
        if spec.max_new_tokens is not None:
            args += ["--max-new-tokens", str(spec.max_new_tokens)]
        if spec.validation_file is not None:
            args += ["--eval", str(self.files.path(self.files.get(spec.validation_file)))]
        if job.row_format == "chat":
            args += ["--messages-column", "messages"]
        elif job.row_format == "prompt_completion":
            args += ["--prompt-template", "{prompt}", "--answer-template", "{completion}"]
        return args

    def _follow(self, job: Job, tracker: _ProgressTracker) -> None:
        """Turn the trainer's new progress lines into job events."""
        events = tracker.read()
        if not events:
            return
        with self._lock:
            for event in events:
                kind = event["event"]
                if kind == "start":
                    self._event(job, f"Training started: {event['total_steps']} steps",
                                data={"total_steps": event["total_steps"]})
                elif kind == "step":
                    job.trained_tokens = (job.trained_tokens or 0) + event["tokens"]
                    self._event(job, f"Step {event['step']}/{tracker.total_steps}: training loss={event['loss']:.4f}",
                                kind="metrics", data={"step": event["step"], "total_steps": tracker.total_steps,
                                                      "train_loss": event["loss"]})
                elif kind == "eval":
                    figures = {f"valid_{key.removeprefix('eval_')}": value for key, value in event.items()
                               if key in VALIDATION_FIGURES}
                    shown = ", ".join(f"{key.removeprefix('valid_')}={value:.4f}" for key, value in figures.items())
                    self._event(job, f"Step {event['step']}/{tracker.total_steps}: validation {shown}",
                                kind="metrics", data={"step": event["step"], "total_steps": tracker.total_steps,
                                                      **figures})
                elif kind == "best":
                    shown = ", ".join(f"{key.removeprefix('eval_')}={event[key]:.4f}" for key in VALIDATION_FIGURES
                                      if key in event)
                    self._event(job, f"Kept the checkpoint of step {event['step']}, the best on validation ({shown})",
                                data={"step": event["step"]})
                elif kind == "saved":
                    where = ("the validation file" if job.spec.validation_file
                             else f"the {job.spec.validation_rows} held-out rows" if job.spec.validation_rows else "")
                    self._event(job, "Adapter saved" + (f", measuring it on {where}" if where else ""))
                elif kind == "metrics":
                    tracker.final = event["metrics"]
                    self._event(job, f"Validation metrics: {_summary(event['metrics'])}", kind="metrics",
                                data={"metrics": event["metrics"]})
            self._save(job)

    def _install(self, job: Job, engine: EngineAPI, output: Path, tracker: _ProgressTracker) -> None:
        """The registry's checked, atomic add; then the loss curve and the plot become result files."""
        uploads = [(name, (output / name).open("rb")) for name in (CONFIG_FILE, WEIGHTS_FILE, METADATA_FILE)]
        try:
            limits = ArchiveLimits(self.settings.max_archive_members, self.settings.max_uncompressed_bytes)
            record, _ = self.registry.add(job.adapter_name, uploads, engine.check_adapter, limits)
        except LoraswapError as exc:
            self._finish(job, "failed", error={"code": "adapter_invalid", "param": None, "message": str(exc)})
            return
        finally:
            for _, handle in uploads:
                handle.close()
        metrics = self.files.add("step_metrics.csv", "fine-tune-results", tracker.metrics_csv(), ".csv")
        job.result_files = [metrics.id]
        if (output / PLOT_FILE).is_file():
            plot = self.files.add(PLOT_FILE, "fine-tune-results", (output / PLOT_FILE).read_bytes(), ".png")
            job.result_files.append(plot.id)
        if tracker.final is not None:
            final = self.files.add(VALIDATION_METRICS_FILE, "fine-tune-results", metrics_csv(tracker.final), ".csv")
            job.result_files.append(final.id)
        job.fine_tuned_model = record.name
        self._event(job, f"New fine-tuned model created: {record.name} (sha256 {record.sha256[:12]})")
        self._finish(job, "succeeded")

    # ---- records (callers hold self._lock, except at start-up) ----------------------------------------------

    def _folder(self, job: Job) -> Path:
        return self.jobs_root / job.id

    def _save(self, job: Job) -> None:
        self._folder(job).mkdir(parents=True, exist_ok=True)
        _write_atomically(self._folder(job) / "job.json", json.dumps(asdict(job)).encode())

    def _event(self, job: Job, message: str, kind: str = "message", data: dict | None = None,
               level: str = "info") -> None:
        event = {"object": "fine_tuning.job.event", "id": "ftevent-" + uuid.uuid4().hex[:24], "created_at": _now(),
                 "level": level, "message": message, "data": data or {}, "type": kind}
        with (self._folder(job) / "events.jsonl").open("a") as out:
            out.write(json.dumps(event) + "\n")

    def _finish(self, job: Job, status: str, error: dict | None = None) -> None:
        job.status, job.error, job.finished_at, job.trainer_pid = status, error, _now(), None
        self._save(job)
        if status == "succeeded":
            self._event(job, "The job has successfully completed")
        elif status == "cancelled":
            self._event(job, "The job was cancelled; nothing was installed")
        else:
            self._event(job, f"The job failed: {error['message'] if error else ''}", level="error")
        log.info("fine-tuning job %s %s%s", job.id, status, f": {error['message']}" if error else "")


class _ProgressTracker:
    """Reads the trainer's progress file as it grows and keeps the per-step losses."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.total_steps: int | None = None
        self.rows: dict[int, dict[str, float]] = {}  # step -> train_loss / valid_loss, valid_accuracy, ...
        self.final: dict | None = None  # the adapter's metrics on the validation rows

    def read(self) -> list[dict]:
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next read
        self.offset += len(complete)
        events = [json.loads(line) for line in complete.decode().splitlines() if line.strip()]
        for event in events:
            if event["event"] == "start":
                self.total_steps = event["total_steps"]
            elif event["event"] == "step":
                self.rows.setdefault(event["step"], {})["train_loss"] = event["loss"]
            elif event["event"] == "eval":
                self.rows.setdefault(event["step"], {}).update(
                    {f"valid_{key.removeprefix('eval_')}": event[key] for key in VALIDATION_FIGURES if key in event})
        return events

    def metrics_csv(self) -> bytes:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        columns = ["train_loss", *(f"valid_{key.removeprefix('eval_')}" for key in VALIDATION_FIGURES)]
        writer.writerow(["step", *columns])
        for step in sorted(self.rows):
            row = self.rows[step]
            writer.writerow([step, *(f"{row[k]:.6f}" if k in row else "" for k in columns)])
        return out.getvalue().encode()


def metrics_csv(metrics: dict) -> bytes:
    """train-adapter's final metrics as `metric,value` rows: accuracy, macro_f1, per_class.<label>.f1, ...,
    confusion.<gold>.<predicted> (a classifier's confusion matrix), rows."""
    flat: list[tuple[str, object]] = []

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict) and "rows_gold_columns_predicted" in value:
            for gold, counts in zip(value["labels"], value["rows_gold_columns_predicted"]):
                flat.extend((f"{prefix.replace('confusion_matrix', 'confusion')}{gold}.{predicted}", n)
                            for predicted, n in zip(value["labels"], counts))
        elif isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}{key}.", inner)
        else:
            flat.append((prefix.rstrip("."), value))

    walk("", metrics)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["metric", "value"])
    writer.writerows((key, f"{value:.6f}" if isinstance(value, float) else value) for key, value in flat)
    return out.getvalue().encode()


def _summary(metrics: dict) -> str:
    """The headline figures of train-adapter's metrics, and a classifier's confusion matrix."""
    shown = ", ".join(f"{key}={metrics[key]:.4f}" for key in SUMMARY_KEYS if isinstance(metrics.get(key), float))
    matrix = metrics.get("confusion_matrix")
    if matrix:
        rows = "; ".join(f"{gold}: " + " ".join(str(n) for n in counts)
                         for gold, counts in zip(matrix["labels"], matrix["rows_gold_columns_predicted"]))
        shown += f"; confusion matrix (rows gold, columns predicted {' '.join(matrix['labels'])}): {rows}"
    return f"{shown} on {metrics.get('rows')} rows"


def _kill(process: subprocess.Popen) -> None:
    """End a trainer and anything it started (it leads its own process group)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def _last_words(log_path: Path, returncode: int) -> str:
    """The trainer's error: its last log line (train-adapter's one-line error, or a traceback's last line)."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    last = lines[-1] if lines else "no output"
    return f"the trainer exited with code {returncode}: {last.removeprefix('train-adapter: error: ')}"
