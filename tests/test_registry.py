"""The store (versions, atomic installs, crash recovery) and the memory tier (LRU, pinning, load-once, unload)."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from server.archive import ArchiveLimits
from server.engine import Engine
from server.slots import SlotsBusy
from server.types import AdapterLocation, GenerationParams
from server.errors import AdapterChanged, AdapterExists, AdapterInvalid, AdapterReadOnly
from server.registry import STAGING_DIR, VERSIONS_DIR, Registry
from tests.helpers import engine_with, tree, write_tiny_adapter

LIMITS = ArchiveLimits(max_members=8, max_uncompressed_bytes=1024**2)


def files_of(folder: Path) -> list[tuple[str, io.BytesIO]]:
    return [(p.name, io.BytesIO(p.read_bytes())) for p in sorted(folder.iterdir()) if p.is_file()]


@pytest.fixture
def registry(tmp_path, engine) -> Registry:
    registry = Registry(tmp_path / "store")
    registry.scan(engine.check_adapter)
    return registry


def add(registry: Registry, engine: Engine, name: str, folder: Path, replace: bool = False):
    return registry.add(name, files_of(folder), engine.check_adapter, LIMITS, replace)


# ---- versions on disk --------------------------------------------------------------------------------------------


def test_versions_are_immutable_folders_behind_a_symlink(registry, engine, adapter_store):
    root = registry.root
    first, replaced = add(registry, engine, "x", adapter_store / "gen-a")
    assert replaced is None and first.version == 1
    assert os.readlink(root / "x") == f"{VERSIONS_DIR}/x/1"
    assert first.folder == root / VERSIONS_DIR / "x" / "1"
    second, replaced = add(registry, engine, "x", adapter_store / "gen-b", replace=True)
    assert (second.version, replaced) == (2, first)
    assert os.readlink(root / "x") == f"{VERSIONS_DIR}/x/2"
    assert (first.folder / "adapter_model.safetensors").read_bytes() == (
        adapter_store / "gen-a" / "adapter_model.safetensors").read_bytes()  # v1 untouched, kept as previous
    third, _ = add(registry, engine, "x", adapter_store / "gen-mlp", replace=True)
    assert sorted(p.name for p in (root / VERSIONS_DIR / "x").iterdir()) == ["2", "3"]  # v1 collected
    assert registry.locate("x") == AdapterLocation("x", 3, third.folder, third.sha256)
    assert not any((root / STAGING_DIR).iterdir())


def test_an_existing_name_is_refused_before_unpacking(registry, engine, adapter_store):
    add(registry, engine, "x", adapter_store / "gen-a")
    with pytest.raises(AdapterExists):
        add(registry, engine, "x", adapter_store / "gen-b")
    assert registry.get("x").version == 1


def test_a_failed_check_leaves_nothing(registry, engine, tmp_path):
    broken = write_tiny_adapter(tmp_path / "broken", seed=1, hidden=32)
    with pytest.raises(AdapterInvalid):
        add(registry, engine, "broken", broken)
    assert registry.names() == []
    assert sorted(p.name for p in registry.root.iterdir()) == [STAGING_DIR]
    assert not any((registry.root / STAGING_DIR).iterdir())


def test_the_store_survives_a_restart(registry, engine, adapter_store):
    add(registry, engine, "x", adapter_store / "gen-a")
    add(registry, engine, "x", adapter_store / "gen-b", replace=True)
    add(registry, engine, "y", adapter_store / "sentiment")
    again = Registry(registry.root)
    assert again.scan(engine.check_adapter) == []
    assert [r.as_dict() for r in again.records()] == [r.as_dict() for r in registry.records()]
    assert sorted(p.name for p in (registry.root / VERSIONS_DIR / "x").iterdir()) == ["2"]  # previous collected


def test_a_shipped_folder_becomes_the_previous_version_when_replaced(tmp_path, engine, adapter_store):
    root = tmp_path / "store"
    shutil.copytree(adapter_store / "gen-a", root / "x")
    registry = Registry(root)
    registry.scan(engine.check_adapter)
    shipped = registry.locate("x")
    assert (shipped.version, shipped.folder) == (1, root / "x")
    record, _ = add(registry, engine, "x", adapter_store / "gen-b", replace=True)
    assert record.version == 2 and (root / "x").is_symlink()
    assert (root / VERSIONS_DIR / "x" / "1" / "adapter_config.json").is_file()
    # the old location now leads to other weights: the digest check refuses to load them as version 1
    with pytest.raises(AdapterChanged):
        engine.acquire(shipped)


def test_a_version_deleted_before_it_loaded_is_reported_as_changed(registry, engine, adapter_store):
    add(registry, engine, "x", adapter_store / "gen-a")
    located = registry.locate("x")
    registry.delete("x")
    with pytest.raises(AdapterChanged, match="replaced or deleted while this request waited"):
        engine.acquire(located)


# ---- crash recovery: every state an interrupted install or delete can leave ---------------------------------------


def test_recovery_drops_half_written_uploads(registry, engine, adapter_store):
    add(registry, engine, "x", adapter_store / "gen-a")
    half = registry.root / STAGING_DIR / "upload-123"
    half.mkdir()
    (half / "adapter_config.json").write_text("{")
    again = Registry(registry.root)
    again.scan(engine.check_adapter)
    assert again.names() == ["x"] and not (registry.root / STAGING_DIR).exists()


def test_recovery_points_at_a_version_committed_before_the_link_swap(registry, engine, adapter_store):
    add(registry, engine, "x", adapter_store / "gen-a")
    add(registry, engine, "x", adapter_store / "gen-b", replace=True)
    os.replace(registry.root / "x", registry.root / "link-was-not-swapped")
    os.symlink(f"{VERSIONS_DIR}/x/1", registry.root / "x")
    os.unlink(registry.root / "link-was-not-swapped")
    again = Registry(registry.root)
    again.scan(engine.check_adapter)
    assert again.get("x").version == 2 and os.readlink(registry.root / "x") == f"{VERSIONS_DIR}/x/2"


def test_recovery_restores_a_shipped_folder_moved_before_the_commit(tmp_path, engine, adapter_store):
    """Replacing a shipped adapter moves its folder to .versions first: a crash right after keeps version 1."""
    root = tmp_path / "store"
    (root / VERSIONS_DIR / "x").mkdir(parents=True)
    shutil.copytree(adapter_store / "gen-a", root / VERSIONS_DIR / "x" / "1")
    registry = Registry(root)
    registry.scan(engine.check_adapter)
    assert registry.get("x").version == 1 and os.readlink(root / "x") == f"{VERSIONS_DIR}/x/1"


def test_recovery_finishes_a_delete_cut_short(registry, engine, adapter_store):
    add(registry, engine, "x", adapter_store / "gen-a")
    shutil.rmtree(registry.root / VERSIONS_DIR / "x")  # the delete's commit point, then the crash
    (registry.root / VERSIONS_DIR / "empty").mkdir()  # a new name's folder, created just before a crash
    again = Registry(registry.root)
    again.scan(engine.check_adapter)
    assert again.names() == [] and not (registry.root / "x").is_symlink()
    assert list((registry.root / VERSIONS_DIR).iterdir()) == []


def test_a_broken_folder_is_skipped_at_start(tmp_path, engine, adapter_store):
    root = tmp_path / "store"
    shutil.copytree(adapter_store / "gen-a", root / "good")
    write_tiny_adapter(root / "bad", seed=1, hidden=32)
    registry = Registry(root)
    [skipped] = registry.scan(engine.check_adapter)
    assert skipped.startswith("bad: invalid adapter") and registry.names() == ["good"]


# ---- the shipped layer: read-only adapters of the package under the writable store -------------------------------


@pytest.fixture
def shipped(tmp_path, adapter_store) -> Path:
    """A read-only package folder: one adapter for the tiny base, one trained on another base."""
    root = tmp_path / "package"
    shutil.copytree(adapter_store / "gen-a", root / "mine")
    shutil.copytree(adapter_store / "gen-b", root / "theirs")
    (root / "theirs" / "loraswap.json").write_text(json.dumps({"base_model": {"name": "other", "fingerprint": "0"}}))
    for path in [root, *root.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    yield root
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755)


def test_shipped_adapters_are_served_and_those_of_another_base_are_not_problems(tmp_path, engine, shipped):
    registry = Registry(tmp_path / "store", shipped)
    assert registry.scan(engine.check_adapter) == []
    assert registry.names() == ["mine"] and registry.get("mine").folder == shipped / "mine"
    assert registry.other_base() == {"theirs": "other"} and registry.skipped() == {}


def test_an_upload_shadows_a_shipped_adapter_and_its_delete_brings_it_back(tmp_path, engine, shipped, adapter_store):
    before = tree(shipped)
    registry = Registry(tmp_path / "store", shipped)
    registry.scan(engine.check_adapter)
    with pytest.raises(AdapterReadOnly):
        registry.delete("mine")
    record, replaced = add(registry, engine, "mine", adapter_store / "gen-mlp", replace=True)
    assert (record.version, replaced.folder) == (2, shipped / "mine")
    assert registry.locate("mine").folder == registry.root / VERSIONS_DIR / "mine" / "2"
    registry.scan(engine.check_adapter)  # a restart: the store's version still wins
    assert registry.get("mine").version == 2
    registry.delete("mine")
    assert registry.get("mine").folder == shipped / "mine"
    assert tree(shipped) == before  # the package was never written


# ---- memory tier -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine8(tiny_settings):
    yield from engine_with(tiny_settings, max_loaded_adapters=8)


@pytest.fixture(scope="module")
def thousand(tmp_path_factory, engine8) -> Registry:
    """1,000 registered adapters on disk (tiny: one rank-1 q_proj pair each)."""
    root = tmp_path_factory.mktemp("thousand")
    for i in range(1000):
        write_tiny_adapter(root / f"a{i:04d}", seed=i)
    registry = Registry(root)
    assert registry.scan(engine8.check_adapter) == []
    return registry


@pytest.fixture
def loads(engine8, monkeypatch) -> list[str]:
    """Names passed to the slots' _load, in order (slow enough that concurrent first requests overlap)."""
    seen: list[str] = []
    real = engine8.slots._load

    def counting(location, wait_s):
        seen.append(location.name)
        time.sleep(0.02)
        return real(location, wait_s)

    monkeypatch.setattr(engine8.slots, "_load", counting)
    return seen


