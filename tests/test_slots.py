"""AdapterSlots on its own: stub prepare/clear callables stand in for the model (no torch, no base), as Ray Serve
tests its multiplexer with a stub loader; the LRU order is checked after every step."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from server.slots import BASE_SLOT, AdapterSlots, Installer, LoadedAdapter, Slot, SlotsBusy
from server.types import AdapterLocation

REPO_ROOT = Path(__file__).resolve().parent.parent


def at(name: str, version: int = 1) -> AdapterLocation:
    return AdapterLocation(name, version, Path(f"/adapters/{name}/v{version}"))


class InstallFailed(RuntimeError):
    pass


class PrepareFailed(RuntimeError):
    pass


class StubModel:
    """Records every call the slots make to the model side; can fail or be slow on demand."""

    def __init__(self) -> None:
        self.prepared: list[str] = []  # names, in call order
        self.installs: list[tuple[str, int, bool]] = []  # (name, index, evicting)
        self.cleared: list[int] = []
        self.failing_prepare: set[str] = set()
        self.failing_install: set[str] = set()
        self.prepare_seconds = 0.0
        self._lock = threading.Lock()

    def prepare(self, location: AdapterLocation) -> Installer:
        with self._lock:
            self.prepared.append(location.name)
        time.sleep(self.prepare_seconds)
        if location.name in self.failing_prepare:
            raise PrepareFailed(location.name)

        def install(index: int, evicting: bool) -> LoadedAdapter:
            self.installs.append((location.name, index, evicting))
            if location.name in self.failing_install:
                raise InstallFailed(location.name)
            return LoadedAdapter("generation", head=f"head of {location.name}")

        return install

    def clear(self, index: int) -> None:
        self.cleared.append(index)


class RecordingObserver:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.load_seconds: list[float] = []

    def adapter_loaded(self, name: str, seconds: float) -> None:
        self.events.append(("loaded", name))
        self.load_seconds.append(seconds)

    def adapter_evicted(self, name: str) -> None:
        self.events.append(("evicted", name))


@pytest.fixture
def model() -> StubModel:
    return StubModel()


def make_slots(model: StubModel, capacity: int, pinned: tuple[str, ...] = ()) -> AdapterSlots:
    return AdapterSlots(capacity, model.prepare, model.clear, pinned)


def use(slots: AdapterSlots, location: AdapterLocation) -> Slot:
    """One request's worth: acquire, then release at once (the slot stays loaded and idle)."""
    slot = slots.acquire(location)
    slots.release(slot)
    return slot


def names(slots: AdapterSlots) -> list[str]:
    return [location.name for location in slots.loaded()]


def test_importing_slots_does_not_import_torch() -> None:
    """Routes and the registry import the slots: they must stay light (the test process itself has torch loaded)."""
    subprocess.run(
        [sys.executable, "-c", "import sys, server.slots; assert 'torch' not in sys.modules, 'torch was imported'"],
        cwd=REPO_ROOT, check=True, capture_output=True,
    )


def test_lru_order_follows_hits_and_misses(model: StubModel) -> None:
    slots = make_slots(model, capacity=3)
    for name in "abc":
        use(slots, at(name))
    assert names(slots) == ["a", "b", "c"]
    assert model.installs == [("a", 1, False), ("b", 2, False), ("c", 3, False)]

    use(slots, at("a"))
    assert names(slots) == ["b", "c", "a"]
    use(slots, at("b"))
    assert names(slots) == ["c", "a", "b"]
    assert model.prepared == ["a", "b", "c"]  # hits prepare nothing

    use(slots, at("d"))  # a miss with every slot taken evicts c, the least recently used
    assert names(slots) == ["a", "b", "d"]
    assert model.installs[-1] == ("d", 3, True)
    use(slots, at("a"))
    assert names(slots) == ["b", "d", "a"]
    assert slots.evictions == 1
    assert model.cleared == []  # an evicted slot is cleared by its next installer, not by clear()


def test_release_does_not_refresh_lru_order(model: StubModel) -> None:
    slots = make_slots(model, capacity=2)
    held = slots.acquire(at("a"))
    use(slots, at("b"))
    slots.release(held)  # a was acquired before b: releasing it later keeps it the older one
    assert names(slots) == ["a", "b"]


