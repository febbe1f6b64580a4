"""Naming the rank that died: heartbeats of every rank in a small key-value store.

When one process of a torch.distributed job dies, the others learn it from gloo as "Connection
closed by peer [address]" (or an NCCL/store timeout) — without the rank, and only once they reach
a collective. :class:`Heartbeat` runs a daemon thread per rank that writes ``(time, stage)`` every
``interval`` seconds to a ``torch.distributed.TCPStore`` hosted by rank 0 (on a free port agreed
while every rank is alive) and reads the others'. A rank whose heartbeat is older than
``stale_after`` seconds has died or hung:

* with ``on_failure="exit"`` (default) the watcher prints which rank, how long ago and what it was
  doing, and exits this process with :data:`EXIT_CODE` — promptly, even while the main thread is
  blocked inside a collective that would otherwise wait for the process group's timeout;
* with ``"raise"`` the next collective call raises :class:`RankFailedError` instead.

A collective that fails outright (the connection to a dead peer closes) is translated into
:class:`RankFailedError` naming the rank, by :meth:`Heartbeat.explain`. A rank that stops on an
uncaught exception publishes it (``failed``), so the others name the exception too. If rank 0 itself
dies the store goes with it; the survivors then name rank 0 with the stage they last saw.

Clean exits are coordinated at interpreter exit: every rank marks itself ``done``, and rank 0 (which
hosts the store) waits until every other rank is done or has failed, so a rank still finishing its
own work never mistakes rank 0's clean exit for a death.
"""
from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist


class RankFailedError(RuntimeError):
    """Another rank failed (raised, or died) while this one was in a collective or between them."""


#: exit status of a rank that stops because another rank died
EXIT_CODE = 75


class Heartbeat:
    """Heartbeats of every rank; see the module docstring. ``stage`` is what this rank is doing."""

    def __init__(self, rank: int, world_size: int, group: Any = None, interval: float | None = None, stale_after: float = 10.0,
                 on_failure: str = "exit") -> None:
        interval = min(1.0, stale_after / 4) if interval is None else interval
        if on_failure not in ("exit", "raise"):
            raise ValueError(f"on_failure must be 'exit' or 'raise', got {on_failure!r}")
        if not stale_after > 2 * interval > 0:
            raise ValueError(f"need stale_after > 2 * interval > 0, got stale_after={stale_after}, interval={interval}")
        self.rank, self.world_size = rank, world_size
        self.interval, self.stale_after, self.on_failure = interval, stale_after, on_failure
        self.stage = "starting"
        self.failure: str | None = None
        self._seen: dict[int, tuple[float, str]] = {}
        self._lock = threading.Lock()
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = [_free_port() if rank == 0 else None]
        dist.broadcast_object_list(port, src=0, group=group)  # agreed while every rank is alive
        self.store = dist.TCPStore(host, int(port[0]), world_size, rank == 0, timeout=timedelta(seconds=max(stale_after, 5)),
                                   wait_for_workers=False)
        self._beat()
        dist.barrier(group=group)  # every rank has a first heartbeat before anyone watches
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sketchattr-heartbeat", daemon=True)
        self._thread.start()
        self._hook = sys.excepthook
        sys.excepthook = self._on_uncaught
        atexit.register(self._on_exit)

    # ------------------------------------------------------------------ public
    def check(self) -> None:
        """Raise :class:`RankFailedError` if a failure has been seen (``on_failure="raise"``)."""
        if self.failure is not None:
            raise RankFailedError(self.failure)

    def explain(self, exc: BaseException, action: str) -> RankFailedError:
        """A failed collective as an error naming the rank that died (waits up to ``stale_after``)."""
        deadline = time.monotonic() + self.stale_after + 2 * self.interval
        while self.failure is None and time.monotonic() < deadline:
            self._scan()
            time.sleep(self.interval / 2)
        who = self.failure or "no rank's heartbeat stopped: the failure is elsewhere"
        return RankFailedError(f"rank {self.rank} failed in {action} ({exc}): {who}")

    def close(self) -> None:
        self._stop.set()

    def _on_uncaught(self, kind, value, tb) -> None:
        """An uncaught exception: publish it so the other ranks can name it, then report as usual."""
        try:
            self.stage = f"failed with {kind.__name__}: {value} (while {self.stage})"
            self._stop.set()
            self.store.set(f"sketchattr/heartbeat/{self.rank}", f"failed|{self.stage}")
        except Exception:  # noqa: BLE001 - reporting must never hide the original error
            pass
        self._hook(kind, value, tb)

    def _on_exit(self) -> None:
        """Interpreter exit: mark this rank done; rank 0 keeps the store up until the others finish."""
        if self._stop.is_set() or self.failure is not None:
            return
        try:
            if self.rank != 0:
                self.stage = "done"  # no more beats over the marker
                self._stop.set()
                self._thread.join(timeout=2 * self.interval)
                self.store.set(f"sketchattr/heartbeat/{self.rank}", f"{time.time()!r}|done")
                return
            self.stage = "finished, waiting for the other ranks to finish"
            while self.failure is None and not all(
                    self._seen.get(r, (0.0, ""))[1] in ("done", "failed") for r in range(1, self.world_size)):
                time.sleep(self.interval / 2)
                self._scan()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
        self._stop.set()

    def set_stage(self, stage: str) -> None:
        """What this rank does now, published at once (not at the next beat: a rank that dies right
        after is reported doing it)."""
        self.stage = stage
        with self._lock:
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - the store is gone (shutting down): the next scan reports it
                pass

    # ------------------------------------------------------------------ internals
    def _beat(self) -> None:
        if self.stage != "done":
            self.store.set(f"sketchattr/heartbeat/{self.rank}", f"{time.time()!r}|{self.stage}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._scan()
            if self.failure is not None and self.on_failure == "exit":
                print(f"sketchattr: {self.failure}; rank {self.rank} (doing: {self.stage}) exits with status "
                      f"{EXIT_CODE}", file=sys.stderr, flush=True)
                os._exit(EXIT_CODE)

    def _scan(self) -> None:
        """Write this rank's heartbeat and read the others'; record the first failed or stale one."""
        with self._lock:
            if self.failure is not None:
                return
            now = time.time()
            try:
                self._beat()
                for r in range(self.world_size):
                    if r != self.rank:
                        head, stage = self.store.get(f"sketchattr/heartbeat/{r}").decode().split("|", 1)
                        if head == "failed":
                            self._seen[r] = (now, "failed")
                            self.failure = f"rank {r} {stage}"
                            return
                        self._seen[r] = (now, "done") if stage == "done" else (float(head), stage)
            except Exception:  # noqa: BLE001 - the store is hosted by rank 0: it is gone with it
                if self.rank != 0 and self._seen.get(0, (0.0, ""))[1] != "done":
                    stage = self._seen.get(0, (now, "unknown"))[1]
                    self.failure = f"rank 0 stopped responding (it hosts the heartbeat store; last seen doing: {stage})"
                return
            for r, (stamp, stage) in sorted(self._seen.items()):
                if stage not in ("done", "failed") and now - stamp > self.stale_after:
                    self.failure = f"rank {r} stopped responding {now - stamp:.1f} s ago (last seen doing: {stage})"
                    return


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
