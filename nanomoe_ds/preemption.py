"""Preemption: a stop request by signal becomes a save at the next step boundary.

No torch here: launch/train.py installs the handlers before it imports torch.
"""
from __future__ import annotations

import signal
import threading
import time


class Preemption:
    """Turns SIGTERM, SIGINT and SIGUSR1 into a request to stop at the next step boundary.

    SLURM and Kubernetes preempt with SIGTERM (SLURM can send SIGUSR1 earlier with
    --signal); Ctrl-C is SIGINT. A request often arrives more than once: `kill` to the
    deepspeed launcher's process group reaches each rank directly and again through the
    launcher, which forwards it, and on Ctrl-C the launcher forwards SIGTERM to ranks that
    got the SIGINT themselves. So a different signal, or the same one again within
    DUPLICATE_WINDOW_S of the first, is the same request: the save still happens. The
    same signal later than that, or a third time, means "stop now", as without this
    (press Ctrl-C again after a moment). Handlers can only be set from the main thread;
    elsewhere this does nothing.

    `install` sets them once per process: launch/train.py does so before its slow imports
    and start-up, so a signal then is kept, not fatal, and the run stops cleanly after its
    first step (a requeue trap sees exit 0); the loop uses the same instance. Each install
    is paired with a `release`, except the entry script's: it keeps the handlers to the
    process's end, so a signal during shut-down, after the run completed and saved, does
    not kill it with the signal's status (in-process callers such as tests get their own
    handlers back when the loop releases).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    DUPLICATE_WINDOW_S = 2.0

    def __init__(self):
        self.requested: str | None = None
        self.received: dict[str, tuple[float, int]] = {}  # signal -> (first arrival, times received)
        self.previous = {}
        self.users = 0  # installs not yet released
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        name, now = signal.Signals(signum).name, time.monotonic()
        first, times = self.received.get(name, (now, 0))
        self.received[name] = (first, times + 1)
        if times and (now - first > self.DUPLICATE_WINDOW_S or times >= 2):  # asked again: stop now
            self.restore()
            signal.raise_signal(signum)
            return
        self.requested = self.requested or name

    @classmethod
    def install(cls) -> "Preemption":
        """This process's handlers: the ones installed before, if they still are, else new ones."""
        global _installed
        if _installed is None or not _installed.previous:
            _installed = cls()
        _installed.users += 1
        return _installed

    def release(self):
        """One install done with: the handlers from before come back when no install holds them."""
        self.users -= 1
        if self.users <= 0:
            self.restore()

    def restore(self):
        global _installed
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}
        if _installed is self:
            _installed = None


_installed: Preemption | None = None