def test_versions_of_one_adapter_take_separate_slots(model: StubModel) -> None:
    slots = make_slots(model, capacity=2)
    first, second = use(slots, at("a", 1)), use(slots, at("a", 2))
    assert (first.index, second.index) == (1, 2)
    assert slots.loaded() == [at("a", 1), at("a", 2)]


def test_a_slot_in_use_is_never_evicted(model: StubModel) -> None:
    slots = make_slots(model, capacity=2)
    held = slots.acquire(at("a"))  # the least recently used, but in use
    use(slots, at("b"))
    use(slots, at("c"))
    assert names(slots) == ["a", "c"]
    assert model.installs[-1] == ("c", 2, True)  # b's index
    assert held.in_use == 1 and slots.name_of(held.index) == "a"


def test_slots_busy_when_every_slot_is_in_use_and_nothing_changes(model: StubModel) -> None:
    slots = make_slots(model, capacity=2)
    held = [slots.acquire(at("a")), slots.acquire(at("b"))]
    with pytest.raises(SlotsBusy):
        slots.acquire(at("c"))
    assert model.prepared == ["a", "b", "c"]  # validated first, then no slot could be had
    assert [install[0] for install in model.installs] == ["a", "b"]
    assert names(slots) == ["a", "b"]
    assert slots.evictions == 0

    slots.release(held[0])
    use(slots, at("c"))  # retrying once a slot is idle works (the failed load left no loading marker behind)
    assert names(slots) == ["b", "c"]
    assert model.installs[-1] == ("c", 1, True)


def test_slots_busy_when_the_idle_slots_are_pinned(model: StubModel) -> None:
    slots = make_slots(model, capacity=2, pinned=("a",))
    use(slots, at("a"))
    held = slots.acquire(at("b"))
    with pytest.raises(SlotsBusy):
        slots.acquire(at("c"))
    assert names(slots) == ["a", "b"]
    slots.release(held)
    use(slots, at("c"))
    assert names(slots) == ["a", "c"]


@pytest.mark.parametrize("how", ["constructor", "pin() before load"])
def test_pinned_before_load_is_not_evicted(model: StubModel, how: str) -> None:
    slots = make_slots(model, capacity=2, pinned=("a",) if how == "constructor" else ())
    if how == "pin() before load":
        slots.pin("a")
    assert use(slots, at("a")).pinned
    use(slots, at("b"))
    use(slots, at("c"))
    assert names(slots) == ["a", "c"]
    assert model.installs[-1] == ("c", 2, True)


def test_pin_after_load_then_unpin(model: StubModel) -> None:
    slots = make_slots(model, capacity=2)
    a = use(slots, at("a"))
    use(slots, at("b"))
    slots.pin("a")
    assert a.pinned
    use(slots, at("c"))
    assert names(slots) == ["a", "c"]

    slots.pin("a", pinned=False)
    assert not a.pinned
    use(slots, at("d"))  # a is the least recently used again, and evictable
    assert names(slots) == ["c", "d"]
    assert model.installs[-1] == ("d", a.index, True)
    assert not use(slots, at("a")).pinned  # nor is a reload
    assert names(slots) == ["d", "a"]


def test_pin_covers_every_loaded_version(model: StubModel) -> None:
    slots = make_slots(model, capacity=3)
    old, new = use(slots, at("a", 1)), use(slots, at("a", 2))
    other = use(slots, at("b"))
    slots.pin("a")
    assert (old.pinned, new.pinned, other.pinned) == (True, True, False)


