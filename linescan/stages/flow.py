"""Whether the daemon is stopping or has failed: what a stage checks while it waits on a queue.

``service.Daemon`` owns the one ``Flow`` of a daemon: ``stop()`` sets ``stopping``, and a thread
that dies adds its exception to ``errors``. The stages only read them.
"""

from __future__ import annotations

import queue
import threading
from typing import TypeVar

T = TypeVar("T")


class Flow:
    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.errors: list[BaseException] = []  # appended by a thread that fails

    @property
    def failed(self) -> bool:
        return bool(self.errors)

    def put(self, q: queue.Queue[T], item: T, force: bool = False) -> bool:
        """Put, waking up regularly; with ``force`` it waits even while stopping."""
        while True:
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                if self.errors or (self.stopping.is_set() and not force):
                    return False
