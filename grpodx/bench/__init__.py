"""The benchmark suite: ``grpodx bench`` (``make bench``).

Each benchmark is one module of this package exposing ``BENCHMARK``, a
:class:`~grpodx.bench.core.Benchmark`: a name, a title, one sentence saying what its figure means, and
a function from a :class:`~grpodx.bench.core.BenchContext` to a :class:`~grpodx.bench.core.BenchResult`
(rows of figures, and notes saying exactly what was and was not timed). ``REGISTRY`` lists them in the
order they run; adding a benchmark is one module and one line here.
"""

from __future__ import annotations

from grpodx.bench import (
    learner,
    overhead,
    peer_trl,
    peer_trl_multiturn,
    pipeline,
    rollout_api,
    scaling,
    weight_push,
)
from grpodx.bench.core import Benchmark

REGISTRY: list[Benchmark] = [
    rollout_api.BENCHMARK,  # 1. rollout throughput under API latency: naive loop vs Ray actors
    pipeline.BENCHMARK,  # 2. synchronous vs streaming pipeline at max_staleness 0, 1, 2
    weight_push.BENCHMARK,  # 3. learner step end -> every rollout worker holds the new adapter
    overhead.BENCHMARK,  # 4. rollout worker vs bare engine, tokens/s
    learner.BENCHMARK,  # 5. GRPO update tokens/s, forward/backward split, peak memory
    peer_trl.BENCHMARK,  # 6. GRPODx vs TRL's GRPOTrainer on the same single-turn work
    peer_trl_multiturn.BENCHMARK,  # 7. the same, multi-turn interviews with a 300 ms patient API
    scaling.BENCHMARK,  # 8. the orchestrator at cluster scale, with simulated GPUs
]


def select(names: list[str] | None) -> list[Benchmark]:
    """The benchmarks named (registry order kept), all of them for none; unknown names raise ValueError."""
    if not names:
        return list(REGISTRY)
    known = {benchmark.name: benchmark for benchmark in REGISTRY}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(known)}")
    return [benchmark for benchmark in REGISTRY if benchmark.name in names]
