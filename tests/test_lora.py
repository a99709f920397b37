"""MultiLoraLinear on a toy Linear, driven as the engine drives it (`with context.rows(slots, device): layer(x)`),
against a float64 reference: y = x W^T + b + (x A^T B^T) * scale for each row's slot."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from server.lora import LoraContext, MultiLoraLinear
from server.slots import BASE_SLOT
from tests.conftest import TEST_DEVICE

IN_FEATURES, OUT_FEATURES = 24, 40
ADAPTER_SLOTS = (1, 2, 3)
TOKENS = 5
SCALES = {1: 0.5, 2: 2.0, 3: 1.5}  # none is 1: a scale applied twice or not at all shows

RANK_CASES = {"rank 1": (1, 1, 1), "rank 4": (4, 4, 4), "rank 16": (16, 16, 16), "mixed ranks": (1, 16, 4)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# The most two computations of one output may differ by, as a share of its terms' size (`Expected.magnitude`: the
# usual bound for a rounded sum of products).
ERROR_PER_MAGNITUDE = {
    # float32: a sum of n rounded products errs by at most n * 2^-24 of its terms' size; n <= 24 + 16 gives 2.4e-6
    torch.float32: 1e-5,
    # bfloat16 keeps 8 significant bits (unit roundoff 2^-8). The layer rounds its base product and its LoRA delta
    # to bf16 (together at most 2^-8 of the terms' size) and then their sum (2^-8 more); merged, it rounds the weight
    # and then the product: the same 2 * 2^-8. The LoRA path itself runs in float32. Two such computations, or one
    # and the rounded reference (2^-8), differ by at most 4 * 2^-8; second-order terms and the float32 error stay
    # below 0.1 * 2^-8. Measured on the CPU: at most 1.4 * 2^-8. A missing, misrouted or misscaled delta (of the
    # order of the output) misses this by far.
    torch.bfloat16: 4.1 * 2**-8,
}


@dataclass
class LoraPair:
    A: torch.Tensor  # [rank, in], float32 as adapters are read
    B: torch.Tensor  # [out, rank]
    scale: float


@dataclass
class Expected:
    value: torch.Tensor  # float64
    magnitude: torch.Tensor  # |x| |W|^T + |b| + |x| |A|^T |B|^T |scale|, elementwise


@dataclass
class ToyLayer:
    layer: MultiLoraLinear
    context: LoraContext
    pairs: dict[int, LoraPair]  # what each adapter slot holds

    def forward(self, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
        with self.context.rows(slots, TEST_DEVICE):
            return self.layer(x)

    def fill(self, slot: int, pair: LoraPair) -> None:
        self.layer.set_slot(slot, pair.A.to(TEST_DEVICE), pair.B.to(TEST_DEVICE), pair.scale)
        self.pairs[slot] = pair

    def expected(self, x: torch.Tensor, slot: int) -> Expected:
        """Every row of x on `slot` (BASE_SLOT: no adapter), in float64 from the current base weight."""
        x64 = x.cpu().double()
        weight, bias = self.layer.base.weight.cpu().double(), self.layer.base.bias.cpu().double()
        value = x64 @ weight.T + bias
        magnitude = x64.abs() @ weight.abs().T + bias.abs()
        if slot != BASE_SLOT:
            pair = self.pairs[slot]
            A, B = pair.A.double(), pair.B.double()
            value = value + (x64 @ A.T @ B.T) * pair.scale
            magnitude = magnitude + (x64.abs() @ A.abs().T @ B.abs().T) * abs(pair.scale)
        return Expected(value, magnitude)

    def expected_rows(self, x: torch.Tensor, slots: list[int]) -> Expected:
        """Row i of x on slots[i]."""
        rows = [self.expected(x[i : i + 1], slot) for i, slot in enumerate(slots)]
        return Expected(torch.cat([e.value for e in rows]), torch.cat([e.magnitude for e in rows]))

    def assert_matches(self, actual: torch.Tensor, expected: Expected) -> None:
        """The layer's output against the float64 reference cast to the layer's dtype."""
        assert actual.dtype == self.layer.weight.dtype
        assert_near(actual, expected.value.to(actual.dtype), expected.magnitude)


def random_pair(rank: int, scale: float, generator: torch.Generator) -> LoraPair:
    """Sized so that the delta is of the order of the base output (both about unit variance for unit inputs)."""
    A = torch.randn(rank, IN_FEATURES, generator=generator) / IN_FEATURES**0.5
    B = torch.randn(OUT_FEATURES, rank, generator=generator) / rank**0.5
    return LoraPair(A, B, scale)


def make_toy(ranks: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> ToyLayer:
    """A frozen 24 -> 40 Linear with bias, wrapped; adapter slots 1, 2, ... filled in order with pairs of these ranks."""
    generator = torch.Generator().manual_seed(seed)
    base = nn.Linear(IN_FEATURES, OUT_FEATURES)
    with torch.no_grad():
        base.weight.copy_(torch.randn(OUT_FEATURES, IN_FEATURES, generator=generator) / IN_FEATURES**0.5)
        base.bias.copy_(torch.randn(OUT_FEATURES, generator=generator) / 2)
    base = base.to(TEST_DEVICE, dtype).requires_grad_(False)
    context = LoraContext()
    toy = ToyLayer(MultiLoraLinear(base, context, n_slots=1 + len(ADAPTER_SLOTS)), context, {})
    for slot, rank in zip(ADAPTER_SLOTS, ranks):
        toy.fill(slot, random_pair(rank, SCALES[slot], generator))
    return toy


def make_input(rows: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    """[rows, tokens, in], as the engine's forwards see it."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, TOKENS, IN_FEATURES, generator=generator).to(TEST_DEVICE, dtype)


