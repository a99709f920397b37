"""Hostile and careless requests against a real server on the embedded base, default settings (one torch thread):
each case's answer, time and the server's peak RSS growth while it runs.

    .venv/bin/python benchmarks/attacks.py          # every case (about 10 minutes here)

Cases on a server with default settings: a 16 MB text (over the body bound), a 4 MB text on /predict and on
/v1/chat/completions (under the body bound, over the context), 600,000 characters (under the character bound, over
the context), a lone surrogate; 64 inputs of ~8,000 tokens to a classifier (more work than its 300 s deadline
allows at the measured speed: refused at once); a burst of 300 generations of 128 tokens from clients that wait at
most 60 s (and say so in the request's `timeout`). Then on a second server whose request_timeout_s (2 h) admits the
64 x 8,000-token request: small classifications while it runs, then its client leaves; SIGTERM while another such
request runs (exit within the drain timeout + 20 s). Writes benchmarks/results/attacks-<time>.json.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from transformers import AutoTokenizer

from server.base_model import resolve_base_path
from server.settings import Settings

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
PORT = 8792
SENTENCE = "The committee reviewed the quarterly figures and found them broadly in line with expectations. "


class PeakRss:
    """Samples a process's RSS every 20 ms while in use: the growth over the value at the start."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.start = self.peak = self.process.memory_info().rss

    def __enter__(self) -> PeakRss:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.NoSuchProcess:
                return

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return round((self.peak - self.start) / 2**20, 1)


def start_server(store: Path, log_path: Path, *flags: str) -> subprocess.Popen:
    # default settings but one torch thread: on a 2-core machine that other processes share, two threads thrash
    command = [sys.executable, "-m", "server", "--adapters-dir", str(store), "--port", str(PORT), "--num-threads", "1",
               *flags]
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/health").status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"the server did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def wait_for(condition, seconds: float) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > seconds:
            raise TimeoutError
        time.sleep(0.05)
    return time.monotonic() - started


def raw_post(path: str, body: bytes) -> socket.socket:
    """Send a request on a socket of our own (closing it is the client leaving)."""
    sock = socket.create_connection(("127.0.0.1", PORT))
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                 % (path.encode(), len(body)) + body)
    return sock