def use(engine: Engine, registry: Registry, name: str) -> None:
    engine.release(engine.acquire(registry.locate(name)))


def loaded(engine: Engine) -> list[str]:
    return [location.name for location in engine.loaded()]


def test_a_thousand_adapters_with_eight_in_memory_lru(engine8, thousand, loads):
    assert len(thousand.names()) == 1000
    for location in engine8.loaded():
        engine8.unload(location.name)
    evictions = engine8.evictions
    order = [f"a{i:04d}" for i in range(8)]
    for name in order:
        use(engine8, thousand, name)
    assert loaded(engine8) == order
    use(engine8, thousand, "a0000")  # a hit moves it to the back
    assert loaded(engine8) == order[1:] + ["a0000"]
    use(engine8, thousand, "a0500")  # a miss evicts the least recently used: a0001
    assert loaded(engine8) == order[2:] + ["a0000", "a0500"]
    assert engine8.evictions == evictions + 1
    for i in range(990, 1000):  # a sweep through 10 more: only the 8 most recent stay
        use(engine8, thousand, f"a{i:04d}")
    assert loaded(engine8) == [f"a{i:04d}" for i in range(992, 1000)]
    assert engine8.evictions == evictions + 11
    assert loads == order + ["a0500"] + [f"a{i:04d}" for i in range(990, 1000)]  # hits never load
    assert sorted(s.index for s in engine8.slots._slots.values()) == list(range(1, 9))