def assert_near(actual: torch.Tensor, target: torch.Tensor, magnitude: torch.Tensor) -> None:
    """Elementwise |actual - target| within the rounding budget of actual's dtype (ERROR_PER_MAGNITUDE)."""
    assert actual.shape == target.shape
    error = (actual.cpu().double() - target.cpu().double()).abs()
    allowed = ERROR_PER_MAGNITUDE[actual.dtype] * magnitude
    worst = int((error - allowed).argmax())
    assert bool((error <= allowed).all()), (
        f"off by {error.flatten()[worst]:.3g} where {allowed.flatten()[worst]:.3g} is allowed "
        f"(largest error {error.max():.3g})"
    )


each_rank_case = pytest.mark.parametrize("ranks", list(RANK_CASES.values()), ids=list(RANK_CASES))
each_dtype = pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))


@each_rank_case
@each_dtype
def test_uniform_rows_use_their_slots_pair(ranks: tuple[int, ...], dtype: torch.dtype) -> None:
    toy, x = make_toy(ranks, dtype), make_input(3, dtype)
    for slot in ADAPTER_SLOTS:
        toy.assert_matches(toy.forward(x, [slot] * 3), toy.expected(x, slot))


@each_rank_case
@each_dtype
def test_base_rows_equal_the_plain_linear_exactly(ranks: tuple[int, ...], dtype: torch.dtype) -> None:
    toy, x = make_toy(ranks, dtype), make_input(4, dtype)
    plain = toy.layer.base(x)
    assert torch.equal(toy.forward(x, [BASE_SLOT] * 4), plain)
    mixed = toy.forward(x, [BASE_SLOT, 1, BASE_SLOT, 2])
    assert torch.equal(mixed[[0, 2]], plain[[0, 2]])  # their gathered pair is all zeros: adds exactly 0


@each_rank_case
@each_dtype
def test_a_mixed_batch_equals_each_row_run_alone(ranks: tuple[int, ...], dtype: torch.dtype) -> None:
    toy = make_toy(ranks, dtype)
    slots = [2, BASE_SLOT, 1, 3, 1, BASE_SLOT]
    x = make_input(len(slots), dtype)
    mixed = toy.forward(x, slots)
    expected = toy.expected_rows(x, slots)
    toy.assert_matches(mixed, expected)
    for row, slot in enumerate(slots):
        alone = toy.forward(x[row : row + 1], [slot])
        assert_near(mixed[row : row + 1], alone, expected.magnitude[row : row + 1])


@each_dtype
def test_a_larger_rank_restacks_and_keeps_the_earlier_slots(dtype: torch.dtype) -> None:
    toy, x = make_toy((2,), dtype), make_input(2, dtype)
    expected = toy.expected_rows(x, [1, BASE_SLOT])
    before_mixed, before_uniform = toy.forward(x, [1, BASE_SLOT]), toy.forward(x, [1, 1])

    toy.fill(2, random_pair(16, SCALES[2], torch.Generator().manual_seed(7)))
    assert_near(toy.forward(x, [1, BASE_SLOT]), before_mixed, expected.magnitude)
    assert_near(toy.forward(x, [1, 1]), before_uniform, toy.expected(x, 1).magnitude)
    toy.assert_matches(toy.forward(x, [2, 1]), toy.expected_rows(x, [2, 1]))
    toy.assert_matches(toy.forward(x, [2, 2]), toy.expected(x, 2))


