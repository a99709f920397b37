"""loraswap throughput benchmark: every row a ratio measured side by side in one run, on the embedded base.

    .venv/bin/python benchmarks/run.py            # full run (~10 min on 2 CPU cores)
    .venv/bin/python benchmarks/run.py --quick    # smaller streams, for a smoke check

Prints a table and writes benchmarks/results/<time>.json. Synthetic adapters: random LoRA A/B (r=8 and r=16
mixed) on q_proj/v_proj, written in PEFT's safetensors format into a temporary store.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from server import openmp

openmp.configure()  # as the `loraswap` command does, before torch loads libgomp

import psutil  # noqa: E402 - installed with peft/accelerate; current RSS for the load/evict row
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from server.adapter_format import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE
from server.base_model import choose_dtype
from server.encoding import encode_prompt
from server.engine import Engine
from server.settings import Settings
from server.slots import BASE_SLOT, Slot
from server.types import AdapterLocation, GenerationParams

RESULTS = Path(__file__).parent / "results"
WORDS = ("the film was a quiet triumph of craft and feeling although the second half drags on "
         "free entry win a prize call now to claim your reward before midnight offer ends soon").split()


def write_adapter(folder: Path, engine: Engine, rank: int, task: str, seed: int, n_labels: int = 2) -> Path:
    """A random PEFT-format LoRA adapter on q_proj/v_proj of every layer of the engine's base."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, layer in engine.layers.items():
        if path.endswith(("q_proj", "v_proj")):
            prefix = f"base_model.model.{path}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=gen) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=gen) * 0.02
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": ["q_proj", "v_proj"]}
    if task == "classification":
        tensors["base_model.model.score.weight"] = torch.randn(n_labels, engine.info.hidden_size, generator=gen)
        config["task_type"] = "SEQ_CLS"
        config["modules_to_save"] = ["score"]
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    (folder / METADATA_FILE).write_text(json.dumps({"labels": [f"c{i}" for i in range(n_labels)]}))
    return folder


