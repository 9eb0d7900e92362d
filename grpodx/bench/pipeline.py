"""Benchmark 2: the synchronous loop against the streaming one, on the same work.

Real training runs of the tiny doctor through the orchestrator, at ``train.max_staleness`` 0 (strictly
on-policy: generation waits for the learner and the learner for generation), 1 and 2 (the workers run
one or two batches ahead). Same config, seed and cases; the settings are interleaved within each repeat
so that a change in the machine's load hits all of them alike. Figures come from the runs' own
metrics: wall time per step, and the idle shares of the learner and of the generators.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from grpodx.bench.core import BenchContext, Benchmark, BenchResult, ratio_stat, stat

STALENESS_SETTINGS = (0, 1, 2)


def _run_once(ctx: BenchContext, run_dir: Path, name: str, max_staleness: int, steps: int) -> dict:
    from grpodx.orchestrator import Orchestrator

    size = ctx.pick(
        full=[],
        quick=[],
        smoke=["train.batch_size=2", "grpo.num_generations=2", "episode.sampling.max_new_tokens=16"],
    )
    config = ctx.derive(
        [
            f"train.max_staleness={max_staleness}",
            f"train.max_steps={steps}",
            f"train.save_steps={steps}",
            "train.eval_cases=0",
            f"train.run_dir={run_dir}",
            f"train.run_name={name}",
            *size,
        ]
    )
    orchestrator = Orchestrator(config, progress=False)
    try:
        result = orchestrator.train()
    finally:
        orchestrator.shutdown()
    lines = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    per_step = [line for line in lines if "time/step" in line]
    # The first step includes the workers' first batches on a cold engine; leave it out when we can.
    counted = per_step[1:] if len(per_step) > 2 else per_step
    return step_figures(counted)


def step_figures(steps: list[dict]) -> dict:
    """Wall time per step and idle shares over a run's steps, weighted by time.

    Not medians: with max_staleness > 0 two batches often finish together, so step times alternate
    (a long one, then one of a fraction of a second) and their median says nothing about throughput.
    """
    wall = sum(line["time/step"] for line in steps)
    learner_busy = sum(line["time/learner"] for line in steps)
    generator_idle = sum(line["time/generator_idle_share"] * line["time/step"] for line in steps)
    return {
        "step_s": wall / len(steps),
        "learner_idle": max(0.0, 1.0 - learner_busy / wall),
        "generator_idle": generator_idle / wall,
        "staleness": statistics.mean(line["staleness/mean"] for line in steps),
        "reward": statistics.mean(line["reward/mean"] for line in steps),
    }


def run(ctx: BenchContext) -> BenchResult:
    ctx.ray()
    steps = ctx.pick(full=8, quick=3, smoke=2)
    repeats = min(ctx.repeats, 2)  # each repeat is three training runs
    measured: dict[int, list[dict]] = {k: [] for k in STALENESS_SETTINGS}
    with tempfile.TemporaryDirectory(prefix="grpodx-bench-pipeline-") as scratch:
        run_dir = ctx.out_dir / "pipeline-runs" if ctx.out_dir else Path(scratch)
        for repeat in range(repeats):
            for max_staleness in STALENESS_SETTINGS:
                ctx.log(
                    f"pipeline: max_staleness={max_staleness}, repeat {repeat + 1}/{repeats}, {steps} steps"
                )
                name = f"staleness-{max_staleness}-repeat-{repeat}"
                measured[max_staleness].append(_run_once(ctx, run_dir, name, max_staleness, steps))
    baseline = [m["step_s"] for m in measured[0]]
    rows = []
    for max_staleness, runs in measured.items():
        rows.append(
            {
                "max_staleness": max_staleness,
                "step_s": stat([m["step_s"] for m in runs]),
                "speedup": ratio_stat(baseline, [m["step_s"] for m in runs]),
                "learner_idle": stat([m["learner_idle"] for m in runs]),
                "generator_idle": stat([m["generator_idle"] for m in runs]),
                "staleness": stat([m["staleness"] for m in runs]),
                "reward": stat([m["reward"] for m in runs]),
            }
        )
    config = ctx.config
    notes = [
        f"Each cell: {repeats} repeat(s) of a {steps}-step training run of the tiny doctor "
        f"({config.ray.num_rollout_workers} rollout workers, batch {config.train.batch_size} x "
        f"G {config.grpo.num_generations}, eval off), the three settings interleaved in each repeat; a run's "
        "figures are over its steps, the first left out (cold engines), weighted by time: with "
        "max_staleness > 0 two batches often finish together, so single step times alternate.",
        "step s: wall time of the counted steps / their number. speed-up: the max_staleness 0 run's step "
        "time divided by this one's, per repeat. Learner idle: 1 - (accumulate + optimizer seconds) / wall "
        "time. Generator idle: 1 - (seconds with at least one episode in flight) / wall time, averaged "
        "over workers.",
        "staleness: mean versions between the adapter an episode started on and the one that trained on it "
        "(at most max_staleness by construction). reward: mean training reward over the counted steps, a "
        "sanity check that the runs did the same work, not a learning result.",
        "On this machine every actor shares 2 CPU cores: overlapping generation with learning only pays "
        "for the time one of them would otherwise leave the cores idle (waiting on the other).",
    ]
    return BenchResult(
        rows=rows,
        columns=[
            ("max_staleness", "max_staleness"),
            ("step_s", "step s"),
            ("speedup", "speed-up vs 0"),
            ("learner_idle", "learner idle"),
            ("generator_idle", "generator idle"),
            ("staleness", "mean staleness"),
            ("reward", "train reward"),
        ],
        notes=notes,
    )


BENCHMARK = Benchmark(
    name="pipeline",
    title="synchronous vs streaming pipeline",
    measures="Wall time per training step and the idle shares of learner and generators at max_staleness "
    "0 (synchronous), 1 and 2, on the same work.",
    run=run,
)