@each_dtype
def test_a_cleared_slots_rows_equal_the_base(dtype: torch.dtype) -> None:
    toy, x = make_toy(RANK_CASES["mixed ranks"], dtype), make_input(3, dtype)
    plain = toy.layer.base(x)
    toy.forward(x, [1, 2, 3])  # gathers the rows' pairs for this assignment

    toy.layer.clear_slot(2)
    mixed = toy.forward(x, [1, 2, 3])  # the same assignment: the gathered pairs must be refreshed
    assert torch.equal(mixed[1], plain[1])
    toy.assert_matches(mixed[[0, 2]], toy.expected_rows(x[[0, 2]], [1, 3]))
    assert torch.equal(toy.forward(x, [2, 2, 2]), plain)

    for slot in (1, 3):
        toy.layer.clear_slot(slot)
    assert torch.equal(toy.forward(x, [1, 2, 3]), plain)


@each_rank_case
@each_dtype
def test_merged_slot_as_base_rows_equals_the_unmerged_output(ranks: tuple[int, ...], dtype: torch.dtype) -> None:
    toy, x = make_toy(ranks, dtype), make_input(3, dtype)
    pristine = toy.layer.weight.clone()
    base_output = toy.forward(x, [BASE_SLOT] * 3)
    for slot in ADAPTER_SLOTS:
        unmerged = toy.forward(x, [slot] * 3)
        magnitude = toy.expected(x, slot).magnitude
        toy.layer.merge(slot)
        assert_near(toy.forward(x, [BASE_SLOT] * 3), unmerged, magnitude)
        toy.layer.unmerge()
        assert torch.equal(toy.layer.weight, pristine)  # a copy back, not a subtraction: no drift, even in bf16
    assert torch.equal(toy.forward(x, [BASE_SLOT] * 3), base_output)


@each_dtype
def test_outside_a_rows_block_the_layer_is_the_base(dtype: torch.dtype) -> None:
    toy, x = make_toy(RANK_CASES["rank 4"], dtype), make_input(3, dtype)
    plain = toy.layer.base(x)
    assert torch.equal(toy.layer(x), plain)
    toy.forward(x, [1, 2, 3])
    assert torch.equal(toy.layer(x), plain)
    with pytest.raises(RuntimeError, match="a failing forward"):
        with toy.context.rows([2, 2, 2], TEST_DEVICE):
            raise RuntimeError("a failing forward")
    assert torch.equal(toy.layer(x), plain)


@pytest.mark.parametrize("assigned, batch", [(3, 2), (2, 3)])
def test_a_row_assignment_of_another_length_raises(assigned: int, batch: int) -> None:
    toy, x = make_toy(RANK_CASES["rank 4"], torch.float32), make_input(batch, torch.float32)
    slots = [1, 2, 3][:assigned]
    with pytest.raises(ValueError, match=f"has {assigned} rows but the input batch has {batch}"):
        toy.forward(x, slots)


@each_dtype
def test_a_changed_assignment_is_regathered(dtype: torch.dtype) -> None:
    toy, x = make_toy(RANK_CASES["mixed ranks"], dtype), make_input(2, dtype)
    for slots in ([1, 2], [2, 1], [2, 1], [1, 2]):
        toy.assert_matches(toy.forward(x, slots), toy.expected_rows(x, slots))


@each_dtype
def test_a_refilled_slot_is_regathered_under_the_same_assignment(dtype: torch.dtype) -> None:
    toy, x = make_toy(RANK_CASES["mixed ranks"], dtype), make_input(2, dtype)
    toy.assert_matches(toy.forward(x, [3, 2]), toy.expected_rows(x, [3, 2]))
    # slot 2 held rank 16, the largest: a rank-4 pair fits without a restack, and its slot's unused rows are zeroed
    toy.fill(2, random_pair(4, SCALES[2], torch.Generator().manual_seed(7)))
    toy.assert_matches(toy.forward(x, [3, 2]), toy.expected_rows(x, [3, 2]))
