"""A small wall-clock profiler with a per-action table (Kronfluence-style).

``with profiler.record("eigendecomposition"): ...`` times a block; :meth:`Profiler.table`
prints ``action | mean duration (s) | calls | total (s) | percent`` sorted by total, percent
of the wall time between the first record's start and the last record's end. Nested records
are fine (their percents then overlap). A disabled profiler costs nothing. :meth:`Profiler.merge`
folds another profiler's records in (e.g. ``fit_factors``'s and a scorer's into a script's
per-stage table).

Throughput: :meth:`Profiler.count` (or ``record(action, items=n)``) adds the number of items
(rows, examples) an action processed; the table then has an ``Items/s`` column (total items /
total time of that action; ``-`` where nothing was counted).
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator


class Profiler:
    """Accumulates durations per action name."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.durations: dict[str, list[float]] = defaultdict(list)
        self.items: dict[str, int] = {}
        self._start: float | None = None
        self._end: float | None = None

    @contextlib.contextmanager
    def record(self, action: str, items: int | None = None) -> Iterator[None]:
        """Time the block as one call of ``action`` (``items``: what it processed, see :meth:`count`)."""
        if not self.enabled:
            yield
            return
        if items is not None:
            self.count(action, items)
        t0 = time.perf_counter()
        self._start = t0 if self._start is None else self._start
        try:
            yield
        finally:
            t1 = time.perf_counter()
            self.durations[action].append(t1 - t0)
            self._end = t1

    def merge(self, other: "Profiler", prefix: str = "") -> "Profiler":
        """Add ``other``'s records (action names prefixed with ``prefix``); the wall time spans both."""
        for action, durations in other.durations.items():
            self.durations[prefix + action].extend(durations)
        for action, items in other.items.items():
            self.count(prefix + action, items)
        starts = [t for t in (self._start, other._start) if t is not None]
        ends = [t for t in (self._end, other._end) if t is not None]
        self._start, self._end = (min(starts) if starts else None), (max(ends) if ends else None)
        return self

    def count(self, action: str, items: int) -> None:
        """Add ``items`` processed by ``action`` (shown as ``Items/s`` = items / total time)."""
        if self.enabled:
            self.items[action] = self.items.get(action, 0) + int(items)

    def rate(self, action: str) -> float | None:
        """Items per second of ``action`` (None when no items or no time were recorded)."""
        total = sum(self.durations.get(action, []))
        return self.items[action] / total if action in self.items and total > 0 else None

    def calls(self, action: str) -> int:
        """How many times ``action`` was recorded."""
        return len(self.durations.get(action, []))

    @property
    def wall(self) -> float:
        """Seconds from the first record's start to the last record's end."""
        return 0.0 if self._start is None or self._end is None else self._end - self._start

    def rows(self, wall: float | None = None) -> list[tuple[str, float, int, float, float]]:
        """(action, mean s, calls, total s, percent of ``wall`` (default: this profiler's)), by total descending."""
        wall = wall or self.wall or 1.0
        out = [(a, sum(d) / len(d), len(d), sum(d), 100.0 * sum(d) / wall) for a, d in self.durations.items()]
        return sorted(out, key=lambda r: -r[3])

    def table(self, title: str = "profile", wall: float | None = None) -> str:
        """The timing table as text, with a Total row: the wall time, or ``wall`` seconds (e.g. an
        enclosing profiler's, when this one details its stages); an ``Items/s`` column when any
        action counted items."""
        wall = wall or self.wall
        rate = lambda a: "-" if self.rate(a) is None else f"{self.rate(a):.1f}"
        extra = (lambda a: (rate(a),)) if self.items else (lambda a: ())
        rows = [(a, f"{m:.5f}", str(c), f"{t:.5f}", f"{p:.1f}") + extra(a) for a, m, c, t, p in self.rows(wall)]
        rows.append(("Total", "-", "-", f"{wall:.5f}", "100.0") + (("-",) if self.items else ()))
        head = ("Action", "Mean duration (s)", "Num calls", "Total time (s)", "Percentage %") + (("Items/s",) if self.items else ())
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
        line = lambda r: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([title, line(head), sep] + [line(r) for r in rows])
