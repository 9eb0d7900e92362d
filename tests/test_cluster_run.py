"""Training on a multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``).

The head node runs the driver, the learner and the patient/judge workers; rollout nodes carry the
custom resource ``rollout``, as the node types of cluster/config.yaml do, and
``ray.num_rollout_workers: auto`` keeps one worker per rollout node. One run gains a rollout node
mid-run, one loses a node while it has groups in flight.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import ray
from ray.cluster_utils import Cluster

from grpodx.config import load_config
from grpodx.orchestrator import Orchestrator
from grpodx.scheduler import group_id
from tests.conftest import small_run_settings

pytestmark = pytest.mark.slow

# Fast node-death detection, so a removed node is noticed within a second or two.
SYSTEM_CONFIG = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
}


@pytest.fixture
def cluster():
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 3,
            "resources": {"learner": 1},  # the learner stays here, as on learner_gpu in cluster/config.yaml
            "include_dashboard": False,
            "_system_config": SYSTEM_CONFIG,
        },
    )
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _config(model_dir, run_dir, name, max_steps):
    settings = [
        f"train.max_steps={max_steps}",
        f"train.save_steps={max_steps}",
        "train.batch_size=4",
        "ray.num_rollout_workers=auto",
        "ray.rollout_resources={rollout: 1}",
        "ray.learner_resources={learner: 1}",
        "ray.rescale_interval_s=0.5",
        "ray.worker_start_timeout_s=120",
    ]
    return load_config(None, small_run_settings(model_dir, run_dir, name, *settings))


def _rollout_node(cluster):
    return cluster.add_node(num_cpus=1, resources={"rollout": 1})


def test_a_rollout_node_that_joins_gets_a_worker_whose_groups_reach_the_learner(
    cluster, small_model_dir, tmp_path
):
    _rollout_node(cluster)
    joined_after: list[int] = []

    def add_node_at_step_2(step, metrics):
        if step == 2:
            _rollout_node(cluster)
            joined_after.append(step)
        starting = [slot for slot in orchestrator.actors.pool.slots.values() if not slot.ready]
        if step > 2 and starting:
            # Steps of this tiny model take a fraction of a second while an actor takes seconds to
            # start on a busy 2-core machine: hold this step until Ray has built the newcomer's actor.
            # Noticing the node, starting the worker, loading the adapter and sending it groups stay
            # the pool's own work.
            ray.get(starting[0].handle.adapter_versions.remote(), timeout=120)

    orchestrator = Orchestrator(
        _config(small_model_dir, tmp_path, "grow", 8), progress=False, on_step_end=add_node_at_step_2
    )
    result = orchestrator.train()
    events = list(orchestrator.actors.pool.events)
    orchestrator.shutdown()
    assert result.steps == 8 and joined_after == [2]
    frame = pd.read_parquet(tmp_path / "grow" / "trajectories")
    assert frame["group_id"].nunique() == 8 * 4 and len(frame) == 8 * 4 * 2
    workers = frame.groupby("worker_id")["step"].min().to_dict()
    assert set(workers) == {"rollout-0", "rollout-1"}, events
    assert workers["rollout-0"] == 1 and workers["rollout-1"] > 2  # the newcomer started after the join
    lines = [json.loads(line) for line in (tmp_path / "grow" / "metrics.jsonl").read_text().splitlines()]
    assert [line["workers/ready"] for line in lines][0] == 1
    assert lines[-1]["workers/ready"] == 2 and lines[-1]["workers/desired"] == 2


def test_a_rollout_node_that_leaves_loses_no_group_and_trains_none_twice(cluster, small_model_dir, tmp_path):
    nodes = {}
    for _ in range(2):
        node = _rollout_node(cluster)
        nodes[node.node_id] = node
    removed: list[str] = []
    unfinished: list[int] = []

    def remove_a_busy_node(step, metrics):
        if removed or step < 2:
            return
        busy = [slot for slot in orchestrator.actors.pool.ready_slots() if slot.groups_in_flight > 0]
        if not busy:
            return  # try again after the next step
        node_id = ray.get(busy[0].handle.node_id.remote())
        # Its groups not yet back at the driver: each must end up trained once (re-run elsewhere, or
        # its result delivered just before the node went) or reported lost.
        unfinished.extend(
            ticket
            for ticket, record in orchestrator.scheduler.book.tickets.items()
            if record.worker_id == busy[0].worker_id and not record.finished
        )
        cluster.remove_node(nodes[node_id], allow_graceful=False)
        removed.append(busy[0].worker_id)

    config = _config(small_model_dir, tmp_path, "shrink", 8)
    config.train.max_staleness = 1  # keeps groups in flight on both workers while the learner steps
    # Longer turns, so that a group counted in flight is still generating when its node goes (with
    # 6-token turns it could finish in the moment between the count and the removal).
    config.episode.sampling.max_new_tokens = 48
    orchestrator = Orchestrator(config, progress=False, on_step_end=remove_a_busy_node)
    result = orchestrator.train()
    events = list(orchestrator.actors.pool.events)
    orchestrator.shutdown()
    assert result.steps == 8 and len(removed) == 1, events
    assert f"lost {removed[0]}" in events
    frame = pd.read_parquet(tmp_path / "shrink" / "trajectories")
    lines = [json.loads(line) for line in (tmp_path / "shrink" / "metrics.jsonl").read_text().splitlines()]
    lost = sum(line["groups/lost"] for line in lines)
    # Every scheduled group is trained exactly once or reported lost, and none twice.
    assert frame.groupby("group_id").size().eq(2).all()
    assert frame["group_id"].nunique() + lost == 8 * 4
    rerun = 0
    for ticket in unfinished:
        group = frame[frame["group_id"] == group_id(ticket // 4 + 1, ticket % 4)]
        assert len(group) in (0, 2)  # trained once, or lost (counted above)
        rerun += int(len(group) == 2 and removed[0] not in set(group["worker_id"]))
    assert lines[-1]["groups/retried_total"] >= rerun
    assert lines[-1]["workers/ready"] == 1
    # After the removal only the surviving worker generates.
    last_steps = frame[frame["step"] == 8]
    assert removed[0] not in set(last_steps["worker_id"])