def test_every_one_of_a_thousand_loads_its_own_weights(engine8, thousand):
    """All 1,000 cycle through 8 slots; each slot then holds exactly the weights of the adapter it serves."""
    evictions = engine8.evictions
    for name in thousand.names():
        use(engine8, thousand, name)
    assert engine8.evictions - evictions >= 992
    layer = engine8.layers["model.layers.0.self_attn.q_proj"]
    for name in thousand.names()[::97]:
        slot = engine8.acquire(thousand.locate(name))
        try:
            tensors = load_file(str(thousand.locate(name).folder / "adapter_model.safetensors"))
            A, B_scaled_t = layer.pair(slot.index)
            assert torch.equal(A, tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])
            B = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
            assert torch.equal(B_scaled_t.t(), B * 2)
        finally:
            engine8.release(slot)


def test_ten_concurrent_first_requests_load_once(engine8, thousand, loads):
    barrier = threading.Barrier(10)

    def first_request(_):
        barrier.wait()
        return engine8.predict(thousand.locate("a0777"), ["hi"], GenerationParams(max_new_tokens=2))[1][0].token_ids

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(first_request, range(10)))
    assert loads == ["a0777"]
    assert len({tuple(a) for a in answers}) == 1
    assert [s.in_use for s in engine8.slots._slots.values()] == [0] * len(engine8.slots._slots)


