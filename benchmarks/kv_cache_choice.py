"""Which KV cache the step loop should use: transformers' own continuous batching (paged cache, `generate_batch`)
against padded `generate()` and our step loop (DynamicCache joined and filtered along the batch), on the embedded
base, the same greedy prompts, measured one after the other in one run.

    .venv/bin/python benchmarks/kv_cache_choice.py [--prompts 16] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from transformers import GenerationConfig

from server.engine import Engine
from server.settings import Settings
from server.types import GenerationParams

WORDS = "the film was a quiet triumph of craft and feeling although the second half drags on".split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    rng = random.Random(0)
    engine = Engine.from_settings(Settings(dtype="float32", auto_merge=False, max_batch_size=args.prompts))
    model, tokenizer = engine.model, engine.tokenizer
    params = GenerationParams(max_new_tokens=args.new_tokens)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30))) for _ in range(args.prompts)]
    prompts = engine.encode_for_generation(texts, params)
    config = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    answers: dict[str, list[list[int]]] = {}

    def strip(ids: list[int]) -> list[int]:
        return ids[: ids.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in ids else ids

    width = max(map(len, prompts))  # padded generate(): left padding, one batch
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    runs = {
        "ours": lambda: [r.token_ids for r in engine.generate(prompts, None, params)],  # each prompt a row
        "generate": lambda: [strip(row) for row in model.generate(
            input_ids=ids, attention_mask=mask, generation_config=config)[:, width:].tolist()],
        "generate_batch": lambda: [strip(list(o.generated_tokens)) for o in model.generate_batch(  # paged attention
            inputs=prompts, generation_config=config, progress_bar=False).values()],
    }
    seconds = dict.fromkeys(runs, 0.0)
    with torch.no_grad():
        for run in runs.values():  # untimed: a first call pays one-time costs (allocations, thread pools)
            run()
        for order in (list(runs), list(runs)[::-1]):  # ABC then CBA: the machine's drift falls on all alike
            for name in order:
                started = time.perf_counter()
                answers[name] = runs[name]()
                seconds[name] += time.perf_counter() - started
    engine.close()
    tokens = {name: 2 * sum(map(len, rows)) for name, rows in answers.items()}  # two rounds
    print(f"{args.prompts} prompts x {args.new_tokens} new tokens, greedy, float32, {torch.get_num_threads()} threads")
    for name in answers:
        same = sum(a == b for a, b in zip(answers[name], answers["generate"]))
        print(f"{name:15} {tokens[name] / seconds[name]:7.1f} tokens/s  ({seconds[name]:.1f} s over two rounds; "
              f"{same}/{len(prompts)} answers equal to generate()'s)")
    rate = {name: tokens[name] / seconds[name] for name in runs}
    print(f"ours / generate_batch: {rate['ours'] / rate['generate_batch']:.2f}x; "
          f"ours / generate: {rate['ours'] / rate['generate']:.2f}x")


if __name__ == "__main__":
    main()
