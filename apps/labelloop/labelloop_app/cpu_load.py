"""How many cores other processes keep busy: what an inference should leave them (see :mod:`.torch_threads`).

Linux counts every CPU's busy time in ``/proc/stat`` and this process's own in ``/proc/self/stat``, both in clock
ticks. The difference over an interval is the work of everything else on the machine: the server's training
process, another server, a benchmark. Elsewhere (no ``/proc``) nothing is measured and only the server's own
jobs are counted.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import NamedTuple, Optional


class Ticks(NamedTuple):
    busy: int  # every CPU's busy clock ticks since boot
    total: int  # every CPU's clock ticks since boot
    own: int  # this process's CPU clock ticks (user and system, every thread)
    cpus: int


def read_ticks(proc: Path = Path("/proc")) -> Optional[Ticks]:
    """The counters now, or None where ``proc`` cannot be read or parsed."""
    try:
        lines = (proc / "stat").read_text().splitlines()
        own = (proc / "self" / "stat").read_text()
        # user nice system idle iowait irq softirq steal (guest time is already in user)
        values = [int(v) for v in lines[0].split()[1:9]]
        fields = own.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces and parentheses
        own_ticks = int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    total = sum(values)
    return Ticks(total - values[3] - values[4], total, own_ticks, max(1, cpus))


def busy_elsewhere(before: Ticks, after: Ticks) -> Optional[float]:
    """Cores that other processes kept busy between two readings, on average (None over no time)."""
    total = after.total - before.total
    if total <= 0:
        return None
    others = (after.busy - before.busy) - (after.own - before.own)
    return max(0.0, others / total * after.cpus)


class CpuLoad:
    """The cores other processes kept busy over the last ``interval`` seconds, kept up to date by a daemon
    thread (:meth:`start`); ``busy_cores`` is 0 until the first interval ends, or where nothing can be read."""

    def __init__(self, interval: float = 1.0, proc: Path = Path("/proc")):
        self.interval = interval
        self.proc = proc
        self.busy_cores = 0.0
        self._thread: Optional[threading.Thread] = None

    def start(self) -> bool:
        """Start sampling; False where ``/proc`` cannot be read (or when already started)."""
        if self._thread is not None or read_ticks(self.proc) is None:
            return False
        self._thread = threading.Thread(target=self._run, name="cpu-load", daemon=True)
        self._thread.start()
        return True

    def _run(self) -> None:
        last = read_ticks(self.proc)
        while True:
            time.sleep(self.interval)
            now = read_ticks(self.proc)
            if last is not None and now is not None:
                busy = busy_elsewhere(last, now)
                if busy is not None:
                    self.busy_cores = busy
            last = now
