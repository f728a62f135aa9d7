"""Leases: an image handed to one annotator is not handed to another until it is labeled or the lease expires.

MONAI Label answers every ``/activelearning/{strategy}`` request in the server process, so an in-memory book
with a lock is enough: strategies choose and lease under the same lock, so two annotators asking at the same
moment get different images. Leases do not survive a restart (the worst case is one image shown twice).
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional


@dataclass(frozen=True)
class Lease:
    image_id: str
    client_id: str
    strategy: str
    since: float
    expires: float

    def state(self, now: Optional[float] = None) -> Dict[str, object]:
        """What clients see: who holds the image and for how much longer."""
        now = time.time() if now is None else now
        return {
            "client_id": self.client_id,
            "strategy": self.strategy,
            "since": round(self.since, 3),
            "expires": round(self.expires, 3),
            "expires_in": round(max(0.0, self.expires - now), 1),
        }


def anonymous_client() -> str:
    """Id for a request without ``client_id``: its lease is its own and replaces no other."""
    return f"anonymous-{uuid.uuid4().hex[:8]}"


class LeaseBook:
    """Leases by image id; expired leases vanish on the next look. A client holds at most one lease: asking for
    the next image gives back the one it had (it was skipped), so it does not stay locked for ``seconds``."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.time):
        self.seconds = float(seconds)
        self.clock = clock
        self.lock = threading.RLock()
        self._leases: Dict[str, Lease] = {}

    def active(self) -> Dict[str, Lease]:
        """Unexpired leases by image id."""
        with self.lock:
            now = self.clock()
            for image_id in [i for i, lease in self._leases.items() if lease.expires <= now]:
                del self._leases[image_id]
            return dict(self._leases)

    def take(self, image_id: str, client_id: str, strategy: str) -> Lease:
        """Lease ``image_id`` to ``client_id`` (releasing the client's previous lease). Call under ``lock`` together
        with the choice of the image, so that no other request can choose it in between."""
        with self.lock:
            self.release_client(client_id)
            now = self.clock()
            lease = Lease(image_id, client_id, strategy, now, now + self.seconds)
            self._leases[image_id] = lease
            return lease

    def release(self, image_id: str, client_id: Optional[str] = None) -> Optional[Lease]:
        """End the lease of ``image_id`` (only if ``client_id`` holds it, when given)."""
        with self.lock:
            lease = self._leases.get(image_id)
            if lease is None or (client_id is not None and lease.client_id != client_id):
                return None
            return self._leases.pop(image_id)

    def release_client(self, client_id: str) -> List[Lease]:
        with self.lock:
            mine = [i for i, lease in self._leases.items() if lease.client_id == client_id]
            return [self._leases.pop(i) for i in mine]

    def __iter__(self) -> Iterator[Lease]:
        return iter(self.active().values())
