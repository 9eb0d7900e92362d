"""Benchmark 7: the orchestrator at cluster scale, by simulation.

The real :class:`~grpodx.orchestrator.Orchestrator` trains with ``engine.kind: simulated``: rollout
engines and the learner do no model compute and sleep for the time a GPU would take
(:mod:`grpodx.engines.simulated`, :mod:`grpodx.simulated_learner`), while everything between them is
the real code: the staleness gate, the scheduler, Ray calls, each group's Arrow batch, the patient and
judge workers, the reward, Parquet, weight pushes. So one small machine runs the scheduling of 64 or
more GPUs, and the figures are about the orchestrator, not about a model:

- (a) the driver's own CPU per group (its process and its event loop's thread), hence the number of
  rollout workers at which the driver would be the bottleneck; and the CPU per group of the other
  processes of the run (rollout actors, the shared patient and judge workers, the learner);
- (b) ``train.max_staleness`` 1 against 0 when generation and learning take about the same simulated
  time on separate resources: the speed-up against the ideal ``(gen + learn) / max(gen, learn)``;
- (c) throughput as rollout workers are added, each with the same load: groups/s against ``workers x``
  the one-worker rate;
- (d) the bytes the driver process materialises and sends per step (see
  :mod:`grpodx.bench.driver_meters`), Arrow record batches apart.

Simulated time is slower than a GPU (a decode step of tens to hundreds of milliseconds): the real CPU
work per group must stay a small part of the machine so that the simulated GPUs, not the two cores,
set the pace. The driver's CPU per group does not depend on that choice; it is what the predictions for a
real cluster are scaled from.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from grpodx.bench.core import BenchContext, Benchmark, BenchResult, ratio_stat, stat
from grpodx.bench.driver_meters import DriverTraffic, session_cpu_seconds

GENERATIONS = 4  # episodes per group
TOKENS_PER_TURN = 64
DOCTOR_TURNS = 3
ADAPTER_MIB = 8.0
ROLES = ("rollout", "patient", "judge", "learner", "ray")
MIB = 2**20


@dataclass(frozen=True)
class Setting:
    """One simulated run: ``processes`` rollout actors of ``engines`` simulated GPUs each."""

    part: str
    processes: int
    engines: int
    groups_per_engine: int  # per batch
    max_staleness: int
    steps: int
    step_s: float  # engine: seconds per decode step ...
    token_s: float  # ... plus per sequence in the batch
    learner_token_s: float = 0.0
    learner_step_s: float = 0.0

    @property
    def workers(self) -> int:
        return self.processes * self.engines

    @property
    def batch_size(self) -> int:
        return self.workers * self.groups_per_engine

    def label(self) -> str:
        return (
            str(self.workers) if self.engines == 1 else f"{self.workers} ({self.processes} x {self.engines})"
        )

    def overrides(self, run_dir: Path, name: str) -> list[str]:
        # Room for the groups of max_staleness + 1 batches on every engine: the gate, not the pool,
        # limits what runs.
        episodes = (self.max_staleness + 1) * self.groups_per_engine * GENERATIONS * self.engines
        return [
            "engine.kind=simulated",
            f"simulation.engine_step_s={self.step_s}",
            f"simulation.engine_token_s={self.token_s}",
            f"simulation.tokens_per_turn={TOKENS_PER_TURN}",
            f"simulation.doctor_turns={DOCTOR_TURNS}",
            f"simulation.engines_per_worker={self.engines}",
            f"simulation.learner_token_s={self.learner_token_s}",
            f"simulation.learner_step_s={self.learner_step_s}",
            f"simulation.adapter_mib={ADAPTER_MIB}",
            f"grpo.num_generations={GENERATIONS}",
            f"train.batch_size={self.batch_size}",
            f"train.max_staleness={self.max_staleness}",
            f"train.max_steps={self.steps}",
            f"train.save_steps={self.steps}",
            "train.eval_cases=0",
            f"train.run_dir={run_dir}",
            f"train.run_name={name}",
            f"ray.num_rollout_workers={self.processes}",
            f"ray.episodes_per_worker={episodes}",
            # Simulated actors sleep rather than compute: they take no logical CPU, so any number fits.
            "ray.rollout_num_cpus=0",
            "ray.learner_num_cpus=0",
            "episode.max_turns=5",
            "episode.sampling.max_new_tokens=96",
        ]

    def group_s(self) -> float:
        """Simulated decode time of one group's episodes, every engine holding its full load."""
        batch = (self.max_staleness + 1) * self.groups_per_engine * GENERATIONS
        return DOCTOR_TURNS * TOKENS_PER_TURN * (self.step_s + self.token_s * batch)