def test_concurrent_first_acquires_prepare_once(model: StubModel) -> None:
    """Ten requests for one version arrive together while its (slow) prepare runs: one load, one shared slot."""
    model.prepare_seconds = 0.3
    slots = make_slots(model, capacity=2)
    barrier = threading.Barrier(10)
    acquired: list[Slot] = []

    def request() -> None:
        barrier.wait()
        acquired.append(slots.acquire(at("a")))

    threads = [threading.Thread(target=request) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert model.prepared == ["a"]
    assert model.installs == [("a", 1, False)]
    assert len(acquired) == 10 and all(slot is acquired[0] for slot in acquired)
    assert acquired[0].in_use == 10


def test_waiters_load_themselves_when_the_first_load_fails(model: StubModel) -> None:
    """The request that loads fails alone; the ones waiting on it try again (one of them loads, once)."""
    model.prepare_seconds = 0.3
    calls = 0

    def prepare_failing_once(location: AdapterLocation) -> Installer:
        nonlocal calls
        calls += 1  # prepares of one location never overlap: no lock needed
        installer = model.prepare(location)
        if calls == 1:
            raise PrepareFailed(location.name)
        return installer

    slots = AdapterSlots(2, prepare_failing_once, model.clear)
    barrier = threading.Barrier(10)
    acquired: list[Slot] = []
    failures: list[PrepareFailed] = []

    def request() -> None:
        barrier.wait()
        try:
            acquired.append(slots.acquire(at("a")))
        except PrepareFailed as error:
            failures.append(error)

    threads = [threading.Thread(target=request) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(failures) == 1
    assert model.prepared == ["a", "a"]
    assert model.installs == [("a", 1, False)]
    assert len(acquired) == 9 and all(slot is acquired[0] for slot in acquired)
    assert acquired[0].in_use == 9


def test_a_failing_prepare_evicts_nothing(model: StubModel) -> None:
    observer = RecordingObserver()
    slots = make_slots(model, capacity=1)
    slots.observers.append(observer)
    use(slots, at("a"))
    model.failing_prepare.add("b")
    with pytest.raises(PrepareFailed):
        slots.acquire(at("b"))
    assert names(slots) == ["a"]
    assert model.installs == [("a", 1, False)]
    assert slots.evictions == 0
    assert observer.events == [("loaded", "a")]

    use(slots, at("a"))
    assert model.prepared == ["a", "b"]  # a is still loaded: a hit
    model.failing_prepare.clear()
    use(slots, at("b"))  # and b can be loaded later (no loading marker was left behind)
    assert names(slots) == ["b"]
    assert model.installs[-1] == ("b", 1, True)


@pytest.mark.parametrize("evicting", [False, True], ids=["into a free slot", "over an evicted adapter"])
def test_a_failing_installer_returns_its_index(model: StubModel, evicting: bool) -> None:
    slots = make_slots(model, capacity=1)
    if evicting:
        use(slots, at("a"))
    model.failing_install.add("b")
    with pytest.raises(InstallFailed):
        slots.acquire(at("b"))
    assert model.installs[-1] == ("b", 1, evicting)
    assert names(slots) == []  # an evicted adapter is gone even though its replacement failed
    assert slots.name_of(1) is None

    use(slots, at("c"))  # the index came back as a free one: the installer left the slot empty
    assert model.installs[-1] == ("c", 1, False)
    assert names(slots) == ["c"]


def test_unload_of_an_idle_adapter_clears_its_slot_at_once(model: StubModel) -> None:
    slots = make_slots(model, capacity=2)
    a = use(slots, at("a"))
    use(slots, at("b"))
    slots.unload("a")
    assert model.cleared == [a.index]
    assert a.adapter.head is None  # the classification head is let go with the slot
    assert names(slots) == ["b"]
    assert not slots.is_loaded("a") and slots.is_loaded("b")

    use(slots, at("c"))  # the cleared index is free: no eviction
    assert model.installs[-1] == ("c", a.index, False)
    assert names(slots) == ["b", "c"]
    assert slots.evictions == 0


def test_unload_clears_every_version(model: StubModel) -> None:
    slots = make_slots(model, capacity=3)
    old, new = use(slots, at("a", 1)), use(slots, at("a", 2))
    use(slots, at("b"))
    slots.unload("a")
    assert sorted(model.cleared) == sorted([old.index, new.index])
    assert names(slots) == ["b"]


def test_unload_of_an_adapter_in_use_frees_it_at_the_last_release(model: StubModel) -> None:
    slots = make_slots(model, capacity=2)
    first, second = slots.acquire(at("a")), slots.acquire(at("a"))
    slots.unload("a")
    assert model.cleared == []  # two requests still run on it
    assert names(slots) == [] and not slots.is_loaded("a")
    assert first.retired

    again = slots.acquire(at("a"))  # a later request cannot reach the retired slot: it loads anew
    assert model.prepared == ["a", "a"]
    assert again.index != first.index
    with pytest.raises(SlotsBusy):  # the retired slot is not free yet, and the new one is in use
        slots.acquire(at("b"))

    slots.release(first)
    assert model.cleared == []
    slots.release(second)
    assert model.cleared == [first.index]
    use(slots, at("b"))
    assert model.installs[-1] == ("b", first.index, False)
    assert names(slots) == ["a", "b"]


def test_unload_during_a_first_load_frees_that_slot_at_its_release(model: StubModel) -> None:
    """An adapter deleted or replaced while its first load runs: the loading request is served, and then the slot
    is freed like any unloaded one (it must not stay behind as loaded, or pinned for good under a pinned name)."""
    started, proceed = threading.Event(), threading.Event()

    def slow_prepare(location: AdapterLocation) -> Installer:
        started.set()
        proceed.wait(timeout=10)
        return model.prepare(location)

    slots = AdapterSlots(2, slow_prepare, model.clear, pinned=("a",))
    acquired: list[Slot] = []
    loader = threading.Thread(target=lambda: acquired.append(slots.acquire(at("a"))))
    loader.start()
    assert started.wait(timeout=10)
    slots.unload("a")
    proceed.set()
    loader.join(timeout=10)

    assert len(acquired) == 1 and acquired[0].retired
    assert names(slots) == [] and not slots.is_loaded("a")
    slots.release(acquired[0])
    assert model.cleared == [acquired[0].index]
    use(slots, at("a"))  # a later load of that location is an ordinary one
    assert names(slots) == ["a"]


def test_observers_hear_loads_and_evictions_by_name(model: StubModel) -> None:
    model.prepare_seconds = 0.02
    observer = RecordingObserver()
    slots = make_slots(model, capacity=2)
    slots.observers.append(observer)
    loaded = [use(slots, at(name)) for name in "abc"]
    use(slots, at("a"))  # evicted by c: loads again, evicting b
    assert observer.events == [
        ("loaded", "a"), ("loaded", "b"), ("evicted", "a"), ("loaded", "c"), ("evicted", "b"), ("loaded", "a"),
    ]
    assert slots.evictions == 2
    assert observer.load_seconds[:3] == [slot.load_ms / 1000 for slot in loaded]
    assert all(seconds >= model.prepare_seconds for seconds in observer.load_seconds)  # prepare is timed too


def test_name_of_maps_indices_to_loaded_names(model: StubModel) -> None:
    slots = make_slots(model, capacity=3)
    a, b = use(slots, at("a")), use(slots, at("b"))
    assert (slots.name_of(a.index), slots.name_of(b.index)) == ("a", "b")
    assert slots.name_of(3) is None  # never filled
    assert slots.name_of(BASE_SLOT) is None  # the base is no adapter's slot
    slots.unload("a")
    assert slots.name_of(a.index) is None


def test_a_load_waits_for_a_slot_in_use_to_become_idle(model: StubModel) -> None:
    slots = make_slots(model, capacity=2)
    held = [slots.acquire(at("a")), slots.acquire(at("b"))]
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(slots.acquire, at("c"), 30)
        time.sleep(0.2)
        assert not waiting.done()  # every slot is in use: it waits rather than failing
        slots.release(held[1])
        got = waiting.result(timeout=5)
    assert got.location == at("c") and got.index == held[1].index
    assert names(slots) == ["a", "c"]
    with pytest.raises(SlotsBusy, match=r"waited 0.1 s"):  # a and c in use: the wait ends
        slots.acquire(at("d"), 0.1)


def test_a_load_does_not_wait_when_every_slot_is_pinned(model: StubModel) -> None:
    slots = make_slots(model, capacity=1, pinned=("a",))
    use(slots, at("a"))
    started = time.monotonic()
    with pytest.raises(SlotsBusy):
        slots.acquire(at("b"), 30)
    assert time.monotonic() - started < 1