def popularity(n: int, kind: str, draws: int, rng: random.Random) -> list[int]:
    if kind == "uniform":
        return [rng.randrange(n) for _ in range(draws)]
    weights = [1 / (i + 1) ** 1.1 for i in range(n)]  # Zipf, s = 1.1
    return rng.choices(range(n), weights=weights, k=draws)


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def run_stream(jobs: list, call, concurrency: int) -> float:
    """Closed loop: `concurrency` clients send the jobs; returns wall seconds."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(call, jobs))
    return time.perf_counter() - started


def side_by_side(jobs: list, calls: dict, concurrency: int, rounds: int) -> dict[str, float]:
    """Wall seconds of each call over the same jobs, run in `rounds` chunks whose order alternates (AB, BA, ...),
    so that the drift of a shared machine (±15 % between minutes here) falls on both sides alike."""
    walls = dict.fromkeys(calls, 0.0)
    size = math.ceil(len(jobs) / rounds)
    for round_index, start in enumerate(range(0, len(jobs), size)):
        order = list(calls) if round_index % 2 == 0 else list(calls)[::-1]
        for name in order:
            walls[name] += run_stream(jobs[start : start + size], calls[name], concurrency)
    return walls


def with_slot(engine: Engine, location: AdapterLocation | None, fn):
    if location is None:
        return fn(None)
    slot = engine.acquire(location)
    try:
        return fn(slot)
    finally:
        engine.release(slot)


def matmul_gflops(dtype: torch.dtype, device: str, n: int = 1024, repeat: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(repeat):
        a @ b
    sync()
    return 2 * n**3 * repeat / (time.perf_counter() - started) / 1e9


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller streams (smoke check)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--base-model", type=Path, default=None, help="a local model folder instead of the embedded base")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--cycles", type=int, default=None, help="load/evict cycles (default 10000, quick 500)")
    args = parser.parse_args()
    quick = args.quick
    cycles = args.cycles or (500 if quick else 10_000)
    rng = random.Random(1234)
    torch.manual_seed(0)
    results: dict = {"quick": quick, "threads": torch.get_num_threads()}
    rows: list[tuple[str, str, float | None, str]] = []

    store = Path(tempfile.mkdtemp(prefix="loraswap-bench-"))
    settings = Settings(base_model=args.base_model, device=args.device, dtype=choose_dtype(args.dtype, args.device),
                        adapters_dir=store, max_loaded_adapters=128, max_batch_size=16, max_wait_ms=5.0,
                        auto_merge=False)
    results["dtype"] = settings.dtype
    engine = Engine.from_settings(settings)
    results["base"] = engine.info.name
    n_cls, n_gen = 100, 20
    cls_locs = [AdapterLocation(f"cls{i}", 1, write_adapter(store / f"cls{i}", engine, (8, 16)[i % 2],
                                                            "classification", i)) for i in range(n_cls)]
    gen_locs = [AdapterLocation(f"gen{i}", 1, write_adapter(store / f"gen{i}", engine, (8, 16)[i % 2],
                                                            "generation", 1000 + i)) for i in range(n_gen)]
    for loc in cls_locs + gen_locs:
        with_slot(engine, loc, lambda slot: None)  # warm: everything loaded before the streams

    # ---- ceiling: raw matmul speed and the base's achieved rate -----------------------------------------------
    dtype = torch.bfloat16 if settings.dtype == "bfloat16" else torch.float32
    results["matmul_gflops"] = matmul_gflops(dtype, args.device)
    head_slot = with_slot(engine, cls_locs[0], lambda slot: slot)
    base_slot = Slot(BASE_SLOT, AdapterLocation("base", 0, store), head_slot.adapter)  # the base, with a head
    probe = [text(rng, 48)] * 8
    n_tokens = sum(len(r) for r in engine.encode_for_classification(probe))
    engine.classify(probe, base_slot)
    started = time.perf_counter()
    for _ in range(3):
        engine.classify(probe, base_slot)
    elapsed = (time.perf_counter() - started) / 3
    body = engine.runner.body
    body_params = sum(p.numel() for p in body.parameters()) - body.embed_tokens.weight.numel()
    results["base_forward_gflops"] = 2 * body_params * n_tokens / elapsed / 1e9

    # ---- classification stream, 100 adapters -----------------------------------------------------------------
    n_requests = 96 if quick else 400
    texts = [text(rng, rng.randint(8, 40)) for _ in range(n_requests)]
    for kind in ("uniform", "zipf"):
        picks = popularity(n_cls, kind, n_requests, rng)
        jobs = list(zip(texts, picks))
        walls = side_by_side(jobs, {
            "base": lambda j: engine.classify([j[0]], base_slot),
            "ours": lambda j: with_slot(engine, cls_locs[j[1]], lambda s: engine.classify([j[0]], s)),
        }, concurrency=32, rounds=4 if quick else 8)
        base_wall, ours_wall = walls["base"], walls["ours"]
        ratio = base_wall / ours_wall
        results[f"classification_{kind}"] = {"requests": n_requests, "adapter_rps": n_requests / ours_wall,
                                             "base_rps": n_requests / base_wall, "ratio": ratio}
        rows.append((f"classification stream, {n_cls} adapters ({kind})", "throughput / base-only", ratio, ">= 0.90"))

    # ---- generation stream, 20 adapters, 32 new tokens ---------------------------------------------------------
    # long enough that the ramp-up of a closed loop (a first batch of the few clients already there) is amortized
    n_gen_requests = 16 if quick else 96
    params = GenerationParams(max_new_tokens=32)
    prompts = [text(rng, rng.randint(6, 24)) for _ in range(n_gen_requests)]
    picks = popularity(n_gen, "zipf", n_gen_requests, rng)
    jobs = list(zip(prompts, picks))
    tokens = lambda outs: sum(r.tokens for out in outs for r in out)  # noqa: E731
    base_outs, ours_outs = [], []
    walls = side_by_side(jobs, {
        "base": lambda j: base_outs.append(engine.generate([j[0]], None, params)),
        "ours": lambda j: ours_outs.append(
            with_slot(engine, gen_locs[j[1]], lambda s: engine.generate([j[0]], s, params))
        ),
    }, concurrency=16, rounds=1 if quick else 2)
    base_wall, ours_wall = walls["base"], walls["ours"]
    base_tps, ours_tps = tokens(base_outs) / base_wall, tokens(ours_outs) / ours_wall
    rows.append((f"generation stream (32 new tokens), {n_gen} adapters", "tokens/s / base-only tokens/s",
                 ours_tps / base_tps, ">= 0.80"))

    naive_tps, peft_mixed_tps = peft_baselines(settings, gen_locs, jobs, params, naive_requests=32)
    rows.append(("same generation stream", "ours / naive PEFT set_adapter server", ours_tps / naive_tps, ">= 3x"))
    rows.append(("same generation stream", "ours / PEFT mixed batch (adapter_names)", ours_tps / peft_mixed_tps,
                 "(reference)"))
    results["generation"] = {"requests": n_gen_requests, "ours_tps": ours_tps, "base_tps": base_tps,
                             "naive_peft_tps": naive_tps, "peft_mixed_batch_tps": peft_mixed_tps}

    # ---- continuous batching against static batching (the same engine, its scheduling switched) -----------------
    results["continuous"] = continuous_vs_static(engine, cls_locs, gen_locs, rng, quick, rows)

    # ---- one hot adapter merged: latency against the base ------------------------------------------------------
    hot = engine.acquire(cls_locs[1])
    one = [text(rng, 48)]

    def latencies(slot: Slot, repeat: int = 5) -> list[float]:
        engine.classify(one, slot)  # untimed: the first call after a merge or unmerge meets freshly freed memory
        samples = []
        for _ in range(repeat):
            started = time.perf_counter()
            engine.classify(one, slot)
            samples.append(time.perf_counter() - started)
        return samples

    merged_lat, base_lat, base_again_lat = [], [], []

    def merged_samples() -> None:
        engine.merge(hot)  # merging and unmerging are not timed
        merged_lat.extend(latencies(hot))
        engine.unmerge()

    groups = [merged_samples, lambda: base_lat.extend(latencies(base_slot)),
              lambda: base_again_lat.extend(latencies(base_slot))]
    for round_index in range(4 if quick else 24):  # finely interleaved, order reversed every other round (drift)
        for group in groups if round_index % 2 == 0 else groups[::-1]:
            group()
    engine.release(hot)
    merged_ratio = statistics.median(merged_lat) / statistics.median(base_lat)
    rows.append(("one hot adapter, merged", "latency / base latency", merged_ratio, "<= 1.02"))
    # the same measurement of the base against itself: how far apart two identical forwards land here
    noise_ratio = statistics.median(base_again_lat) / statistics.median(base_lat)
    rows.append(("the base against itself (noise floor)", "latency / base latency", noise_ratio, "(reference)"))
    results["merged"] = {"merged_ms": statistics.median(merged_lat) * 1000,
                         "base_ms": statistics.median(base_lat) * 1000,
                         "base_again_ms": statistics.median(base_again_lat) * 1000}

    # ---- cold load r=8 -------------------------------------------------------------------------------------------
    cold_store = store / "cold"
    cold = [AdapterLocation(f"cold{i}", 1, write_adapter(cold_store / f"cold{i}", engine, 8, "generation", 5000 + i))
            for i in range(20)]
    load_ms = []
    for loc in cold:
        started = time.perf_counter()
        with_slot(engine, loc, lambda slot: None)
        load_ms.append((time.perf_counter() - started) * 1000)
        engine.unload(loc.name)
    rows.append(("adapter cold load (disk -> servable), r=8", "ms (median of 20)", statistics.median(load_ms),
                 "<= 50 ms"))
    results["cold_load_ms"] = load_ms

    # ---- upload -> first answer, through the HTTP app (in process) ---------------------------------------------
    upload_ms = upload_to_first_answer(settings, engine, store, 5 if quick else 10)
    rows.append(("upload -> first answer", "ms (median)", statistics.median(upload_ms), "<= 1,000 ms"))
    results["upload_to_answer_ms"] = upload_ms

    # ---- p50/p99 at a fixed offered load (open loop, Poisson arrivals) ----------------------------------------
    rate = 0.7 * results["classification_zipf"]["adapter_rps"]
    duration = 5.0 if quick else 15.0
    open_latencies = open_loop(engine, cls_locs, rate, duration, rng)
    results["open_loop"] = {"offered_rps": rate, "requests": len(open_latencies),
                            "p50_ms": pct(open_latencies, 0.5) * 1000, "p99_ms": pct(open_latencies, 0.99) * 1000}
    engine.close()

    # ---- 10,000 load/evict cycles --------------------------------------------------------------------------------
    rss_ratio = load_evict_rss(settings, cold, cycles)
    rows.append((f"{cycles:,} load/evict cycles", "RSS after / RSS before", rss_ratio, "<= 1.05"))
    results["load_evict"] = {"cycles": cycles, "rss_ratio": rss_ratio}

    results["rows"] = [{"row": r, "measured": m, "value": v, "bar": b} for r, m, v, b in rows]
    print_table(results, rows)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / time.strftime("%Y%m%d-%H%M%S.json")
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten {out}")


def peft_baselines(
    settings: Settings, locations, jobs, params: GenerationParams, naive_requests: int
) -> tuple[float, float]:
    """Tokens/s of two PEFT servers on the same stream, every adapter loaded in one PeftModel:
    naive (`set_adapter` + generate per request, one at a time, on the stream's first `naive_requests`: its rate
    does not depend on how many) and PEFT's own mixed batch (`adapter_names`, batches of 16)."""
    from peft import PeftModel

    from server.base_model import load_base

    model, tokenizer, _ = load_base(settings.base_model, settings.cache_dir, settings.dtype, settings.device)
    model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: (args[0].contiguous(),))
    peft_model = PeftModel.from_pretrained(model, locations[0].folder, adapter_name=locations[0].name)
    for loc in locations[1:]:
        peft_model.load_adapter(loc.folder, adapter_name=loc.name)
    peft_model.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def generate(prompts: list[str], names: list[str] | None) -> int:
        rows = [encode_prompt(tokenizer, p, params.chat) for p in prompts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)  # left padding
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
        extra = {} if names is None else {"adapter_names": names}
        out = peft_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=pad,
                                  max_new_tokens=params.max_new_tokens, **extra)
        new = out[:, width:].tolist()
        return sum(row.index(eos) if eos in row else len(row) for row in new)

    with torch.no_grad():
        produced, started = 0, time.perf_counter()
        for prompt, pick in jobs[:naive_requests]:
            peft_model.set_adapter(locations[pick].name)
            produced += generate([prompt], None)
        naive = produced / (time.perf_counter() - started)
        produced, started = 0, time.perf_counter()
        for i in range(0, len(jobs), 16):
            chunk = jobs[i : i + 16]
            produced += generate([p for p, _ in chunk], [locations[pick].name for _, pick in chunk])
        mixed = produced / (time.perf_counter() - started)
    return naive, mixed


