"""The simulated cluster (engine.kind: simulated): the engine's time and token contract, the simulated
learner's contract (the Learner calls the orchestrator makes), a short real orchestrator run on
simulated GPUs, and the scaling benchmark's arithmetic and driver meters."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import ray

from grpodx.bench.driver_meters import DriverTraffic, session_cpu_seconds
from grpodx.bench.scaling import Setting, StepProbe, _staleness_rows, _worker_rows, reference_groups_per_s
from grpodx.config import ConfigError, load_config
from grpodx.dialogue import ChatCodec, parse_final_diagnosis, strip_reasoning
from grpodx.engines import create_engine
from grpodx.engines.base import AdapterWeights, SamplingParams
from grpodx.engines.simulated import JsonTokenizer, SimulatedEngine, light_chat_codec
from grpodx.env import make_judge, make_patient
from grpodx.env.episode import EpisodeRunner
from grpodx.medical.cases import CaseSampler
from grpodx.medical.knowledge import load_knowledge_base
from grpodx.models import doctor_source
from grpodx.simulated_learner import SimulatedLearner
from tests.conftest import actor_pid

SIMULATED = ["engine.kind=simulated", "simulation.tokens_per_turn=48", "simulation.doctor_turns=2"]


def _config(*extra: str):
    return load_config(None, [*SIMULATED, *extra])


@pytest.fixture(scope="module")
def chat() -> ChatCodec:
    return light_chat_codec(doctor_source(_config(), progress=False))


def _prompt(chat: ChatCodec, doctor_turns_before: int = 0) -> list[int]:
    ids = chat.message("system", "You are a doctor.") + chat.message("user", "I have a cough.")
    for _ in range(doctor_turns_before):
        ids += chat.generation_prompt() + chat.encode("Do you have a fever?") + [chat.im_end_id]
        ids += chat.message("user", "Yes.")
    return ids + chat.generation_prompt()


def _sampling(chat: ChatCodec, seed: int = 1, max_new_tokens: int = 96) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=(chat.im_end_id,), seed=seed)


# ---- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["simulation.doctor_turns=6"], "simulation.doctor_turns=6 is more than episode.max_turns=5"),
        (["simulation.tokens_per_turn=200"], "is more than episode.sampling.max_new_tokens=96"),
        (["simulation.engines_per_worker=4", "ray.episodes_per_worker=8"], "2 episodes per engine"),
        (["simulation.engine_step_s=-1"], "simulation.engine_step_s"),
        (["simulation.adapter_mib=-0.5"], "simulation.adapter_mib"),
    ],
)
def test_simulation_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _config(*overrides)


def test_engines_per_worker_needs_the_simulated_engine():
    with pytest.raises(ConfigError, match="only applies to engine.kind=simulated"):
        load_config(None, ["simulation.engines_per_worker=2"])
    assert load_config(None, []).simulation.engines_per_worker == 1  # the default config is untouched


def test_create_engine_builds_the_simulated_engine():
    config = _config()
    engine = create_engine(config, doctor_source(config, progress=False), "cpu")
    assert isinstance(engine, SimulatedEngine) and engine.loaded_versions() == [0]


# ---- the engine -----------------------------------------------------------------------------------
def test_light_tokenizer_gives_transformers_ids():
    from transformers import AutoTokenizer

    source = doctor_source(_config(), progress=False)
    light, full = JsonTokenizer(source), AutoTokenizer.from_pretrained(source)
    texts = [
        "<|im_start|>user<|im_sep|>I am a 40-year-old woman. I came in because of chest pain.<|im_end|>",
        "<reason>So far: fever yes.</reason> Final diagnosis: Influenza. Next steps: rapid test.",
    ]
    for text in texts:
        ids = light.encode(text)
        assert ids == full.encode(text, add_special_tokens=False)
        assert light.decode(ids) == full.decode(ids, skip_special_tokens=True)
    assert light.convert_tokens_to_ids("<|im_end|>") == full.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(ConfigError, match="tokenizer.json"):
        JsonTokenizer("/nonexistent/model")


async def test_scripted_turns_are_exact_length_and_end_with_a_diagnosis(chat):
    engine = SimulatedEngine(_config().simulation, chat)  # doctor_turns 2, 48 tokens, default costs ~0
    engine.step_s = engine.token_s = 0.0
    first = await engine.generate(_prompt(chat), _sampling(chat))
    assert len(first.token_ids) == len(first.logprobs) == 48 and first.finish_reason == "stop"
    assert first.token_ids[-1] == chat.im_end_id and all(-3.0 < lp < 0.0 for lp in first.logprobs)
    visible = strip_reasoning(chat.decode(first.token_ids))
    assert not visible.malformed and visible.visible.endswith("?") and "so far" not in visible.visible
    assert parse_final_diagnosis(visible.visible) is None
    last = await engine.generate(_prompt(chat, doctor_turns_before=1), _sampling(chat))
    assert parse_final_diagnosis(chat.decode(last.token_ids)) is not None
    # Seeded: the same request gives the same turn; another seed may choose another script line.
    again = await engine.generate(_prompt(chat), _sampling(chat))
    assert again.token_ids == first.token_ids and again.logprobs == first.logprobs
    cut = await engine.generate(_prompt(chat), _sampling(chat, max_new_tokens=10))
    assert len(cut.token_ids) == 10 and cut.finish_reason == "length"
    assert engine.tokens_generated == 48 * 3 + 10


def test_a_turn_too_short_for_the_script_is_refused(chat):
    with pytest.raises(ConfigError, match="simulation.tokens_per_turn=8 is too short"):
        SimulatedEngine(_config("simulation.tokens_per_turn=8").simulation, chat)


async def _timed(engine, chat, delays: list[float]) -> list[float]:
    """Seconds from the first request's start to each request's end; request i starts at delays[i]."""
    started = time.perf_counter()

    async def one(delay: float, seed: int) -> float:
        await asyncio.sleep(delay)
        await engine.generate(_prompt(chat), _sampling(chat, seed=seed))
        return time.perf_counter() - started

    return await asyncio.gather(*(one(delay, seed) for seed, delay in enumerate(delays)))


async def test_requests_overlap_in_one_batch_like_a_gpu(chat):
    # 48 tokens per turn; a decode step costs 10 ms + 5 ms per sequence in the batch.
    config = _config("simulation.engine_step_s=0.01", "simulation.engine_token_s=0.005")
    engine = SimulatedEngine(config.simulation, chat)
    (alone,) = await _timed(engine, chat, [0.0])
    assert 48 * 0.015 <= alone < 48 * 0.015 + 0.3
    # Eight at once share every step: 48 steps of 10 + 8 x 5 ms, not eight turns one after another.
    together = await _timed(engine, chat, [0.0] * 8)
    assert all(48 * 0.05 <= t < 48 * 0.05 + 0.4 for t in together)
    # A request that arrives mid-turn joins the running batch: 0.36 s alone (24 tokens of the first),
    # then both at 20 ms per step: the first ends after 24 more tokens (0.84 s), the second alone at
    # 15 ms per step for its last 24 (1.20 s). (A second request a little late ends the first a little
    # earlier: a third of its lateness.)
    first, second = await _timed(engine, chat, [0.0, 0.36])
    assert 0.80 <= first < 0.84 + 0.3 and 1.20 <= second < 1.20 + 0.3 and second > first


async def test_the_batch_is_capped_by_max_batch_size(chat):
    config = _config("simulation.engine_step_s=0.005", "simulation.engine_token_s=0.0")
    engine = SimulatedEngine(config.simulation, chat, max_batch_size=2)
    ends = sorted(await _timed(engine, chat, [0.0] * 4))
    one_turn = 48 * 0.005
    assert ends[1] < 2 * one_turn <= ends[2] < 2 * one_turn + 0.3  # two at a time


def test_adapters_are_copied_in_and_versioned(chat):
    engine = SimulatedEngine(_config().simulation, chat)
    weights = np.full(1000, 7, dtype=np.uint8)
    engine.load_adapter(AdapterWeights(1, {"w": weights}))
    weights[:] = 0  # the engine holds its own copy, as a GPU would
    assert engine._versions.weights[1]["w"].sum() == 7 * 1000 and engine.adapter_bytes_loaded == 1000
    assert engine.latest_version == 1 and engine.loaded_versions() == [0, 1]
    engine.unload_adapter(1)
    assert engine.loaded_versions() == [0]
    with pytest.raises(KeyError, match="version 3 is not loaded"):
        asyncio.run(engine.generate(_prompt(chat), _sampling(chat), adapter_version=3))
    with pytest.raises(ValueError, match="start at 1"):
        engine.load_adapter(AdapterWeights(0, {"w": weights}))


async def test_episodes_run_to_a_diagnosis_with_the_real_environment(chat):
    config = _config()
    kb = load_knowledge_base()
    engine = SimulatedEngine(config.simulation, chat)
    patient, judge = make_patient(config), make_judge(config)
    runner = EpisodeRunner(engine, chat, patient, judge, kb, config.episode, config.reward)
    case = CaseSampler.for_config(kb, config).case_at(0)
    results = await asyncio.gather(*(runner.run(case, 0, runner.sampling(seed)) for seed in range(8)))
    for result in results:
        assert result.valid and not result.truncated and result.turns == 2 and result.diagnosis
        assert result.num_doctor_tokens == 2 * 48 and result.malformed_turns == 0
        assert len(result.token_ids) == len(result.loss_mask) == len(result.logprobs)


# ---- the learner ----------------------------------------------------------------------------------
def _episodes(groups: int = 2, per_group: int = 2, length: int = 100, doctor: int = 40) -> pa.RecordBatch:
    from grpodx.data.trajectory import TRAJECTORY_SCHEMA

    rows = {field.name: [] for field in TRAJECTORY_SCHEMA}
    for index in range(groups * per_group):
        row = {field.name: None for field in TRAJECTORY_SCHEMA}
        row.update(
            group_id=f"g{index // per_group}",
            valid=index != 0,  # the first episode failed: not trained, not timed
            reward=0.5,
            token_ids=list(range(length)),
            loss_mask=[1] * doctor + [0] * (length - doctor),
            behaviour_logprobs=[-1.0] * length,
        )
        for name, value in row.items():
            rows[name].append(value)
    return pa.RecordBatch.from_pydict(rows, schema=TRAJECTORY_SCHEMA)


def test_simulated_learner_has_the_learner_calls_the_orchestrator_makes():
    from grpodx.learner import Learner

    for name in ("accumulate", "step", "train_step", "adapter", "save", "load"):
        assert list(inspect.signature(getattr(SimulatedLearner, name)).parameters) == list(
            inspect.signature(getattr(Learner, name)).parameters
        ), name


def test_simulated_learner_sleeps_per_token_and_step_and_publishes_sized_adapters(tmp_path):
    config = _config(
        "simulation.learner_token_s=0.001", "simulation.learner_step_s=0.2", "simulation.adapter_mib=2"
    )
    learner = SimulatedLearner(config)
    started = time.perf_counter()
    metrics = learner.accumulate(_episodes())  # 3 valid episodes of 100 positions
    assert 0.3 <= time.perf_counter() - started < 0.3 + 0.2
    assert metrics["learner/pending_sequences"] == 3
    started = time.perf_counter()
    step = learner.step()
    assert 0.2 <= time.perf_counter() - started < 0.2 + 0.2
    assert learner.version == 1 and step["learner/tokens"] == 3 * 40 and step["learner/positions"] == 300
    assert step["learner/sequences"] == 3 and step["groups/total"] == 2 and step["learner/seconds"] >= 0.5
    first = learner.adapter()
    assert first.version == 1 and first.state_dict["simulated.lora_weights"].nbytes == 2 * 2**20
    learner.train_step([_episodes(1)])
    second = learner.adapter(copy=False)
    name = "simulated.lora_weights"
    assert second.version == 2 and first.state_dict[name][0] != second.state_dict[name][0]  # new bytes
    learner.save(tmp_path)
    fresh = SimulatedLearner(config)
    fresh.load(tmp_path)
    assert fresh.version == 2
    with pytest.raises(FileNotFoundError, match="not a simulated learner's checkpoint"):
        fresh.load(tmp_path / "missing")


# ---- the benchmark's arithmetic -------------------------------------------------------------------
def _sample(step, wall, cpu, arrow_in, episodes=8, roles=None, **extra):
    traffic = {"in_arrow": arrow_in, "in_other": 100 * step, "out_arrow": arrow_in, "out_other": 50 * step}
    sample = {
        "step": step,
        "wall": wall,
        "cpu": cpu,
        "loop": cpu / 2,
        "traffic": traffic,
        "roles": roles or {},
        "episodes": episodes,
        "failed": 0.0,
        "push_s": 0.1,
        "learner_s": 0.5,
        "staleness_max": 1.0,
    }
    return {**sample, **extra}


def test_step_probe_figures_by_hand():
    probe = StepProbe(DriverTraffic())
    probe.samples = [
        _sample(1, 10.0, 1.0, 0),  # cold start: left out
        _sample(2, 12.0, 1.2, 2**20, roles={"rollout": 5.0, "patient": 1.0}),  # started with step 1
        _sample(3, 13.0, 1.3, 2 * 2**20),
        _sample(4, 16.0, 1.6, 3 * 2**20, roles={"rollout": 5.4, "patient": 1.2}),
    ]
    figures = probe.figures()
    # Steps 3 and 4 counted: 2 steps, 16 episodes = 4 groups in 4 s.
    assert figures["steps"] == 2 and figures["groups"] == 4 and figures["step_s"] == 2.0
    assert figures["groups_per_s"] == 1.0
    assert figures["driver_ms"] == pytest.approx(400 / 4) and figures["loop_ms"] == pytest.approx(200 / 4)
    assert figures["arrow_in_mib"] == 1.0 and figures["in_mib"] == pytest.approx(1 + 100 / 2**20)
    assert figures["roles_ms"]["rollout"] == pytest.approx(100) and figures["roles_ms"]["judge"] == 0
    with pytest.raises(RuntimeError, match="at least 3 steps"):
        StepProbe(DriverTraffic()).figures()


def _figures(step_s, groups_per_s, learner_s=0.0):
    roles = {"rollout": 10.0, "patient": 2.0, "judge": 1.0, "learner": 0.5, "ray": 1.0}
    return {
        "step_s": step_s,
        "groups_per_s": groups_per_s,
        "learner_s": learner_s,
        "driver_ms": 5.0,
        "loop_ms": 2.0,
        "roles_ms": roles,
        "in_mib": 1.0,
        "out_mib": 1.0,
        "arrow_in_mib": 0.9,
        "arrow_out_mib": 0.9,
        "push_s": 0.1,
        "cores": 0.5,
        "parquet_mib": 0.2,
        "staleness_max": 1.0,
        "failed": 0.0,
    }


def test_speedup_against_the_ideal_and_scaling_efficiency_by_hand():
    sync, streaming = (Setting("b", 4, 1, 2, k, 5, 0.01, 0.0) for k in (0, 1))
    # Synchronous: 10 s a step, 4 of them the learner's: gen 6, learn 4, ideal (6 + 4) / 6.
    measured = {sync: [_figures(10.0, 1.0, 4.0)], streaming: [_figures(7.5, 1.3, 4.0)]}
    rows = _staleness_rows([sync, streaming], measured)
    assert rows[0]["gen_s"]["median"] == 6.0 and rows[0]["learn_s"]["median"] == 4.0
    assert rows[1]["speedup"]["median"] == pytest.approx(10 / 7.5)
    assert rows[1]["ideal"]["median"] == pytest.approx(10 / 6)
    assert rows[1]["efficiency"]["median"] == pytest.approx(6 / 7.5)  # max(gen, learn) / async step
    assert rows[1]["env_ms"]["median"] == 3.0 and rows[1]["arrow_share"]["median"] == pytest.approx(0.9)

    one, many, hosted = (Setting("c", p, e, 1, 1, 5, 0.01, 0.0) for p, e in ((1, 1), (4, 1), (2, 4)))
    measured = {one: [_figures(2.0, 0.5)], many: [_figures(2.0, 1.8)], hosted: [_figures(2.0, 3.6)]}
    rows = _worker_rows([one, many, hosted], measured)
    assert [r["efficiency"]["median"] for r in rows] == pytest.approx([1.0, 0.9, 0.9])
    assert [r["workers"] for r in rows] == ["1", "4", "8 (2 x 4)"] and rows[2]["batch"] == 8


def test_settings_give_room_for_every_batch_the_gate_admits():
    setting = Setting("c", 3, 2, 1, 1, 5, 0.01, 0.001)
    config = load_config(None, setting.overrides(Path("/tmp/runs"), "x"))
    # Two batches (max_staleness 1) of one group per engine, 2 engines, 4 episodes a group.
    assert config.ray.episodes_per_worker == 2 * 1 * 2 * 4 and config.train.batch_size == 6
    assert config.simulation.engines_per_worker == 2 and config.engine.kind == "simulated"
    assert setting.group_s() == pytest.approx(3 * 64 * (0.01 + 0.001 * 8))
    assert 0.5 < reference_groups_per_s() < 1.0


# ---- on Ray: the driver's meters and a real orchestrator run ----------------------------------------
@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
class _Echo:
    def batch(self, rows: int) -> pa.RecordBatch:
        return pa.RecordBatch.from_pydict({"x": list(range(rows))})

    def rows(self, batch: pa.RecordBatch) -> int:
        return batch.num_rows


def test_driver_traffic_counts_what_the_driver_materialises_and_sends(ray_session):
    echo = _Echo.remote()
    ray.get(echo.rows.remote(pa.RecordBatch.from_pydict({"x": [1]})))  # warm: the actor is up
    with DriverTraffic() as traffic:
        assert traffic.available
        batch = ray.get(echo.batch.remote(100_000))  # 800 kB of int64 in
        assert ray.get(echo.rows.remote(batch)) == 100_000  # and out again
        counts = traffic.snapshot()
    assert 800_000 <= counts["in_arrow"] < 801_000 and 800_000 <= counts["out_arrow"] < 801_000
    assert 0 < counts["in_other"] < 1000 and counts["out_other"] > 0
    # Restored: nothing is counted after the block.
    ray.get(echo.batch.remote(1000))
    assert traffic.snapshot() == counts
    roles = session_cpu_seconds()
    assert roles and roles.get("ray", 0) > 0  # our own Ray's processes are found
    ray.kill(echo)


def test_training_on_simulated_gpus(ray_session, tmp_path):
    """Two rollout processes of two simulated engines each, max_staleness 1: the real orchestrator trains
    to max_steps, every group within the staleness bound, and the rollout processes never load torch."""
    from grpodx.orchestrator import Orchestrator

    config = _config(
        "simulation.engine_step_s=0.004",
        "simulation.engine_token_s=0.001",
        "simulation.learner_token_s=0.00005",
        "simulation.learner_step_s=0.05",
        "simulation.adapter_mib=0.25",
        "simulation.engines_per_worker=2",
        "ray.num_rollout_workers=2",
        "ray.episodes_per_worker=16",
        "ray.rollout_num_cpus=0",
        "ray.learner_num_cpus=0",
        "grpo.num_generations=2",
        "train.batch_size=4",
        "train.max_staleness=1",
        "train.max_steps=4",
        "train.save_steps=4",
        "train.eval_cases=2",
        f"train.run_dir={tmp_path}",
        "train.run_name=simulated",
    )
    torch_in_rollout: list[bool] = []

    def on_step_end(step: int, metrics: dict[str, float]) -> None:
        if step == 2:
            # This run's rollout processes, asked for their pids: other Ray sessions on the machine
            # (a training run beside the tests) have rollout actors of their own, with torch.
            handles = {slot.handle for slot in orchestrator.actors.pool.ready_slots()}
            pids = {actor_pid(handle) for handle in handles}
            assert len(pids) == 2
            for pid in pids:
                torch_in_rollout.append("libtorch" in Path(f"/proc/{pid}/maps").read_text())

    orchestrator = Orchestrator(config, progress=False, on_step_end=on_step_end)
    try:
        result = orchestrator.train()
    finally:
        orchestrator.shutdown()
    assert result.steps == 4 and result.eval_after is not None
    assert torch_in_rollout and not any(torch_in_rollout)
    run_dir = Path(result.run_dir)
    frame = pd.read_parquet(run_dir / "trajectories")
    assert len(frame) == 4 * 4 * 2 and frame["group_id"].nunique() == 16  # every group exactly once
    assert frame["valid"].all() and (frame["turns"] == 2).all() and frame["diagnosis"].notna().all()
    lag = (frame["step"] - 1) - frame["policy_version"]
    assert lag.between(0, 1).all(), lag.tolist()
    # Both engines of both processes took groups.
    assert set(frame["worker_id"]) == {"rollout-0.0", "rollout-0.1", "rollout-1.0", "rollout-1.1"}
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "staleness/max" in line]
    assert [line["step"] for line in steps] == [1, 2, 3, 4]
    assert all(line["staleness/max"] <= 1 for line in steps)
    assert all(line["learner/seconds"] >= 0.05 for line in steps)
    state = json.loads((run_dir / "checkpoints" / "step-000004" / "simulated_learner.json").read_text())
    assert state["version"] == 4


def test_scaling_measure_on_a_short_run(ray_session, tmp_path):
    """The benchmark's own measurement of one short run: the probe's figures are consistent with the
    run (groups counted, the driver's bytes, Arrow most of them, staleness within its bound)."""
    from grpodx.bench.core import BenchContext
    from grpodx.bench.scaling import measure

    ctx = BenchContext(None, scale="smoke", repeats=1)
    setting = Setting("c: workers", 2, 1, 1, 1, 4, 0.002, 0.0005)
    figures = measure(ctx, setting, tmp_path, "measured")
    assert figures["steps"] == 2 and figures["groups"] == 2 * setting.batch_size
    assert figures["traffic_measured"] and figures["staleness_max"] <= 1 and figures["failed"] == 0
    # Whatever route the groups take to the learner (through the driver, or by reference), the driver
    # cannot send on more Arrow bytes than it received, and it received and sent something.
    assert figures["arrow_out_mib"] <= figures["arrow_in_mib"] * 1.01 + 1e-3
    assert figures["in_mib"] > 0 and figures["out_mib"] > 0
    assert figures["driver_ms"] >= figures["loop_ms"] > 0 and figures["roles_ms"]["rollout"] > 0
    assert figures["parquet_mib"] > 0 and figures["cores"] > 0