class StepProbe:
    """Samples the driver at the end of every step (``Orchestrator(on_step_end=...)``, which runs in the
    driver's event loop): wall clock, the driver's CPU (process and this thread), the bytes it moved,
    the run's other processes' CPU, and a few of the step's metrics."""

    def __init__(self, traffic: DriverTraffic):
        self.traffic = traffic
        self.samples: list[dict] = []

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self.samples.append(
            {
                "step": step,
                "wall": time.perf_counter(),
                "cpu": time.process_time(),
                "loop": time.thread_time(),
                "traffic": self.traffic.snapshot(),
                "roles": session_cpu_seconds(),
                "episodes": metrics.get("episodes/total", 0.0),
                "failed": metrics.get("episodes/failed", 0.0),
                "push_s": metrics.get("time/weight_push", 0.0),
                "learner_s": metrics.get("time/learner", 0.0),
                "staleness_max": metrics.get("staleness/max", 0.0),
            }
        )

    def figures(self, warmup: int = 2) -> dict:
        """Figures over the steps after the first ``warmup``: the first includes the cold start, and with
        max_staleness 1 the second batch started with the first (both admitted at version 0)."""
        if len(self.samples) < warmup + 1:
            raise RuntimeError(f"a scaling run needs at least {warmup + 1} steps, it ran {len(self.samples)}")
        first, last = self.samples[warmup - 1], self.samples[-1]
        counted = self.samples[warmup:]
        steps = last["step"] - first["step"]
        groups = sum(s["episodes"] for s in counted) / GENERATIONS
        wall = last["wall"] - first["wall"]
        per_group = 1000.0 / max(groups, 1e-9)
        traffic = {key: (last["traffic"][key] - first["traffic"][key]) / steps for key in last["traffic"]}
        role_s = {role: last["roles"].get(role, 0.0) - first["roles"].get(role, 0.0) for role in ROLES}
        roles = {role: seconds * per_group for role, seconds in role_s.items()}
        return {
            "steps": steps,
            "groups": groups,
            "wall_s": wall,
            "step_s": wall / steps,
            "groups_per_s": groups / wall,
            "driver_ms": (last["cpu"] - first["cpu"]) * per_group,
            "loop_ms": (last["loop"] - first["loop"]) * per_group,
            "loop_core": (last["loop"] - first["loop"]) / wall,
            # Every process of the run (the driver and its Ray cluster's) per wall second: how much of the
            # machine the run used; near the cores free for it, the machine, not the orchestrator, paced it.
            "cores": (last["cpu"] - first["cpu"] + sum(role_s.values())) / wall,
            "roles_ms": roles if last["roles"] else {},
            "in_mib": (traffic["in_arrow"] + traffic["in_other"]) / MIB,
            "out_mib": (traffic["out_arrow"] + traffic["out_other"]) / MIB,
            "arrow_in_mib": traffic["in_arrow"] / MIB,
            "arrow_out_mib": traffic["out_arrow"] / MIB,
            "push_s": statistics.mean(s["push_s"] for s in counted),
            "learner_s": statistics.mean(s["learner_s"] for s in counted),
            "staleness_max": max(s["staleness_max"] for s in self.samples),
            "failed": sum(s["failed"] for s in self.samples),
        }


def measure(ctx: BenchContext, setting: Setting, run_dir: Path, name: str) -> dict:
    """One simulated training run through the real orchestrator; its figures (see StepProbe)."""
    from grpodx.orchestrator import Orchestrator

    config = ctx.derive(setting.overrides(run_dir, name))
    with DriverTraffic() as traffic:
        probe = StepProbe(traffic)
        orchestrator = Orchestrator(config, progress=False, on_step_end=probe.on_step_end)
        try:
            result = orchestrator.train()
        finally:
            orchestrator.shutdown()
    figures = probe.figures()
    figures["traffic_measured"] = traffic.available
    parquet = sorted((Path(result.run_dir) / "trajectories").glob("*.parquet"))
    figures["parquet_mib"] = sum(p.stat().st_size for p in parquet) / max(1, len(parquet)) / MIB
    return figures


