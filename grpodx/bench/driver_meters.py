"""What a training run costs the driver, read from the driver's own process while the run goes on.

- :class:`DriverTraffic`: the bytes of every object the driver process *materialises* (deserialises:
  each awaited or fetched ``ObjectRef``, a group's record batch, the learner's metrics, a worker's
  answer) and *serialises* (each argument of a remote call it makes: a group's scenario, a record
  batch sent on to the learner), counted by the object's type as Ray's serialisation context sees
  them. An ``ObjectRef`` passed along (the published adapter) is neither: its bytes never enter the
  driver. Once groups travel to the learner by reference, their Arrow bytes leave both counts.
- :func:`session_cpu_seconds`: CPU seconds of the processes this driver started (the local Ray
  cluster's raylet, GCS and workers: Ray starts them as its descendants), by actor class.

Both hook into this process only. ``DriverTraffic`` wraps two of Ray's internals
(``Worker.deserialize_objects``, ``SerializationContext.serialize``); where a Ray version lacks them
it counts nothing and says so (``available``).
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from pathlib import Path

import pyarrow as pa

ARROW = "arrow"
OTHER = "other"
# Ray names an actor's process "ray::<Class>" (or "ray::<Class>.<method>" while it runs one).
ROLES = {
    "ray::RolloutActor": "rollout",
    "ray::PatientWorker": "patient",
    "ray::JudgeWorker": "judge",
    "ray::LearnerActor": "learner",
}


def _kind(value: object) -> str:
    return ARROW if isinstance(value, pa.RecordBatch | pa.Table) else OTHER


class DriverTraffic:
    """Bytes the driver process deserialises (``in``) and serialises (``out``) through Ray, by kind."""

    def __init__(self):
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.objects: dict[tuple[str, str], int] = defaultdict(int)
        self.available = False
        self._lock = threading.Lock()
        self._restore: list = []

    def snapshot(self) -> dict[str, int]:
        """``{"in_arrow": bytes, "in_other": ..., "out_arrow": ..., "out_other": ...}`` so far."""
        with self._lock:
            return {
                f"{direction}_{kind}": self.bytes[(direction, kind)]
                for direction in ("in", "out")
                for kind in (ARROW, OTHER)
            }

    def _count(self, direction: str, value: object, size: int) -> None:
        key = (direction, _kind(value))
        with self._lock:
            self.bytes[key] += size
            self.objects[key] += 1

    def __enter__(self) -> DriverTraffic:
        try:
            from ray._private import serialization, worker
        except ImportError:
            return self
        driver = worker.global_worker
        context = getattr(serialization, "SerializationContext", None)
        if not hasattr(driver, "deserialize_objects") or context is None or not hasattr(context, "serialize"):
            return self
        deserialize, serialize = driver.deserialize_objects, context.serialize
        meter = self

        def counted_deserialize(serialized_objects, object_refs, *args, **kwargs):
            values = deserialize(serialized_objects, object_refs, *args, **kwargs)
            for serialized, value in zip(serialized_objects, values, strict=False):
                data = serialized[0]
                meter._count("in", value, 0 if data is None else len(data))
            return values

        def counted_serialize(self, value):
            serialized = serialize(self, value)
            meter._count("out", value, int(getattr(serialized, "total_bytes", 0)))
            return serialized

        driver.deserialize_objects = counted_deserialize
        context.serialize = counted_serialize
        self._restore = [(driver, "deserialize_objects", None), (context, "serialize", serialize)]
        self.available = True
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in self._restore:
            if original is None:
                del owner.__dict__[name]  # the instance attribute; the class's method shows again
            else:
                setattr(owner, name, original)
        self._restore = []


def _processes() -> dict[int, tuple[int, str, float]]:
    """pid -> (parent pid, command line, CPU seconds) of every process we can read (Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # gone meanwhile
        # The process name (field 2) may hold spaces: the fields after it start past its ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        found[int(entry.name)] = (int(fields[1]), command, (int(fields[11]) + int(fields[12])) / ticks)
    return found


def session_cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of this process's descendants, by role (``rollout``, ``patient``, ``judge``,
    ``learner``, ``ray`` for the rest: raylet, GCS, idle workers); empty where /proc is not readable."""
    if not Path("/proc/self/stat").exists():
        return {}
    processes = _processes()
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (parent, _, _) in processes.items():
        children[parent].append(pid)
    totals: dict[str, float] = defaultdict(float)
    stack = list(children[os.getpid()])
    while stack:
        pid = stack.pop()
        stack.extend(children[pid])
        _, command, seconds = processes[pid]
        role = next((r for prefix, r in ROLES.items() if command.startswith(prefix)), "ray")
        totals[role] += seconds
    return dict(totals)
