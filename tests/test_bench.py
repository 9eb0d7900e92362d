"""The benchmark suite: its arithmetic by hand, and smoke runs at the smallest sizes (files written,
figures positive, ratios consistent with their parts). Speed is not tested here."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from grpodx.bench import REGISTRY, select
from grpodx.bench.core import BenchContext, fmt, is_stat, ratio_stat, stat
from grpodx.bench.learner import phi_shaped_row, synthetic_trajectories
from grpodx.bench.overhead import RecordedCall, turn_rounds
from grpodx.bench.rollout_api import api_calls
from grpodx.bench.weight_push import PACKED, PHI4_SHAPES, PICKLED, phi_lora_shapes
from grpodx.cli import app
from grpodx.engines.base import SamplingParams


def small_overrides(model_dir) -> list[str]:
    return [
        f"model.name={model_dir}",
        "episode.max_turns=2",
        "episode.sampling.max_new_tokens=8",
        "grpo.num_generations=2",
        "lora.rank=4",
    ]


# ---- arithmetic ----------------------------------------------------------------------------------
def test_stat_and_ratio():
    s = stat([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    r = ratio_stat([2.0, 9.0], [1.0, 3.0])  # per-repeat ratios 2 and 3
    assert r["values"] == [2.0, 3.0] and r["median"] == 2.5
    assert fmt(s) == "2.00 [1.00–3.00]" and fmt(stat([0.5])) == "0.5" and fmt(None) == "–"
    with pytest.raises(ValueError):
        ratio_stat([1.0], [1.0, 2.0])


def test_api_calls_per_episode():
    # A diagnosis at turn 3: two patient replies, one judge call.
    assert api_calls({"turns": 3, "diagnosis": "Influenza"}, max_turns=5) == (2, 1)
    # No diagnosis within the 5 turns: four replies, and no judge call (nothing to score).
    assert api_calls({"turns": 5, "diagnosis": None}, max_turns=5) == (4, 0)
    # Stopped early by the token budget after 2 turns: the reply to turn 2 was asked for.
    assert api_calls({"turns": 2, "diagnosis": None}, max_turns=5) == (2, 0)


def test_phi4_lora_size():
    shapes = phi_lora_shapes(PHI4_SHAPES, rank=16)
    assert len(shapes) == 40 * 4 * 2
    # Per layer: qkv 16·(5120 + 7680), o 16·(5120 + 5120), gate_up 16·(5120 + 35840), down 16·(17920 + 5120).
    per_layer = 16 * ((5120 + 7680) + (5120 + 5120) + (5120 + 35840) + (17920 + 5120))
    assert sum(a * b for a, b in shapes.values()) == 40 * per_layer == 55_705_600


def test_phi4_lora_shapes_match_peft():
    """The synthetic adapter has the names and shapes peft gives a LoRA on a Phi-4-shaped model."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from grpodx.bench.learner import PHI4_MODEL, random_phi_model

    model = random_phi_model(PHI4_MODEL, torch.bfloat16, "meta")  # shapes only, no memory
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    with torch.device("meta"):
        peft_model = get_peft_model(model, LoraConfig(r=16, target_modules=targets, task_type="CAUSAL_LM"))
    state = get_peft_model_state_dict(peft_model)
    assert {name: tuple(t.shape) for name, t in state.items()} == phi_lora_shapes(PHI4_SHAPES, rank=16)


def test_turn_rounds_group_calls_by_episode_turn():
    def call(seed):
        return RecordedCall([1, 2], SamplingParams(seed=seed), 0, 3)

    calls = [call(1), call(2), call(1), call(3), call(2), call(1)]
    rounds = turn_rounds(calls)
    assert [[c.sampling.seed for c in r] for r in rounds] == [[1, 2, 3], [1, 2], [1]]


def test_registry_names_and_selection():
    names = [b.name for b in REGISTRY]
    assert len(set(names)) == len(names)
    ours = ["rollout_api", "weight_push", "overhead", "learner"]  # others may sit between them
    assert [name for name in names if name in ours] == ours
    assert [b.name for b in select(["learner", "overhead"])] == ["overhead", "learner"]
    with pytest.raises(ValueError, match="unknown benchmark nope"):
        select(["nope"])


def test_synthetic_trajectories_train(small_model_dir):
    """The learner takes the synthetic table (the GPU path's data), and a random Phi-shaped model."""
    ctx = BenchContext(None, small_overrides(small_model_dir), scale="smoke", repeats=1)
    shapes = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 128,
        "max_position_embeddings": 256,
    }
    table = synthetic_trajectories(2, 2, 32, vocab_size=128)
    assert sum(sum(m) for m in table.column("loss_mask").to_pylist()) == 2 * 2 * 16
    row = phi_shaped_row(ctx, "cpu", shapes=shapes)
    assert row["doctor_tokens"] > 0 and row["step_s"]["median"] > 0
    per_second = row["doctor_tokens"] / row["step_s"]["median"]
    assert row["doctor_tokens_per_s"]["median"] == pytest.approx(per_second)


