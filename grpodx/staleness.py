"""The bounded-staleness rule: when may a group start?

Groups are numbered in the order they are scheduled (their *ticket*). Ticket ``n`` belongs to batch
``n // batch_size`` and is trained in step ``n // batch_size + 1``, by the learner at version
``n // batch_size``. A group starts on the newest adapter version ``v`` published when it is dispatched
(or newer), so its staleness when trained is ``n // batch_size - v``. The whole policy is one rule:

    a group may start only while  n // batch_size - published_version <= max_staleness,
    i.e. while  n < (published_version + max_staleness + 1) * batch_size.

``max_staleness = 0`` is strictly on-policy: batch s starts only once version s is published, so
generation waits for the learner and the learner for generation. Each unit of staleness lets the
workers run one batch ahead of the learner. Because the learner trains groups by ticket (batch s is
exactly tickets ``[s * B, (s + 1) * B)``, whatever order they finish in), no group is ever trained more
than ``max_staleness`` versions behind its start: finishing late cannot push a group into a later batch.
The same count is the pipeline's backpressure: at most ``(max_staleness + 1) * batch_size`` groups are
running or waiting for the learner at any time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StalenessGate:
    max_staleness: int
    batch_size: int

    def __post_init__(self) -> None:
        if self.max_staleness < 0 or self.batch_size < 1:
            raise ValueError("max_staleness must be >= 0 and batch_size >= 1")

    def batch_of(self, ticket: int) -> int:
        """The batch (0-based) a ticket belongs to; it is trained by the learner at this version."""
        return ticket // self.batch_size

    def may_start(self, ticket: int, published_version: int) -> bool:
        return self.batch_of(ticket) - published_version <= self.max_staleness

    def staleness(self, batch: int, start_version: int) -> int:
        """Versions between the adapter an episode (or turn) of ``batch`` started on and the learner
        version that trains the batch; :meth:`may_start` keeps it at most ``max_staleness``."""
        return batch - start_version

    def oldest_version_in_use(self, newest_version: int) -> int:
        """The oldest adapter a group may still run on once ``newest_version`` is out: groups start on
        the newest version published when they are dispatched, and none is dispatched more than
        ``max_staleness`` versions ahead, so older adapters can be dropped by a rollout worker."""
        return newest_version - self.max_staleness
