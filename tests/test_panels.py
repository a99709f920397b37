"""The panel kernel (server/panels.py) against torch's F.linear, and the invariance it promises."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from server import panels


def weight_and_bias(out: int, features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(out, features, generator=generator) * 0.05,
            torch.randn(out, generator=generator) * 0.05)


def test_the_kernel_builds_here():
    """CI has a C compiler: the kernel must build, or every other test here would test F.linear against itself."""
    assert panels.pack(torch.zeros(32, 8)) is not None


@pytest.fixture(params=["native", "x86-64-v3"])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel built for this CPU, and for AVX2 only (16-output panels, 6 rows a pass) where this CPU runs it."""
    if request.param != "native":
        if platform.machine() not in ("x86_64", "AMD64") or "avx2" not in Path("/proc/cpuinfo").read_text():
            pytest.skip("not an x86 CPU with AVX2")
        built = panels.build(request.param)
        assert built is not None and built.panel_width() == 16
        monkeypatch.setattr(panels, "kernel", lambda: built)


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("out,features", [(1, 1), (31, 7), (32, 64), (33, 64), (100, 576), (192, 1536)])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 8, 11, 12, 13, 25, 40])
def test_matches_f_linear(out: int, features: int, rows: int):
    weight, bias = weight_and_bias(out, features)
    x = torch.randn(rows, features, generator=torch.Generator().manual_seed(1))
    packed = panels.pack(weight)
    for b in (None, bias):
        got = panels.linear(x, packed, out, b)
        assert got.shape == (rows, out)
        torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, b), rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("kernel")
def test_shapes_strides_and_threads():
    weight, bias = weight_and_bias(70, 48)
    packed = panels.pack(weight)
    x = torch.randn(3, 5, 96)[..., ::2]  # [3, 5, 48], not contiguous
    expected = torch.nn.functional.linear(x, weight, bias)
    torch.testing.assert_close(panels.linear(x, packed, 70, bias), expected, rtol=1e-5, atol=1e-5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = panels.linear(x, packed, 70, bias)
        torch.set_num_threads(1)
        one = panels.linear(x, packed, 70, bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # threads share out whole panels: the same sums


@pytest.mark.usefixtures("kernel")
def test_no_rows_give_no_rows():
    """An empty input (e.g. a forward over no tokens) is an empty output, not a division by zero in the kernel."""
    weight, bias = weight_and_bias(70, 48)
    y = panels.linear(torch.empty(0, 48), panels.pack(weight), 70, bias)
    assert y.shape == (0, 70)


@pytest.mark.usefixtures("kernel")
def test_a_row_does_not_depend_on_its_batch_mates():
    """Each output sums in input order whatever the rows: a row alone and inside any batch gives the same bits."""
    weight, bias = weight_and_bias(96, 576)
    packed = panels.pack(weight)
    batch = torch.randn(17, 576, generator=torch.Generator().manual_seed(2))
    together = panels.linear(batch, packed, 96, bias)
    for i in (0, 5, 11, 12, 16):
        assert torch.equal(panels.linear(batch[i : i + 1], packed, 96, bias)[0], together[i])


def test_where_it_does_not_apply(monkeypatch: pytest.MonkeyPatch):
    assert panels.pack(torch.zeros(32, 8, dtype=torch.bfloat16)) is None
    monkeypatch.setattr(panels, "kernel", lambda: None)  # no compiler: callers keep F.linear
    assert panels.pack(torch.zeros(32, 8)) is None
    with pytest.raises(ValueError, match="features"):
        panels.linear(torch.zeros(2, 9), torch.zeros(1, 8, 32), 32, None)
    with pytest.raises(ValueError, match="33 outputs"):  # more outputs than the panels hold: never read past them
        panels.linear(torch.zeros(2, 8), torch.zeros(1, 8, 32), 33, None)
    with pytest.raises(ValueError, match="bias"):
        panels.linear(torch.zeros(2, 8), torch.zeros(1, 8, 32), 32, torch.zeros(31))


def test_inference_layers_use_the_panels(engine):
    """Every wrapped layer and the LM head of a float32 CPU engine multiply with panels."""
    assert engine.layers and all(layer._panels is not None for layer in engine.layers.values())
    assert isinstance(engine.model.get_output_embeddings(), panels.PanelLinear)
