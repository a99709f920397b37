"""Building blocks for tests: tiny random Llama bases and PEFT adapters made with PEFT itself."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from server.adapter_format import METADATA_FILE


def make_tiny_base(folder: Path, tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A random Llama with the real tokenizer's vocab: loads in milliseconds, behaves like the real thing."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_adapter(
    base: Path,
    out: Path,
    task: str = "CAUSAL_LM",
    r: int = 4,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    labels: list[str] | None = None,
    seed: int = 1,
    alpha: int | None = None,
    write_labels: bool = True,
) -> Path:
    """A PEFT adapter saved by plain PEFT, with random (non-zero) A and B so it really changes the output."""
    torch.manual_seed(seed)
    if task == "SEQ_CLS":
        model = LlamaForSequenceClassification.from_pretrained(base, num_labels=len(labels), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        task_type=task, r=r, lora_alpha=alpha or 2 * r, target_modules=list(targets), init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    if task == "SEQ_CLS":
        head = peft_model.base_model.model.score.modules_to_save["default"]
        torch.nn.init.normal_(head.weight, std=0.5)
    peft_model.save_pretrained(out)
    if labels and write_labels:
        (out / METADATA_FILE).write_text(json.dumps({"task": "classification", "labels": labels}))
    return out


def peft_reference_probs(base: Path, adapter: Path, tokenizer, texts: list[str], n_labels: int) -> torch.Tensor:
    model = LlamaForSequenceClassification.from_pretrained(base, num_labels=n_labels, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return peft_model(**batch).logits.float().softmax(-1)


def peft_reference_greedy(base: Path, adapter: Path | None, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=model.config.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    eos = model.config.eos_token_id
    return new[: new.index(eos)] if eos in new else new
