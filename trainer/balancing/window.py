"""Epoch windows: the epochs in which a method modulates, as in its reference code.

OGM-GE, PMR and AGM modulate only in a window of epochs (``modulation_starts <= epoch <=
modulation_ends``, inclusive, as their reference code tests it). Their papers' windows were
tuned for a number of epochs that is rarely this run's, so the default window is the paper's
scaled to the run: the same share of the epochs, from the same first epoch. The run's epoch
count comes from ``build_balancer(..., total_epochs=...)`` (the loop passes ``train.epochs``).
"""

from __future__ import annotations

from dataclasses import dataclass

from avbalance.errors import UserError


@dataclass(frozen=True)
class PaperWindow:
    """The reference's window, 0-indexed and inclusive: epochs ``first..last`` of ``epochs``."""

    first: int
    last: int
    epochs: int

    def scaled_last(self, total_epochs: int | None) -> int:
        """The last modulated epoch for a run of ``total_epochs``: the paper's share of the
        epochs (at least one), or the paper's own ``last`` when the run length is unknown."""
        if total_epochs is None:
            return self.last
        n = max(1, round((self.last - self.first + 1) * int(total_epochs) / self.epochs))
        return self.first + n - 1


class EpochWindow:
    """Mixin: ``modulation_starts`` / ``modulation_ends`` (None = ``PAPER_WINDOW`` scaled)."""

    PAPER_WINDOW: PaperWindow

    def init_window(self, name: str, starts: int, ends: int | None) -> None:
        if int(starts) < 0:
            raise UserError(f"{name}: modulation_starts must be >= 0, got {starts}")
        if ends is not None and int(ends) < int(starts):
            raise UserError(f"{name}: modulation_ends ({ends}) must be >= modulation_starts ({starts})")
        self.modulation_starts = int(starts)
        self._ends = None if ends is None else int(ends)

    @property
    def modulation_ends(self) -> int:
        """The last modulated epoch (inclusive): as given, or the paper's window scaled."""
        if self._ends is not None:
            return self._ends
        return self.PAPER_WINDOW.scaled_last(getattr(self, "total_epochs", None))

    def in_window(self, epoch: int) -> bool:
        return self.modulation_starts <= int(epoch) <= self.modulation_ends