# ---- the settings of each part ------------------------------------------------------------------
def worker_settings(ctx: BenchContext) -> list[Setting]:
    """(a), (c), (d): every engine with one group per batch and room for two batches (max_staleness 1),
    a learner that takes no time; only the number of workers changes. Simulated time is set so that the
    largest run's real CPU work stays a small part of the machine."""
    counts = ctx.pick(
        full=[(1, 1), (4, 1), (16, 1), (64, 1), (32, 4)],
        quick=[(1, 1), (8, 1)],
        smoke=[(1, 1), (2, 1)],
    )
    group_s = ctx.pick(full=24.0, quick=4.0, smoke=1.0)
    steps = ctx.pick(full=6, quick=4, smoke=3)
    # step_s + 8 token_s per step (8 sequences per engine): per-sequence cost a third of the step's.
    step_s = group_s / (DOCTOR_TURNS * TOKENS_PER_TURN * (1 + 8 / 24))
    return [
        Setting("c: workers", processes, engines, 1, 1, steps, step_s, step_s / 24)
        for processes, engines in counts
    ]


def staleness_settings(ctx: BenchContext) -> list[Setting]:
    """(b): 4 workers, 2 groups each per batch; generation and the learner's step about equally long.
    The engine's step costs the same at any batch size (engine_token_s 0), so that overlapping two
    batches does not slow generation: what is measured is the overlap, not the engine's batching."""
    gen_s = ctx.pick(full=3.0, quick=1.5, smoke=0.6)
    steps = ctx.pick(full=7, quick=5, smoke=3)
    step_s = gen_s / (DOCTOR_TURNS * TOKENS_PER_TURN)
    # About 300 positions per episode, 32 episodes per step: 70% of the learner's time per token.
    learner_token_s = 0.7 * gen_s / (300 * 32)
    return [
        Setting(f"b: max_staleness {k}", 4, 1, 2, k, steps, step_s, 0.0, learner_token_s, 0.3 * gen_s)
        for k in (0, 1)
    ]


# ---- the benchmark ------------------------------------------------------------------------------
# An assumption for the predictions, not a measurement: Phi-4 (14B, bf16) decoding on one H100-class GPU
# with vLLM, a step of 15 ms plus 0.15 ms per sequence (weights read once per step, each sequence's KV
# cache), 32 episodes in flight per GPU, 3 doctor turns of 192 tokens. Patient and judge add latency,
# not GPU time, and are left out.
REFERENCE_GPU = {"step_s": 0.015, "token_s": 0.00015, "episodes": 32, "turns": 3, "tokens_per_turn": 192}


def reference_groups_per_s() -> float:
    """Groups per second one reference GPU finishes (all its episodes in flight at once)."""
    gpu = REFERENCE_GPU
    episode_s = gpu["turns"] * gpu["tokens_per_turn"] * (gpu["step_s"] + gpu["token_s"] * gpu["episodes"])
    return gpu["episodes"] / GENERATIONS / episode_s


COLUMNS = [
    ("part", "part"),
    ("workers", "workers"),
    ("max_staleness", "max_staleness"),
    ("batch", "groups/step"),
    ("step_s", "s/step"),
    ("groups_per_s", "groups/s"),
    ("efficiency", "efficiency"),
    ("speedup", "speed-up vs 0"),
    ("ideal", "ideal speed-up"),
    ("driver_ms", "driver CPU ms/group"),
    ("loop_ms", "driver loop ms/group"),
    ("rollout_ms", "rollout CPU ms/group"),
    ("env_ms", "patient+judge CPU ms/group"),
    ("in_mib", "driver in MiB/step"),
    ("out_mib", "driver out MiB/step"),
    ("arrow_share", "Arrow share"),
    ("cores", "cores used"),
]


