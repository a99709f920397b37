"""Merge control: which adapter, if any, is folded into the base weights (dLoRA-style), and the folding itself.

`MergePolicy` decides from recent traffic; `Merging` applies its choice to the LoRA layers on the engine's
worker thread before each forward: a forward whose rows are all of the merged adapter runs at exactly base cost, and
any mixed forward runs unmerged. No torch is imported here (the layers do the arithmetic).
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from typing import TYPE_CHECKING

from .slots import BASE_SLOT

if TYPE_CHECKING:
    from .lora import MultiLoraLinear

log = logging.getLogger(__name__)


class MergePolicy:
    """dLoRA-style: merge an adapter into the base weights while it dominates recent traffic.

    Counts the slot of each recent request (0 = base). Merge the top adapter when its share of a full window
    reaches `merge_share`; keep it merged while its share stays at or above `unmerge_share` (hysteresis).
    """

    def __init__(self, window: int = 32, merge_share: float = 0.9, unmerge_share: float = 0.6):
        self.recent: deque[int] = deque(maxlen=window)
        self.merge_share = merge_share
        self.unmerge_share = unmerge_share

    def observe(self, slot_index: int) -> None:
        self.recent.append(slot_index)

    def forget(self, slot_index: int) -> None:
        """A slot was emptied: its history belongs to an adapter that is gone."""
        kept = [s for s in self.recent if s != slot_index]
        self.recent.clear()
        self.recent.extend(kept)

    def choose(self, merged: int | None) -> int | None:
        """The slot that should be merged now, or None."""
        if len(self.recent) < (self.recent.maxlen or 0):
            return merged
        counts = Counter(self.recent)
        if merged is not None and counts[merged] >= self.unmerge_share * len(self.recent):
            return merged
        top, count = counts.most_common(1)[0]
        if top != BASE_SLOT and count >= self.merge_share * len(self.recent):
            return top
        return None


class Merging:
    """The merge state of the LoRA layers (worker thread only)."""

    def __init__(self, layers: dict[str, MultiLoraLinear], policy: MergePolicy | None):
        self.layers = layers
        self.policy = policy  # None: never merge automatically
        self.merged: int | None = None  # slot folded into the base weights

    def observe(self, slot_index: int) -> None:
        if self.policy is not None:
            self.policy.observe(slot_index)

    def forget(self, slot_index: int) -> None:
        """A slot is being emptied: unmerged first if it is merged, and its history forgotten."""
        if self.merged == slot_index:
            self.unmerge()
        if self.policy is not None:
            self.policy.forget(slot_index)

    def merge(self, index: int) -> None:
        """Fold one loaded adapter into the base weights; its rows then run at exactly base cost."""
        if self.merged == index:
            return
        self.unmerge()
        for layer in self.layers.values():
            layer.merge(index)
        self.merged = index
        log.info("merged slot %d into the base weights", index)

    def unmerge(self) -> None:
        if self.merged is None:
            return
        for layer in self.layers.values():
            layer.unmerge()
        log.info("unmerged slot %d", self.merged)
        self.merged = None

    def prepare(self, slots: set[int]) -> None:
        """Before a forward over rows of these slots (those decoding included): mixed forwards never run merged;
        follow the policy when every row in flight allows it."""
        want = self.merged if self.policy is None else self.policy.choose(self.merged)
        if self.merged is not None and (slots != {self.merged} or want != self.merged):
            self.unmerge()
        if want is not None and want != BASE_SLOT and self.merged is None and slots == {want}:
            self.merge(want)
