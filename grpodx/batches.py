"""Book-keeping of every scheduled group, from dispatch to the learner, exactly once.

A group (ticket) is *dispatched* to a worker, then either *finished* (its trajectories arrived) or
*failed* (its worker died or left the cluster). A failed group is dispatched again, up to
``max_attempts`` times, then recorded as *lost*. The first result of a ticket is kept; any later one
(a worker thought dead that answers after all, a retried copy) is a *duplicate*, counted and dropped,
so no group is trained twice. A result is a reference to the group's trajectories in Ray's object store;
one whose object is lost before the learner reads it fails its group like a lost worker. Batch ``s``
is tickets ``[s * B, (s + 1) * B)`` (see :mod:`grpodx.staleness`) and is complete when each of them is
finished or lost.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TicketRecord:
    attempts: int = 0
    worker_id: str | None = None
    result: Any = None
    finished: bool = False
    lost: bool = False
    handed_over: bool = False


@dataclass
class BatchBook:
    batch_size: int
    first_ticket: int = 0
    max_attempts: int = 3
    next_ticket: int = field(init=False)
    tickets: dict[int, TicketRecord] = field(default_factory=dict, init=False)
    retry_queue: deque[int] = field(default_factory=deque, init=False)
    duplicates: int = field(default=0, init=False)
    retried: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.first_ticket % self.batch_size:
            raise ValueError("first_ticket must start a batch")
        self.next_ticket = self.first_ticket

    # ---- events -----------------------------------------------------------------------------------
    def on_new_ticket(self) -> int:
        ticket = self.next_ticket
        self.next_ticket += 1
        self.tickets[ticket] = TicketRecord()
        return ticket

    def on_group_dispatched(self, ticket: int, worker_id: str) -> None:
        record = self.tickets[ticket]
        record.attempts += 1
        record.worker_id = worker_id

    def on_group_finished(self, ticket: int, result: Any) -> bool:
        """Keep the first result of a ticket; False (and counted) for a duplicate or a lost ticket."""
        record = self.tickets.get(ticket)
        if record is None or record.finished or record.lost:
            self.duplicates += 1
            return False
        record.finished, record.result = True, result
        return True

    def on_group_failed(self, ticket: int) -> bool:
        """The group's worker is gone: True if it goes back in the queue, False if it is now lost."""
        record = self.tickets.get(ticket)
        if record is None or record.finished or record.lost:
            return False
        if record.attempts >= self.max_attempts:
            record.lost = True
            return False
        self.retried += 1
        self.retry_queue.append(ticket)
        return True

    def on_result_lost(self, ticket: int) -> bool:
        """A finished group's trajectories were lost before the learner read them (the node holding
        them left the cluster): the group counts as failed, and goes out again if it may."""
        record = self.tickets.get(ticket)
        if record is None or not record.finished:
            return False
        record.finished = record.handed_over = False
        record.result = None
        return self.on_group_failed(ticket)

    def next_retry(self) -> int | None:
        """A failed ticket to dispatch again, skipping any whose result arrived after all."""
        while self.retry_queue:
            ticket = self.retry_queue.popleft()
            record = self.tickets.get(ticket)
            if record is not None and not (record.finished or record.lost):
                return ticket
        return None

    # ---- queries ----------------------------------------------------------------------------------
    def batch_tickets(self, batch: int) -> range:
        return range(batch * self.batch_size, (batch + 1) * self.batch_size)

    def is_batch_complete(self, batch: int) -> bool:
        return all(
            ticket in self.tickets and (self.tickets[ticket].finished or self.tickets[ticket].lost)
            for ticket in self.batch_tickets(batch)
        )

    def hand_over(self, batch: int) -> list[tuple[int, Any]]:
        """Finished results of ``batch`` not handed to the learner yet (each ticket at most once)."""
        ready = []
        for ticket in self.batch_tickets(batch):
            record = self.tickets.get(ticket)
            if record is not None and record.finished and not record.handed_over:
                record.handed_over = True
                ready.append((ticket, record.result))
        return ready

    def lost_in(self, batch: int) -> list[int]:
        return [t for t in self.batch_tickets(batch) if t in self.tickets and self.tickets[t].lost]

    def forget(self, batch: int) -> None:
        """Drop the records of a trained batch (their results live in Parquet now)."""
        for ticket in self.batch_tickets(batch):
            self.tickets.pop(ticket, None)