def _common(setting: Setting, runs: list[dict]) -> dict:
    def of(key):
        return stat([r[key] for r in runs])

    row = {
        "part": setting.part,
        "workers": setting.label(),
        "max_staleness": setting.max_staleness,
        "batch": setting.batch_size,
        "step_s": of("step_s"),
        "groups_per_s": of("groups_per_s"),
        "driver_ms": of("driver_ms"),
        "loop_ms": of("loop_ms"),
        "in_mib": of("in_mib"),
        "out_mib": of("out_mib"),
        "arrow_share": stat(
            [(r["arrow_in_mib"] + r["arrow_out_mib"]) / max(1e-12, r["in_mib"] + r["out_mib"]) for r in runs]
        ),
        "push_s": of("push_s"),
        "cores": of("cores"),
        "parquet_mib": of("parquet_mib"),
        "staleness_max": max(r["staleness_max"] for r in runs),
        "failed": sum(r["failed"] for r in runs),
    }
    if all(r["roles_ms"] for r in runs):
        row["rollout_ms"] = stat([r["roles_ms"]["rollout"] for r in runs])
        row["patient_ms"] = stat([r["roles_ms"]["patient"] for r in runs])
        row["judge_ms"] = stat([r["roles_ms"]["judge"] for r in runs])
        row["env_ms"] = stat([r["roles_ms"]["patient"] + r["roles_ms"]["judge"] for r in runs])
        row["learner_ms"] = stat([r["roles_ms"]["learner"] for r in runs])
    return row


def _staleness_rows(settings: list[Setting], measured: dict[Setting, list[dict]]) -> list[dict]:
    sync, streaming = (measured[s] for s in settings)
    # Per repeat: learn = the learner's busy seconds per step; gen = the rest of a synchronous step.
    learn = [r["learner_s"] for r in sync]
    gen = [r["step_s"] - r["learner_s"] for r in sync]
    ideal = [(g + l_) / max(g, l_) for g, l_ in zip(gen, learn, strict=True)]
    speedup = [s["step_s"] / a["step_s"] for s, a in zip(sync, streaming, strict=True)]
    rows = [_common(settings[0], sync), _common(settings[1], streaming)]
    rows[0].update({"gen_s": stat(gen), "learn_s": stat(learn)})
    rows[1].update(
        {
            "speedup": stat(speedup),
            "ideal": stat(ideal),
            "efficiency": ratio_stat(speedup, ideal),
            "learn_s": stat([r["learner_s"] for r in streaming]),
        }
    )
    return rows


def _worker_rows(settings: list[Setting], measured: dict[Setting, list[dict]]) -> list[dict]:
    base = measured[settings[0]]  # one worker
    rows = []
    for setting in settings:
        runs = measured[setting]
        row = _common(setting, runs)
        linear = [setting.workers * b["groups_per_s"] for b in base]
        row["efficiency"] = ratio_stat([r["groups_per_s"] for r in runs], linear)
        rows.append(row)
    return rows


def run(ctx: BenchContext) -> BenchResult:
    ctx.ray()
    by_workers, by_staleness = worker_settings(ctx), staleness_settings(ctx)
    # (b) is short: up to two repeats, its two settings side by side in each. (c)'s runs are long (the
    # simulated GPUs are slow, so that 64 workers' CPU work fits two cores): one run each.
    plan = [(repeat, s) for repeat in range(min(ctx.repeats, 2)) for s in by_staleness]
    plan += [(0, s) for s in by_workers]
    measured: dict[Setting, list[dict]] = {s: [] for s in [*by_staleness, *by_workers]}
    with tempfile.TemporaryDirectory(prefix="grpodx-bench-scaling-") as scratch:
        run_dir = ctx.out_dir / "scaling-runs" if ctx.out_dir else Path(scratch)
        for index, (repeat, setting) in enumerate(plan):
            ctx.log(
                f"scaling: {setting.part}, {setting.label()} workers, {setting.steps} steps, "
                f"repeat {repeat + 1}"
            )
            name = f"{index}-{setting.workers}-workers-staleness-{setting.max_staleness}-repeat-{repeat}"
            measured[setting].append(measure(ctx, setting, run_dir, name))
    rows = _staleness_rows(by_staleness, measured) + _worker_rows(by_workers, measured)
    return BenchResult(
        rows=rows, columns=COLUMNS, notes=_notes(by_workers, rows, len(measured[by_staleness[0]]))
    )


def _median(row: dict, key: str) -> float:
    value = row.get(key)
    return float("nan") if value is None else value["median"]