def continuous_vs_static(engine: Engine, cls_locs, gen_locs, rng: random.Random, quick: bool, rows: list) -> dict:
    """The step loop against static batching, on one engine whose `runner.continuous` is switched between runs.

    1. Head-of-line blocking: four long generations run; 1.5 s later one classification and one 8-token
       generation arrive. Their latency against the same request on an idle engine.
    2. An open loop of mixed traffic: 20 generation adapters (max_new_tokens 8/32/128/256) and 30 %
       classification (20 adapters), Poisson arrivals at 70 % of the continuous engine's measured capacity, the
       same arrival schedule for both: generated tokens/s, p99 classification latency and p50 time to first token,
       each against the same request alone. Beside it, each engine's capacity: requests/s of a closed loop of 16
       clients on the same traffic.
    Generations ignore EOS so that every request generates exactly its max_new_tokens.
    """
    gen_slots = [engine.acquire(loc) for loc in gen_locs]
    cls_slots = [engine.acquire(loc) for loc in cls_locs[:20]]
    long_tokens, lengths = (64, (8, 16, 32, 64)) if quick else (256, (8, 32, 128, 256))
    out: dict = {}
    try:
        def classify(prompt: str, slot: Slot) -> float:
            started = time.perf_counter()
            engine.classify([prompt], slot)
            return time.perf_counter() - started

        def first_token(prompt: str, slot: Slot, max_new_tokens: int) -> tuple[float, float, int]:
            """Seconds to the first streamed text, to the end, and tokens generated."""
            started = time.perf_counter()
            first = None
            for item in engine.generate_stream(prompt, slot, GenerationParams(max_new_tokens, ignore_eos=True)):
                first = first or time.perf_counter() - started
            return first, time.perf_counter() - started, item.tokens

        # ---- 1. one classification and one short generation behind four long generations ----
        cls_text, short_prompt = text(rng, 24), text(rng, 12)
        alone_cls = statistics.median(classify(cls_text, cls_slots[0]) for _ in range(3))
        alone_short = statistics.median(first_token(short_prompt, gen_slots[1], 8)[1] for _ in range(3))
        behind = {}
        for mode in ("static", "continuous"):
            engine.runner.continuous = mode == "continuous"
            with ThreadPoolExecutor(max_workers=6) as pool:
                longs = [pool.submit(first_token, text(rng, 16), gen_slots[2 + i], long_tokens) for i in range(4)]
                time.sleep(1.5)
                cls_future = pool.submit(classify, cls_text, cls_slots[0])
                short_future = pool.submit(lambda: first_token(short_prompt, gen_slots[1], 8)[1])
                behind[mode] = {"classification_s": cls_future.result(), "short_generation_s": short_future.result(),
                                "long_generation_s": [f.result()[1] for f in longs]}
        out["behind_long"] = {"alone_classification_s": alone_cls, "alone_short_generation_s": alone_short, **behind}
        for key, alone, label in (("classification_s", alone_cls, "classification"),
                                  ("short_generation_s", alone_short, "8-token generation")):
            rows.append((f"{label} while 4 x {long_tokens}-token generations run", "latency / alone",
                         behind["continuous"][key] / alone, "<= 3"))
            rows.append(("same, static batching (the old engine)", "latency / alone", behind["static"][key] / alone,
                         "(reference)"))

        # ---- 2. open loop of mixed traffic ----
        def workload(n: int) -> list[tuple]:
            draws = []
            for _ in range(n):
                if rng.random() < 0.3:
                    draws.append(("classification", text(rng, rng.randint(8, 40)), rng.randrange(20), 0))
                else:
                    draws.append(("generation", text(rng, rng.randint(6, 24)),
                                  popularity(20, "zipf", 1, rng)[0], rng.choice(lengths)))
            return draws

        def serve(request: tuple) -> tuple[str, float, float, int]:
            """(kind, latency or time to first token, end-to-end seconds, tokens) of one request."""
            kind, prompt, pick, max_new = request
            if kind == "classification":
                latency = classify(prompt, cls_slots[pick])
                return kind, latency, latency, 0
            return (kind, *first_token(prompt, gen_slots[pick], max_new))

        capacity_requests = workload(16 if quick else 48)
        engine.runner.continuous = False  # the same closed loop on the static engine: the gain at saturation
        static_capacity = len(capacity_requests) / run_stream(capacity_requests, serve, concurrency=16)
        engine.runner.continuous = True
        capacity = len(capacity_requests) / run_stream(capacity_requests, serve, concurrency=16)
        alone_ttft = statistics.median(first_token(p, gen_slots[0], 1)[0] for _, p, _, _ in capacity_requests[:5])
        requests = workload(24 if quick else 90)
        rate = 0.7 * capacity
        arrivals, due = [], 0.0
        for _ in requests:
            due += rng.expovariate(rate)
            arrivals.append(due)
        open_loop_runs = {}
        for mode in ("continuous", "static"):
            engine.runner.continuous = mode == "continuous"
            served: list[tuple] = []
            lock = threading.Lock()

            def arrive(request: tuple) -> None:
                result = serve(request)
                with lock:
                    served.append(result)

            with ThreadPoolExecutor(max_workers=len(requests)) as pool:
                start = time.perf_counter()
                for request, at in zip(requests, arrivals):
                    time.sleep(max(0.0, start + at - time.perf_counter()))
                    pool.submit(arrive, request)
            makespan = time.perf_counter() - start
            cls_lat = [lat for kind, lat, _, _ in served if kind == "classification"]
            ttft = [lat for kind, lat, _, _ in served if kind == "generation"]
            open_loop_runs[mode] = {
                "makespan_s": makespan, "tokens": sum(t for *_, t in served),
                "tokens_per_s": sum(t for *_, t in served) / makespan,
                "classification_p99_s": pct(cls_lat, 0.99), "ttft_p50_s": pct(ttft, 0.5),
            }
        engine.runner.continuous = True
        cont, static = open_loop_runs["continuous"], open_loop_runs["static"]
        out["open_loop"] = {"capacity_rps": capacity, "static_capacity_rps": static_capacity, "offered_rps": rate,
                            "requests": len(requests),
                            "alone_classification_s": alone_cls, "alone_ttft_s": alone_ttft, **open_loop_runs}
        rows.append(("mixed open loop (70 % of capacity)", "tokens/s continuous / static",
                     cont["tokens_per_s"] / static["tokens_per_s"], ">= 1.3"))
        rows.append(("same traffic, closed loop of 16 clients (capacity)", "requests/s continuous / static",
                     capacity / static_capacity, "(reference)"))
        rows.append(("same open loop, continuous", "p99 classification latency / alone",
                     cont["classification_p99_s"] / alone_cls, "<= 3"))
        rows.append(("same open loop, continuous", "p50 time to first token / alone", cont["ttft_p50_s"] / alone_ttft,
                     "<= 2"))
        rows.append(("same open loop, static", "p99 classification latency / alone",
                     static["classification_p99_s"] / alone_cls, "(reference)"))
        rows.append(("same open loop, static", "p50 time to first token / alone", static["ttft_p50_s"] / alone_ttft,
                     "(reference)"))
    finally:
        engine.runner.continuous = True
        for slot in gen_slots + cls_slots:
            engine.release(slot)
    return out