def test_a_broken_adapter_never_evicts_a_working_one(engine8, thousand, tmp_path):
    for i in range(8):
        use(engine8, thousand, f"a{i:04d}")
    before, evictions = engine8.loaded(), engine8.evictions
    broken = write_tiny_adapter(tmp_path / "broken", seed=1, hidden=32)
    with pytest.raises(AdapterInvalid):
        engine8.acquire(AdapterLocation("broken", 1, broken))
    assert engine8.loaded() == before and engine8.evictions == evictions


def test_a_load_that_fails_midway_leaves_its_slot_clean(engine8, adapter_store, monkeypatch):
    layer_type = type(next(iter(engine8.layers.values())))
    real_set_slot, calls = layer_type.set_slot, []

    def fails_at_the_third_layer(layer, *args):
        calls.append(layer)
        if len(calls) == 3:
            raise MemoryError("out of memory")
        return real_set_slot(layer, *args)

    location = AdapterLocation("many-modules", 1, adapter_store / "gen-a")
    monkeypatch.setattr(layer_type, "set_slot", fails_at_the_third_layer)
    with pytest.raises(MemoryError):
        engine8.acquire(location)
    monkeypatch.undo()
    assert len(calls) == 3 and "many-modules" not in loaded(engine8)
    in_use = {slot.index for slot in engine8.slots._slots.values()}
    assert all(set(layer.ranks) <= in_use for layer in engine8.layers.values())  # nothing left behind
    engine8.release(engine8.acquire(location))  # the slot serves again
    engine8.unload("many-modules")


def test_pinned_adapters_are_never_evicted(engine8, thousand):
    engine8.pin("a0100")
    try:
        use(engine8, thousand, "a0100")
        for i in range(200, 220):
            use(engine8, thousand, f"a{i:04d}")
        assert loaded(engine8)[0] == "a0100"
        assert loaded(engine8)[1:] == [f"a{i:04d}" for i in range(213, 220)]
    finally:
        engine8.pin("a0100", False)
    use(engine8, thousand, "a0300")
    assert "a0100" not in loaded(engine8)


def test_pinned_from_settings(tiny_settings, adapter_store):
    engine = Engine.from_settings(tiny_settings.model_copy(update={"max_loaded_adapters": 1,
                                                                    "pinned_adapters": ["gen-a"]}))
    try:
        engine.release(engine.acquire(AdapterLocation("gen-a", 1, adapter_store / "gen-a")))
        with pytest.raises(SlotsBusy):
            engine.acquire(AdapterLocation("gen-b", 1, adapter_store / "gen-b"))
        assert [loc.name for loc in engine.loaded()] == ["gen-a"]
    finally:
        engine.close()


def test_unload_waits_for_in_flight_users(engine8, thousand):
    slot = engine8.acquire(thousand.locate("a0042"))
    engine8.unload("a0042")
    assert not engine8.is_loaded("a0042")
    assert slot.index not in engine8.slots._free  # still serving its request
    assert any(slot.index in layer.ranks for layer in engine8.layers.values())
    engine8.release(slot)
    assert slot.index in engine8.slots._free
    assert all(slot.index not in layer.ranks for layer in engine8.layers.values())
