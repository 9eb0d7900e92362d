"""A learner with no model: the time a GPU learner takes, and an adapter of a given size.

For benchmarks and tests of the orchestrator at cluster scale (``engine.kind: simulated``). It has the
calls of :class:`grpodx.learner.Learner` that the orchestrator and the learner actor make
(``accumulate``, ``step``, ``train_step``, ``adapter``, ``version``, ``save``, ``load``) and does what
costs the cluster time besides the arithmetic: it reads the groups' Arrow batches, sleeps
``learner_token_s`` per token of every valid episode it accumulates and ``learner_step_s`` per step,
and publishes an adapter of ``adapter_mib`` whose bytes change with every version, so that a weight
push moves as many bytes as a real one. Its checkpoint is its version alone (a simulated run is not
resumed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from grpodx.config import Config
from grpodx.data.trajectory import as_table
from grpodx.engines.base import AdapterWeights

STATE_FILE = "simulated_learner.json"
ADAPTER_TENSOR = "simulated.lora_weights"


class SimulatedLearner:
    def __init__(self, config: Config):
        self.simulation = config.simulation
        self.version = 0
        self._weights = np.zeros(int(self.simulation.adapter_mib * 2**20), dtype=np.uint8)
        self._pending = self._new_pending()

    @staticmethod
    def _new_pending() -> dict[str, float]:
        return {"tokens": 0.0, "doctor_tokens": 0.0, "sequences": 0.0, "seconds": 0.0, "groups": 0.0}

    def train_step(self, batches: list[pa.RecordBatch] | pa.Table) -> dict[str, float]:
        self.accumulate(batches)
        return self.step()

    def accumulate(self, batches: list[pa.RecordBatch] | pa.Table | pa.RecordBatch) -> dict[str, float]:
        """Read the groups' episodes and sleep as long as their forward and backward passes would take."""
        started = time.perf_counter()
        table = as_table(batches)
        valid = table.filter(pc.field("valid"))
        tokens = int(pc.sum(pc.list_value_length(valid["token_ids"])).as_py() or 0)
        doctor_tokens = int(pc.sum(pc.list_flatten(valid["loss_mask"])).as_py() or 0)
        time.sleep(self.simulation.learner_token_s * tokens)
        pending = self._pending
        pending["tokens"] += tokens
        pending["doctor_tokens"] += doctor_tokens
        pending["sequences"] += valid.num_rows
        pending["groups"] += len(pc.unique(table["group_id"]))
        seconds = time.perf_counter() - started
        pending["seconds"] += seconds
        return {"learner/accumulate_seconds": seconds, "learner/pending_sequences": pending["sequences"]}

    def step(self) -> dict[str, float]:
        """Sleep one optimizer step; the adapter becomes version N + 1 (its bytes change)."""
        started = time.perf_counter()
        pending, self._pending = self._pending, self._new_pending()
        time.sleep(self.simulation.learner_step_s)
        self.version += 1
        self._weights.fill(self.version % 256)
        return {
            "learner/tokens": pending["doctor_tokens"],
            "learner/sequences": pending["sequences"],
            "learner/positions": pending["tokens"],
            "learner/seconds": pending["seconds"] + time.perf_counter() - started,
            "groups/total": pending["groups"],
        }

    def adapter(self, copy: bool = True) -> AdapterWeights:
        """The adapter's bytes; ``copy=False`` gives the live array to a caller that copies it at once
        (``ray.put`` in the learner actor), as :meth:`grpodx.learner.Learner.adapter` does."""
        return AdapterWeights(
            version=self.version,
            state_dict={ADAPTER_TENSOR: self._weights.copy() if copy else self._weights},
            peft_config={"simulated": True},
        )

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / STATE_FILE).write_text(json.dumps({"version": self.version, "simulated": True}))

    def load(self, directory: str | Path) -> None:
        state_file = Path(directory) / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(
                f"{directory} holds no {STATE_FILE}: not a simulated learner's checkpoint"
            )
        self.version = int(json.loads(state_file.read_text())["version"])