def text_of_tokens(tokenizer, tokens: int) -> str:
    per_sentence = len(tokenizer(SENTENCE)["input_ids"])
    text = SENTENCE * (tokens // per_sentence)
    return text


def main() -> None:
    base = resolve_base_path(None, Settings().cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(base)
    work = Path(tempfile.mkdtemp(prefix="loraswap-attacks-"))
    store = work / "store"
    store.mkdir()  # the writable store; sentiment is a shipped adapter
    url = f"http://127.0.0.1:{PORT}"
    results: dict[str, dict] = {"load_average_at_start": os.getloadavg(), "cpu_count": os.cpu_count()}
    http = httpx.Client(base_url=url, timeout=600)
    server: subprocess.Popen | None = None

    def case(name: str, fn) -> None:
        with PeakRss(server.pid) as rss:
            started = time.monotonic()
            outcome = fn()
            seconds = round(time.monotonic() - started, 2)
        results[name] = {"seconds": seconds, "rss_growth_mb": rss.growth_mb, **outcome}
        print(f"{name}: {json.dumps(results[name])}", flush=True)

    def post_json(path: str, body: dict | list) -> dict:
        response = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        return {"status": response.status_code, "detail": str(response.json())[:300]}

    long_text = text_of_tokens(tokenizer, 8000)
    tokens = len(tokenizer(long_text)["input_ids"])
    big = {"inputs": [long_text] * 64}
    big_body = json.dumps(big).encode()

    def interleave() -> dict:
        sock = raw_post("/predict?adapter=sentiment", big_body)
        admitted_s = wait_for(lambda: metric(http, "loraswap_admitted_rows") >= 64, 300)
        time.sleep(2.0)  # it is running: chunks of max_batch_tokens
        small = []
        for text in ("a gorgeous, witty film", "dull and lifeless", "a quiet triumph"):
            started = time.monotonic()
            response = http.post("/predict?adapter=sentiment", json={"inputs": text})
            small.append({"status": response.status_code, "seconds": round(time.monotonic() - started, 2),
                          "label": response.json()["outputs"][0]["label"]})
        sock.close()  # the client leaves
        freed_s = wait_for(lambda: metric(http, "loraswap_admitted_rows") == 0, 120)
        return {"tokens_per_input": tokens, "body_mb": round(len(big_body) / 2**20, 2),
                "admitted_after_s": round(admitted_s, 2), "small_classifications": small,
                "rows_freed_after_client_left_s": round(freed_s, 2)}

    def burst() -> dict:
        client_timeout = 60.0
        body = {"inputs": "Tell me a long story about a lighthouse keeper.", "parameters": {"max_new_tokens": 128},
                "timeout": client_timeout}
        limits = httpx.Limits(max_connections=300)

        def one(client: httpx.Client) -> tuple[str, float, str]:
            started = time.monotonic()
            try:
                response = client.post("/predict", json=body)
            except httpx.TimeoutException:
                return "no answer within the client's timeout", time.monotonic() - started, ""
            return str(response.status_code), time.monotonic() - started, response.headers.get("retry-after", "")

        with httpx.Client(base_url=url, timeout=client_timeout, limits=limits) as client, \
                ThreadPoolExecutor(300) as pool:
            outcomes = list(pool.map(lambda _: one(client), range(300)))
        answered = sorted(s for status, s, _ in outcomes if status == "200")
        refused = sorted(s for status, s, _ in outcomes if status == "429")
        retry_after = sorted(int(r) for status, _, r in outcomes if status == "429")
        return {
            "statuses": dict(Counter(status for status, _, _ in outcomes)),
            "client_timeout_s": client_timeout,
            "answered_slowest_s": round(answered[-1], 1) if answered else None,
            "refused_slowest_s": round(refused[-1], 2) if refused else None,
            "retry_after_s_min_max": [retry_after[0], retry_after[-1]] if retry_after else None,
        }

    def sigterm() -> dict:
        sock = raw_post("/predict?adapter=sentiment", big_body)
        wait_for(lambda: metric(http, "loraswap_admitted_rows") >= 64, 300)
        time.sleep(1.0)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=300)
        exited_s = time.monotonic() - signalled
        sock.settimeout(5)
        try:
            answer = sock.recv(200).split(b"\r\n", 1)[0].decode()
        except OSError as exc:
            answer = repr(exc)
        sock.close()
        return {"exit_code": code, "exited_after_s": round(exited_s, 1),
                "drain_timeout_s": Settings().drain_timeout_s, "big_request_got": answer}

    try:
        server = start_server(store, work / "server-defaults.log")
        case("16 MB text, /predict", lambda: post_json("/predict?adapter=sentiment", {"inputs": "a" * 16_000_000}))
        case("4 MB text, /predict", lambda: post_json("/predict?adapter=sentiment", {"inputs": "ab " * 1_400_000}))
        case("4 MB text, /v1/chat/completions", lambda: post_json("/v1/chat/completions", {
            "model": base.name, "messages": [{"role": "user", "content": "ab " * 1_400_000}]}))
        case("600,000 characters (under the character bound), /predict",
             lambda: post_json("/predict?adapter=sentiment", {"inputs": SENTENCE * 6300}))
        case("lone surrogate, /predict", lambda: post_json("/predict?adapter=sentiment", {"inputs": "x \udfff"}))
        case("64 x 8,000 tokens to a classifier, default 300 s deadline",
             lambda: post_json("/predict?adapter=sentiment", big))
        case("burst of 300 x 128-token generations, clients wait 60 s", burst)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)

        server = start_server(store, work / "server-long-deadline.log", "--request-timeout-s", "7200")
        case("64 x 8,000 tokens to a classifier (2 h deadline), small ones meanwhile, then the client leaves",
             interleave)
        case("SIGTERM during a 64 x 8,000-token request", sigterm)
    finally:
        if server is not None and server.poll() is None:
            server.kill()
        http.close()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"attacks-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
