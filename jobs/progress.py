"""A progress line a person can read on a long run: rows done of the total, pairs/s and the time left.

One line at most every ``interval_s`` seconds (and one when the pass ends), instead of one per unit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

logger = logging.getLogger("jobs.rescore")


@dataclass
class Progress:
    """Counts one scoring pass's committed units and logs where it stands."""

    what: str  # which pass: "stage 1", "stage 2", ...
    total_rows: int
    interval_s: float = 10.0
    rows: int = 0
    pairs: int = 0
    started: float = field(default_factory=lambda: time.monotonic())
    _logged: float = field(default_factory=lambda: time.monotonic())

    def add(self, rows: int, pairs: int) -> None:
        """Count a committed unit; log the line when the last one is ``interval_s`` old."""
        self.rows += rows
        self.pairs += pairs
        if time.monotonic() - self._logged >= self.interval_s:
            self.log()

    def log(self) -> None:
        """Log the line now."""
        self._logged = time.monotonic()
        logger.info("%s", self.line())

    def line(self) -> str:
        """``stage 1: rows 120,000 of 1,000,000 (12.0%), 4,100 pairs/s, ETA 3m35s``."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.pairs / elapsed
        share = self.rows / self.total_rows if self.total_rows else 1.0
        left = elapsed * (1 - share) / share if share > 0 else float("inf")
        eta = "done" if share >= 1 else f"ETA {_duration(left)}"
        return (
            f"{self.what}: rows {self.rows:,} of {self.total_rows:,} ({100 * share:.1f}%), "
            f"{rate:,.0f} pairs/s, {eta}"
        )


def _duration(seconds: float) -> str:
    """``1h02m``, ``3m35s`` or ``12s``; ``?`` when unknown."""
    if seconds == float("inf"):
        return "?"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