def upload_to_first_answer(settings: Settings, engine: Engine, store: Path, repeat: int) -> list[float]:
    """POST /adapters with the files of a new r=8 classification adapter, then POST /predict with it."""
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from server.api import create_app

    token = "bench-token"
    app = create_app(settings.model_copy(update={"admin_token": SecretStr(token)}), engine=engine)
    source = store / "upload-src"
    timings = []
    with TestClient(app) as client:
        for i in range(repeat):
            write_adapter(source, engine, 8, "classification", 9000 + i)
            files = [("files", (f.name, f.read_bytes())) for f in sorted(source.iterdir())]
            started = time.perf_counter()
            response = client.post("/adapters", data={"name": f"fresh{i}"}, files=files,
                                   headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 201, response.text
            answer = client.post(f"/predict?adapter=fresh{i}", json={"inputs": "is this new?"})
            assert answer.status_code == 200, answer.text
            timings.append((time.perf_counter() - started) * 1000)
    return timings


def open_loop(engine: Engine, locations, rate: float, duration: float, rng: random.Random) -> list[float]:
    latencies: list[float] = []
    lock = threading.Lock()
    picks = popularity(len(locations), "zipf", int(rate * duration) + 1, rng)

    def one(pick: int, prompt: str, due: float) -> None:
        with_slot(engine, locations[pick], lambda s: engine.classify([prompt], s))
        with lock:
            latencies.append(time.perf_counter() - due)

    with ThreadPoolExecutor(max_workers=64) as pool:
        start = time.perf_counter()
        due = start
        for pick in picks:
            due += rng.expovariate(rate)
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, pick, text(rng, rng.randint(8, 40)), due)
    return latencies


