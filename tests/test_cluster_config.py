"""cluster/config.yaml passes Ray's own cluster-config validation and fits configs/phi4.yaml's actors.

Ray's validator is the one `ray up` runs (``prepare_config`` then ``validate_config`` against
``ray/autoscaler/ray-schema.json``), without the cloud look-ups `ray up` adds: no network here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from grpodx.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_CONFIG = ROOT / "cluster" / "config.yaml"
PHI4_CONFIG = ROOT / "configs" / "phi4.yaml"


def _cluster() -> dict:
    return yaml.safe_load(CLUSTER_CONFIG.read_text())


def _validate(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _node_types_with(resource: str, node_types: dict) -> list[str]:
    return [name for name, node in node_types.items() if node["resources"].get(resource, 0) > 0]


def test_ray_validates_the_cluster_config():
    prepared = _validate(_cluster())
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _misspelt_top_level_key(config):
    config["max_worker"] = config.pop("max_workers")


def _fractional_custom_resource(config):
    config["available_node_types"]["rollout_gpu"]["resources"]["rollout"] = 0.5


def _head_type_missing(config):
    config["head_node_type"] = "no_such_type"


def _min_workers_above_the_cluster_max(config):
    config["available_node_types"]["rollout_gpu"]["min_workers"] = config["max_workers"] + 1


def _node_type_without_resources(config):
    del config["available_node_types"]["learner_gpu"]["resources"]


@pytest.mark.parametrize(
    ("breakage", "complaint"),
    [
        (_misspelt_top_level_key, "'max_worker' was unexpected"),
        (_fractional_custom_resource, "is not of type 'integer'"),
        (_head_type_missing, "`head_node_type` must be one of"),
        (_min_workers_above_the_cluster_max, "smaller than the sum of `min_workers`"),
        (_node_type_without_resources, "'resources' is a required property"),
    ],
)
def test_ray_rejects_a_broken_copy(breakage, complaint):
    broken = _cluster()
    breakage(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)) as raised:
        _validate(broken)
    assert complaint in str(raised.value)


@pytest.fixture(scope="module")
def node_types() -> dict:
    return _validate(_cluster())["available_node_types"]


@pytest.fixture(scope="module")
def ray_config():
    return load_config(PHI4_CONFIG).ray


@pytest.mark.parametrize("role", ["learner", "rollout"])
def test_each_actor_fits_exactly_its_node_type(role, node_types, ray_config):
    requested = getattr(ray_config, f"{role}_resources")
    num_gpus = getattr(ray_config, f"{role}_num_gpus")
    num_cpus = getattr(ray_config, f"{role}_num_cpus")
    assert requested, f"configs/phi4.yaml sets no ray.{role}_resources"
    intended = f"{role}_gpu"
    for resource, amount in requested.items():
        assert _node_types_with(resource, node_types) == [intended], resource
        assert node_types[intended]["resources"][resource] >= amount
    offered = node_types[intended]["resources"]
    assert num_gpus >= 1 and offered.get("GPU", 0) >= num_gpus
    assert offered.get("CPU", 0) >= num_cpus


def test_the_head_carries_neither_actor_resource(node_types, ray_config):
    head = node_types[_validate(_cluster())["head_node_type"]]
    for resource in (*ray_config.learner_resources, *ray_config.rollout_resources):
        assert resource not in head["resources"]
    assert head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0


def test_worker_counts(node_types, ray_config):
    cluster = _cluster()
    learner, rollout = node_types["learner_gpu"], node_types["rollout_gpu"]
    assert learner["min_workers"] == learner["max_workers"] == 1
    assert 0 <= rollout["min_workers"] <= rollout["max_workers"]
    assert cluster["max_workers"] >= learner["max_workers"] + rollout["max_workers"]
    # num_rollout_workers: auto puts one worker per rollout bundle (its custom resources, GPUs and CPUs);
    # a rollout node holds exactly one, and the autoscaler request fits in max_workers.
    assert ray_config.num_rollout_workers == "auto"
    bundle = {
        **ray_config.rollout_resources,
        "GPU": ray_config.rollout_num_gpus,
        "CPU": ray_config.rollout_num_cpus,
    }
    bundles_per_node = min(rollout["resources"].get(name, 0) // amount for name, amount in bundle.items())
    assert bundles_per_node == 1
    assert ray_config.request_rollout_workers <= rollout["max_workers"] * bundles_per_node


def test_every_node_installs_the_project_with_the_gpu_extra():
    cluster = _cluster()
    assert cluster["file_mounts"]["~/grpodx"] == "."
    install = [command for command in cluster["setup_commands"] if "pip install" in command]
    assert install and all('".[gpu]"' in command and "cd ~/grpodx" in command for command in install)
    assert "Status:" not in CLUSTER_CONFIG.read_text()


def test_every_node_requires_the_synced_ray_token():
    cluster = _cluster()
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [command for command in cluster[key] if "ray start" in command]
        assert "RAY_AUTH_MODE=token" in start, key