# ---- smoke runs ----------------------------------------------------------------------------------
def _run_cli(args: list[str]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def _report(out_dir) -> dict:
    report = json.loads((out_dir / "bench.json").read_text())
    markdown = (out_dir / "bench.md").read_text()
    assert report["command"] and report["machine"]["cpu_count"] >= 1
    assert "torch" in report["machine"]["versions"]
    assert report["failed"] == []
    for entry in report["benchmarks"]:
        assert f"## {entry['name']}: " in markdown
        assert entry["rows"], entry["name"]
    return {entry["name"]: entry for entry in report["benchmarks"]}


def _positive(value) -> float:
    median = value["median"] if is_stat(value) else value
    assert median > 0
    if is_stat(value):
        assert value["min"] <= median <= value["max"] and all(v > 0 for v in value["values"])
    return median


def test_offline_benchmarks_smoke(small_model_dir, tmp_path):
    out = tmp_path / "bench"
    args = ["bench", "--smoke", "--only", "overhead,learner", "--out", str(out)]
    _run_cli(args + small_overrides(small_model_dir))
    entries = _report(out)
    assert list(entries) == ["overhead", "learner"]

    worker, engine = entries["overhead"]["rows"]
    assert worker["doctor_tokens"] == engine["doctor_tokens"] > 0
    ratio = _positive(worker["ratio"])
    assert ratio == pytest.approx(_positive(worker["tokens_per_s"]) / _positive(engine["tokens_per_s"]))

    (row,) = entries["learner"]["rows"]
    assert 0 < row["doctor_tokens"] <= row["all_tokens"]
    step = _positive(row["step_s"])
    assert _positive(row["doctor_tokens_per_s"]) == pytest.approx(row["doctor_tokens"] / step)
    parts = sum(row[key]["median"] for key in ("forward_s", "reference_forward_s", "backward_s", "other_s"))
    assert parts == pytest.approx(step, rel=1e-6)
    # Each phase is really timed (the learner calls the decoder and the output layer itself).
    assert all(row[key]["median"] > 0 for key in ("forward_s", "reference_forward_s", "backward_s"))
    assert row["peak_mib"] > 0


@pytest.mark.slow
def test_ray_benchmarks_smoke(small_model_dir, tmp_path):
    out = tmp_path / "bench"
    _run_cli(
        ["bench", "--smoke", "--only", "rollout_api", "--only", "weight_push", "--out", str(out)]
        + small_overrides(small_model_dir)
    )
    entries = _report(out)

    rows = entries["rollout_api"]["rows"]
    naive = rows[0]
    assert naive["design"].startswith("naive") and naive["speedup"]["median"] == 1.0
    assert {(r["workers"], r["concurrency"]) for r in rows[1:]} == {(1, 1), (1, 2), (2, 1), (2, 2)}
    for row in rows:
        assert row["failed"] == 0
        rate, calls = _positive(row["episodes_per_s"]), _positive(row["api_calls_per_episode"])
        ideal = _positive(row["ideal_episodes_per_s"])
        assert ideal == pytest.approx(row["workers"] * row["concurrency"] / (calls * 0.3))
        assert row["share_of_ideal"]["median"] == pytest.approx(rate / ideal)
        assert row["speedup"]["median"] == pytest.approx(rate / naive["episodes_per_s"]["median"])

    rows = entries["weight_push"]["rows"]
    assert {r["adapter"].split(" (")[0] for r in rows} == {"tiny doctor", "Phi-4 LoRA r16 size"}
    for row in rows:
        push = _positive(row["push_s"])
        assert row["first_part_s"]["median"] + row["second_part_s"]["median"] == pytest.approx(push)
        assert row["push_over_copy"]["median"] == pytest.approx(push / _positive(row["copy_s"]))
    big = [r for r in rows if r["adapter"].startswith("Phi-4")]
    assert all(r["params"] == 55_705_600 for r in big)
    assert torch.bfloat16.itemsize * 55_705_600 / 2**20 == pytest.approx(big[0]["mib"])
    # The packed path and the pickled baseline side by side, at each worker count; packing timed apart.
    assert {(r["path"], r["workers"]) for r in big} == {
        (path, workers) for path in (PACKED, PICKLED) for workers in (1, 2)
    }
    for row in big:
        if row["path"] == PACKED:
            total = _positive(row["pack_s"]) + row["push_s"]["median"]
            assert row["with_pack_over_copy"]["median"] == pytest.approx(total / row["copy_s"]["median"])
        else:
            assert row["pack_s"] is None and row["with_pack_over_copy"] is None