def _notes(workers: list[Setting], rows: list[dict], repeats: int) -> list[str]:
    sync = rows[0]
    worker_rows = rows[2:]
    largest = worker_rows[-1]
    one = worker_rows[0]
    loop_s = _median(largest, "loop_ms") / 1000
    driver_s = _median(largest, "driver_ms") / 1000
    per_worker = _median(one, "groups_per_s")
    reference = reference_groups_per_s()
    notes = [
        "Every cell: one training run of the real orchestrator with engine.kind=simulated (eval off), "
        f"over its steps after the second; (b): the median of {repeats} repeat(s) [range]. {GENERATIONS} "
        f"episodes per group, the simulated doctor diagnosing on turn {DOCTOR_TURNS}, {TOKENS_PER_TURN} "
        f"tokens per turn, an adapter of {ADAPTER_MIB:g} MiB copied in by every engine.",
        "(c) workers: each engine has one group per batch and room for two (max_staleness 1), the learner "
        f"takes no time; one group takes about {workers[0].group_s():.1f} s of simulated decoding. "
        "efficiency = groups/s / (workers x the one-worker groups/s of the same repeat). Rows 'N (P x E)' "
        "host E simulated engines in each of P rollout actor processes (simulation.engines_per_worker): "
        "the orchestrator then sees P workers, so its per-worker calls (adapter pushes, busy-time queries, "
        "the pool's choice of worker) happen P times, not N.",
        f"(a) driver CPU per group: its whole process (Ray's threads included) and its event loop's thread "
        f"alone (time.thread_time), between the end of the second step and the last. At {largest['workers']} "
        f"workers the loop thread spends {loop_s * 1000:.2f} ms per group: one core would carry at most "
        f"{1 / loop_s:.0f} groups/s ({1 / driver_s:.0f} for the whole process). At this simulation's "
        f"{per_worker:.3f} groups/s per worker that is {1 / (loop_s * per_worker):.0f} workers; at the "
        f"reference GPU's {reference:.2f} groups/s (an assumption: REFERENCE_GPU in grpodx/bench/scaling.py) "
        f"{1 / (loop_s * reference):.0f} workers.",
        "Other processes per group: rollout (all rollout actors: episodes, tokenizer, reward, Arrow; with "
        "the idle CPU of their Ray threads, about 0.6% of a core per process here, most of it at these slow "
        "simulated rates), "
        "patient + judge (the two shared workers on the driver's node, one process each: at "
        f"{_median(largest, 'patient_ms'):.2f} and {_median(largest, 'judge_ms'):.2f} ms per group they "
        f"saturate a core at {1000 / _median(largest, 'patient_ms'):.0f} and "
        f"{1000 / _median(largest, 'judge_ms'):.0f} groups/s).",
        f"(b) 4 workers, 2 groups each per batch: gen = a synchronous step less the learner's busy time "
        f"({_median(sync, 'gen_s'):.2f} s), learn = the learner's busy time per step "
        f"({_median(sync, 'learn_s'):.2f} s). ideal speed-up = (gen + learn) / max(gen, learn); efficiency = "
        "the measured speed-up / the ideal, per repeat. The engine step costs the same at any batch size "
        "here, so running two batches at once does not slow generation.",
        "(d) driver in / out: bytes of the objects the driver process deserialises (every awaited result: "
        "learner metrics, workers' answers, any record batch that reaches it) and serialises (every remote "
        "call's arguments: scenarios, references) per step; the groups' record batches and the adapter pass "
        "as ObjectRefs and are in neither (an Arrow share above 0 would mean a record batch went through the "
        "driver). The learner writes each step's trajectories to Parquet "
        f"({_median(largest, 'parquet_mib'):.2f} MiB per step at {largest['workers']} workers).",
        f"Staleness stayed within its bound in every run (max {max(r['staleness_max'] for r in rows):g}); "
        f"failed episodes: {sum(r['failed'] for r in rows):g}.",
        "The machine's other load shares these cores: CPU per group is the work done, wall-clock figures "
        "move with the load (see the load average above).",
    ]
    return notes


BENCHMARK = Benchmark(
    name="scaling",
    title="the orchestrator at cluster scale, by simulation",
    measures="Simulated GPUs, real orchestrator: the driver's CPU and bytes per group and step, "
    "max_staleness 1 against 0 where generation and learning take as long, and throughput as workers "
    "are added.",
    run=run,
)
