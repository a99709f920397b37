"""Adapter slots: which adapter version sits in which slot of the model, in LRU order. No torch here.

The model side is two callables. `prepare(location)` reads and checks an adapter (in the caller's thread) and
returns its installer; `installer(index, evicting)` puts it into slot `index` (clearing the evicted adapter there
first when `evicting`, and leaving the slot empty if it fails) and returns what the slot keeps (task, labels,
head). `clear(index)` empties a slot. Tests drive this class with stubs, as Ray Serve tests its multiplexer.

Rules: concurrent first requests for one version load it once; validate, load, only then evict (a broken adapter
fails in `prepare`, before any slot is taken); a slot in use is never evicted, and one unloaded while in use
(deleted or replaced) is freed by its last release. When every slot is in use, a load waits (up to `wait_s`) for one
to become idle rather than failing at once: more adapters in flight than slots is ordinary traffic, not an error
(the soak benchmark found that, with 2 slots and 6 adapters, most such requests had been 503s).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import LoraswapError
from .types import SlotKey, Task

log = logging.getLogger(__name__)
BASE_SLOT = 0  # slot 0 is the base model itself: rows there get no adapter


@dataclass
class LoadedAdapter:
    """What a slot keeps of its adapter besides the LoRA pairs installed in the model."""

    task: Task
    labels: list[str] | None = None
    head: Any = None  # the classification head (engine-defined), None for generation adapters
    kind: str = "lora"  # "lora", "dora" or "mixture" (metrics and /adapters show which)


@dataclass
class Slot:
    index: int
    location: SlotKey
    adapter: LoadedAdapter
    in_use: int = 0
    pinned: bool = False
    retired: bool = False  # unloaded while in use: freed by the last release()
    load_ms: float = 0.0

    @property
    def task(self) -> Task:
        return self.adapter.task


class SlotsBusy(LoraswapError):
    """Every adapter slot is in use by a running request."""


class SlotObserver(Protocol):
    def adapter_loaded(self, name: str, seconds: float) -> None: ...

    def adapter_evicted(self, name: str) -> None: ...


Installer = Callable[[int, bool], LoadedAdapter]


class AdapterSlots:
    def __init__(
        self,
        capacity: int,
        prepare: Callable[[SlotKey], Installer],
        clear: Callable[[int], None],
        pinned: tuple[str, ...] | list[str] = (),
    ):
        self.capacity = capacity
        self._prepare = prepare
        self._clear = clear
        self.observers: list[SlotObserver] = []
        self._slots: OrderedDict[SlotKey, Slot] = OrderedDict()  # LRU order: oldest first
        self._free = list(range(capacity, 0, -1))  # indices 1..capacity; BASE_SLOT is never handed out
        self._lock = threading.Lock()  # guards _slots/_free/_loading/_unloaded_while_loading/_pinned
        self._idle = threading.Condition(self._lock)  # notified when a slot may have become free or evictable
        self._loading: dict[SlotKey, threading.Event] = {}
        self._unloaded_while_loading: set[SlotKey] = set()  # unload() ran during their first load
        self._pinned: set[str] = set(pinned)
        self.evictions = 0

    def loaded(self) -> list[SlotKey]:
        """Loaded versions, least recently used first."""
        with self._lock:
            return list(self._slots)

    def kinds(self) -> Counter[str]:
        """Loaded slots by what they hold: "lora", "dora" or "mixture"."""
        with self._lock:
            return Counter(slot.adapter.kind for slot in self._slots.values())

    def is_loaded(self, name: str) -> bool:
        with self._lock:
            return any(key.name == name for key in self._slots)

    def name_of(self, index: int) -> str | None:
        with self._lock:
            return next((s.location.name for s in self._slots.values() if s.index == index), None)

    def pin(self, name: str, pinned: bool = True) -> None:
        """Keep an adapter's slots out of LRU eviction (applies to loaded versions and to later loads)."""
        with self._lock:
            (self._pinned.add if pinned else self._pinned.discard)(name)
            for key, slot in self._slots.items():
                if key.name == name:
                    slot.pinned = pinned

    def acquire(self, location: SlotKey, wait_s: float = 0.0) -> Slot:
        """The slot serving this adapter version, loaded on first use; the caller must release() it. A load that
        finds every slot in use waits up to `wait_s` seconds for one to become idle (then SlotsBusy)."""
        while True:
            with self._lock:
                slot = self._slots.get(location)
                if slot is not None:
                    self._slots.move_to_end(location)
                    slot.in_use += 1
                    return slot
                pending = self._loading.get(location)
                if pending is None:
                    pending = self._loading[location] = threading.Event()
                    break
            pending.wait()  # another request is loading it: take its slot (or try ourselves if it failed)
        try:
            return self._load(location, wait_s)
        finally:
            with self._lock:
                del self._loading[location]
                self._unloaded_while_loading.discard(location)
            pending.set()

    def release(self, slot: Slot) -> None:
        with self._lock:
            slot.in_use -= 1
            free = slot.retired and slot.in_use == 0
            if slot.in_use == 0:
                self._idle.notify_all()
        if free:
            self._free_slot(slot)

    def unload(self, name: str) -> None:
        """Drop every loaded version of an adapter (deleted or replaced), and every mixture of it: later requests
        cannot acquire them, and each slot is freed once its last in-flight request releases it, so those finish
        unchanged."""
        with self._lock:
            slots = [self._slots.pop(k) for k in [k for k in self._slots if k.involves(name)]]
            self._unloaded_while_loading.update(k for k in self._loading if k.involves(name))
            for slot in slots:
                slot.retired = True
            idle = [slot for slot in slots if slot.in_use == 0]
        for slot in idle:
            self._free_slot(slot)

    def _load(self, location: SlotKey, wait_s: float) -> Slot:
        started = time.perf_counter()
        install = self._prepare(location)
        index, evicting = self._take_free_index(wait_s)
        try:
            adapter = install(index, evicting)
        except BaseException:
            with self._lock:
                self._free.append(index)
                self._idle.notify_all()
            raise
        slot = Slot(index, location, adapter, load_ms=(time.perf_counter() - started) * 1000)
        with self._lock:
            slot.in_use = 1  # acquired before it becomes visible: nothing can evict or retire it in between
            slot.pinned = location.name in self._pinned
            if location in self._unloaded_while_loading:  # serve the loading request, then free it as unloaded
                slot.retired = True
            else:
                self._slots[location] = slot
        for observer in self.observers:
            observer.adapter_loaded(location.name, slot.load_ms / 1000)
        log.info("loaded adapter %s v%d (%s) into slot %d in %.1f ms", location.name, location.version,
                 adapter.task, index, slot.load_ms)
        return slot

    def _take_free_index(self, wait_s: float) -> tuple[int, bool]:
        """A free slot index, evicting the least recently used idle, unpinned adapter if none is free; and whether
        it was evicted (the model still holds the old adapter there until the loader clears it). With every slot in
        use, wait up to `wait_s` for one to become idle; with every slot pinned, there is nothing to wait for."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            while not self._free:
                victim = next((k for k, s in self._slots.items() if s.in_use == 0 and not s.pinned), None)
                if victim is not None:
                    break
                remaining = deadline - time.monotonic()
                never = self._slots and all(s.pinned for s in self._slots.values())
                if never or remaining <= 0:
                    waited = f" (waited {wait_s:g} s)" if wait_s > 0 and not never else ""
                    raise SlotsBusy(f"all {self.capacity} adapter slots are in use or pinned{waited}; retry shortly")
                self._idle.wait(remaining)
            if self._free:
                return self._free.pop(), False
            slot = self._slots.pop(victim)
            self.evictions += 1
            for observer in self.observers:
                observer.adapter_evicted(victim.name)
        log.info("evicting adapter %s v%d from slot %d", victim.name, victim.version, slot.index)
        return slot.index, True

    def _free_slot(self, slot: Slot) -> None:
        self._clear(slot.index)
        slot.adapter.head = None
        with self._lock:
            self._free.append(slot.index)
            self._idle.notify_all()
        log.info("unloaded adapter %s v%d from slot %d", slot.location.name, slot.location.version, slot.index)