def load_evict_rss(settings: Settings, locations, cycles: int) -> float:
    """Load adapters through 8 slots in a loop (every load evicts one); compare RSS after warm-up and at the end."""
    engine = Engine.from_settings(settings.model_copy(update={"max_loaded_adapters": 8}))
    process = psutil.Process()
    try:
        for i in range(len(locations)):
            with_slot(engine, locations[i], lambda slot: None)
        before = process.memory_info().rss
        for i in range(cycles):
            with_slot(engine, locations[i % len(locations)], lambda slot: None)
        after = process.memory_info().rss
    finally:
        engine.close()
    return after / before


def print_table(results: dict, rows) -> None:
    print(f"\nloraswap benchmark — {results['base']}, {results['dtype']}, {results['threads']} threads")
    print(f"matmul ceiling {results['matmul_gflops']:.1f} GFLOP/s; base forward achieves "
          f"{results['base_forward_gflops']:.1f} GFLOP/s "
          f"({100 * results['base_forward_gflops'] / results['matmul_gflops']:.0f} % of the ceiling)")
    width = max(len(r[0]) for r in rows)
    print(f"\n{'row'.ljust(width)} | {'measured':40} | {'value':>9} | bar")
    for row, measured, value, bar in rows:
        print(f"{row.ljust(width)} | {measured:40} | {value:9.3f} | {bar}")
    ol = results["open_loop"]
    print(f"\nopen loop at {ol['offered_rps']:.1f} req/s (70 % of the zipf stream's throughput): "
          f"p50 {ol['p50_ms']:.0f} ms, p99 {ol['p99_ms']:.0f} ms over {ol['requests']} requests")


if __name__ == "__main__":
    main()
