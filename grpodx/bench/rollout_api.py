"""Rollout throughput when every patient and judge call waits on a slow API.

The patient and the judge are the API-backed ones (``patient.kind=openai``, ``judge.kind=openai``),
served by the loopback Chat Completions server with a fixed latency added to every request. Two
designs run on the same engine and the same ``EpisodeRunner``:

- *naive*: one episode at a time in one process, every API call awaited in turn, as the original
  single-script trainer did (a ``RolloutWorker`` allowed one episode in flight, with the patient and
  judge in its own process; it runs in a process of its own, like the rollout actors, so that the
  loopback server in the driver's process never competes with it for the GIL);
- *this system*: Ray ``RolloutActor`` workers with the shared patient/judge worker actors, ``C``
  episodes kept in flight per worker (a new one is submitted as each finishes), for 1, 2 and 4 workers.

A latency-bound rollout cannot beat ``episodes in flight ÷ (API calls per episode × latency)``
episodes per second; the share of that ideal says how much of the waiting the system overlaps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import count

import ray
import torch
from pydantic import SecretStr

from grpodx.bench.core import (
    BenchContext,
    Benchmark,
    BenchResult,
    median_of,
    ratio_stat,
    release_actors,
    stat,
)
from grpodx.config import Config
from grpodx.medical.cases import CaseSampler
from grpodx.medical.knowledge import load_knowledge_base
from grpodx.rollout import Scenario
from grpodx.testing.loopback import OpenAICompatibleServer

LATENCY_S = 0.3
# Settings with at least this many episodes in flight per worker wait for their cancelled leftovers.
SETTLE_FROM = 8
# Any non-empty key: the loopback server checks none.
DUMMY_KEY = SecretStr("sk-bench-loopback-no-auth")


@dataclass(frozen=True)
class Sizes:
    workers: tuple[int, ...]
    concurrency: tuple[int, ...]
    min_episodes: int  # completions a measurement needs at least
    max_window_s: float  # a measurement stops here even short of its target (a safety cap)


SIZES = {
    "full": Sizes(workers=(1, 2, 4), concurrency=(1, 4, 16, 64), min_episodes=5, max_window_s=12.0),
    "quick": Sizes(workers=(1, 2), concurrency=(1, 16), min_episodes=3, max_window_s=12.0),
    "smoke": Sizes(workers=(1, 2), concurrency=(1, 2), min_episodes=2, max_window_s=10.0),
}


def api_calls(row: dict, max_turns: int) -> tuple[int, int]:
    """(patient requests, judge requests) one finished episode made.

    The patient's opening line is local (no request). The patient is asked after each doctor turn
    except the one that ends the conversation (a diagnosis, or the last allowed turn); an episode that
    stopped early without a diagnosis (the token budget refused the next turn) was answered after every
    turn. The judge is asked only when there is a diagnosis to score.
    """
    turns, diagnosed = row["turns"], row["diagnosis"] is not None
    stopped_by_budget = not diagnosed and turns < max_turns
    patient = turns if stopped_by_budget else max(0, turns - 1)
    return patient, int(diagnosed)


@dataclass
class Measurement:
    episodes: int  # completions inside the window
    rate: float  # episodes per second over the window
    calls_per_episode: float
    failed: int
    turnovers: float = 1.0  # completions ÷ episodes in flight: below 2 the window was cut by the time cap


def _rows_stats(rows: list[dict], max_turns: int) -> tuple[float, int]:
    calls = [sum(api_calls(row, max_turns)) for row in rows if row["valid"]]
    failed = sum(not row["valid"] for row in rows)
    return (sum(calls) / len(calls) if calls else float("nan")), failed


class CaseStream:
    """A new train case for every episode (one episode per group here: there is no learner)."""

    def __init__(self, config: Config, tag: str):
        self.sampler = CaseSampler(load_knowledge_base(), "train", config.train.seed)
        self.seed = config.train.seed
        self.tag = tag
        self._ids = count()

    def scenario(self) -> Scenario:
        index = next(self._ids)
        return Scenario(0, f"{self.tag}-{index:06d}", self.sampler.sample(), 1, 0, self.seed)


# ---- the naive design ---------------------------------------------------------------------------
@ray.remote
class SequentialRollout:
    """The naive design in a process of its own, as the original single-script trainer ran: one
    RolloutWorker allowed one episode in flight (``ray.episodes_per_worker=1``), its API-backed patient
    and judge in the same process, every call awaited in turn. Only the driver talks to it."""

    def __init__(self, config: Config, model_source: str, api_key: SecretStr):
        from grpodx.env import make_judge, make_patient
        from grpodx.rollout import RolloutWorker

        if config.ray.rollout_threads:
            torch.set_num_threads(config.ray.rollout_threads)
        self.patient, self.judge = make_patient(config, api_key), make_judge(config, api_key)
        self.worker = RolloutWorker("naive", config, model_source, self.patient, self.judge)

    async def run(self, scenarios: list[Scenario]) -> tuple[list[dict], float]:
        """Episodes one after another: their rows, and the seconds they took together."""
        rows, busy = [], 0.0
        for scenario in scenarios:
            started = time.perf_counter()
            batch = await self.worker.run_groups([scenario])
            busy += time.perf_counter() - started
            rows += batch.to_pylist()
        return rows, busy

    async def close(self) -> None:
        await self.patient.aclose()
        await self.judge.aclose()


def measure_naive(naive, cases: CaseStream, sizes: Sizes, max_turns: int) -> Measurement:
    """``min_episodes`` episodes one after another; episodes ÷ the time they took."""
    rows, busy = ray.get(naive.run.remote([cases.scenario() for _ in range(sizes.min_episodes)]))
    calls, failed = _rows_stats(rows, max_turns)
    return Measurement(len(rows), len(rows) / busy, calls, failed)


# ---- this system --------------------------------------------------------------------------------
def measure_system(
    workers: list, concurrency: int, cases: CaseStream, sizes: Sizes, max_turns: int
) -> Measurement:
    """``concurrency`` episodes in flight on each worker; the rate between the first and last completion.

    The window starts at the first completion (so the start, when every worker is still on its first
    turns, is left out) and ends at ``2 × workers × concurrency`` completions (every slot turned over
    twice; at least ``min_episodes``), or at ``max_window_s``. Episodes still running then are
    cancelled, not counted. A shorter window would over-count short episodes, which finish first.
    """
    in_flight: dict = {}

    def submit(worker_index: int) -> None:
        ref = workers[worker_index].run_groups.remote([cases.scenario()])
        in_flight[ref] = worker_index

    for index in range(len(workers)):
        for _ in range(concurrency):
            submit(index)
    target = max(sizes.min_episodes, 2 * len(workers) * concurrency)
    completed: list[tuple[float, dict]] = []
    deadline = time.perf_counter() + 300.0
    while True:
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=max(1.0, deadline - time.perf_counter()))
        if not ready:
            raise TimeoutError(f"no episode finished in 300 s ({len(workers)} workers, {concurrency} each)")
        now = time.perf_counter()
        others = [ref for ref in in_flight if ref not in ready]
        more, _ = ray.wait(others, num_returns=len(others), timeout=0) if others else ([], [])
        freed = []
        for ref in [*ready, *more]:
            freed.append(in_flight.pop(ref))
            completed += [(now, row) for row in ray.get(ref).to_pylist()]
        first = completed[0][0]
        out_of_time = len(completed) >= sizes.min_episodes and now - first >= sizes.max_window_s
        if len(completed) >= target or out_of_time:
            break
        for worker_index in freed:
            submit(worker_index)
    for ref in in_flight:
        ray.cancel(ref, recursive=False)
    # Let the cancellations land before the next setting starts; their errors are expected.
    ray.wait(list(in_flight), num_returns=len(in_flight), timeout=30)
    if concurrency >= SETTLE_FROM:
        # A cancelled episode leaves its current generate request in the engine's queue, and the
        # transformers engine still decodes it: with many cancelled, the next setting would start on
        # busy workers. One probe episode per worker, queued behind them, ends after they are done.
        ray.get([worker.run_groups.remote([cases.scenario()]) for worker in workers])
    # The episodes that finished after the window opened: the rate and the calls per episode are theirs.
    start = completed[0][0]
    inside = [row for t, row in completed if t > start]
    span = completed[-1][0] - start
    if not inside or span <= 0:
        raise RuntimeError("every episode finished at the same moment: no window to measure a rate over")
    calls, failed = _rows_stats(inside, max_turns)
    turnovers = len(completed) / (len(workers) * concurrency)
    return Measurement(len(inside), len(inside) / span, calls, failed, turnovers)


# ---- the benchmark ------------------------------------------------------------------------------
def run(ctx: BenchContext, latency_s: float = LATENCY_S) -> BenchResult:
    from grpodx.actors.run_actors import start_rollout_worker
    from grpodx.actors.sim import start_sim_workers

    sizes = SIZES[ctx.scale]
    in_flight_max = max(sizes.workers) * max(sizes.concurrency)
    model_source = ctx.model_source
    server = OpenAICompatibleServer(latency_s=latency_s).start()
    actors: list = []
    sims: tuple = ()
    naive = None
    try:
        config = ctx.derive(
            [
                "patient.kind=openai",
                f"patient.base_url={server.base_url}",
                f"patient.max_concurrency={max(64, in_flight_max)}",
                "judge.kind=openai",
                f"judge.base_url={server.base_url}",
                f"judge.max_concurrency={max(64, in_flight_max)}",
                f"ray.episodes_per_worker={max(sizes.concurrency)}",
            ]
        )
        naive_config = ctx.derive(
            [
                "patient.kind=openai",
                f"patient.base_url={server.base_url}",
                "judge.kind=openai",
                f"judge.base_url={server.base_url}",
                "ray.episodes_per_worker=1",
            ]
        )
        max_turns = config.episode.max_turns
        ctx.ray()
        ctx.log(f"rollout_api: starting {max(sizes.workers)} rollout actors and the naive loop's process")
        sims = start_sim_workers(config, DUMMY_KEY)
        actors = [
            start_rollout_worker(config, model_source, f"rollout-{i}", *sims)
            for i in range(max(sizes.workers))
        ]
        naive = SequentialRollout.options(num_cpus=config.ray.rollout_num_cpus).remote(
            naive_config, model_source, DUMMY_KEY
        )
        # The first episodes load the model, warm the engine and open the HTTP connections: not counted.
        warm = CaseStream(config, "warm-up")
        ray.get([actor.run_groups.remote([warm.scenario()]) for actor in actors])
        ray.get(naive.run.remote([warm.scenario()]))
        naive_rates, naive_calls, naive_failed, naive_episodes = [], [], 0, 0
        server_calls: list[float] = []
        system: dict[tuple[int, int], list[Measurement]] = {}
        for repeat in range(ctx.repeats):
            before = len(server.requests)
            sequential = measure_naive(naive, CaseStream(config, f"naive-{repeat}"), sizes, max_turns)
            server_calls.append((len(server.requests) - before) / sequential.episodes)
            naive_rates.append(sequential.rate)
            naive_calls.append(sequential.calls_per_episode)
            naive_failed += sequential.failed
            naive_episodes += sequential.episodes
            ctx.log(f"rollout_api repeat {repeat + 1}: naive {sequential.rate:.3f} episodes/s")
            for workers in sizes.workers:
                for concurrency in sizes.concurrency:
                    cases = CaseStream(config, f"r{repeat}-w{workers}-c{concurrency}")
                    measured = measure_system(actors[:workers], concurrency, cases, sizes, max_turns)
                    system.setdefault((workers, concurrency), []).append(measured)
                    ctx.log(
                        f"rollout_api repeat {repeat + 1}: {workers} worker(s) × {concurrency} "
                        f"in flight: {measured.rate:.2f} episodes/s"
                    )
    finally:
        release_actors([*actors, *sims] + ([naive] if naive is not None else []))
        server.stop()

    def ideal(in_flight: int, calls: list[float]) -> list[float]:
        return [in_flight / (c * latency_s) for c in calls]

    rows = [
        {
            "design": "naive (one episode at a time)",
            "workers": 1,
            "concurrency": 1,
            "episodes": naive_episodes,
            "episodes_per_s": stat(naive_rates),
            "speedup": ratio_stat(naive_rates, naive_rates),
            "api_calls_per_episode": stat(naive_calls),
            "ideal_episodes_per_s": stat(ideal(1, naive_calls)),
            "share_of_ideal": ratio_stat(naive_rates, ideal(1, naive_calls)),
            "turnovers": None,
            "failed": naive_failed,
        }
    ]
    for (workers, concurrency), runs in system.items():
        rates = [m.rate for m in runs]
        calls = [m.calls_per_episode for m in runs]
        rows.append(
            {
                "design": "Ray rollout actors",
                "workers": workers,
                "concurrency": concurrency,
                "episodes": sum(m.episodes for m in runs),
                "episodes_per_s": stat(rates),
                "speedup": ratio_stat(rates, naive_rates),
                "api_calls_per_episode": stat(calls),
                "ideal_episodes_per_s": stat(ideal(workers * concurrency, calls)),
                "share_of_ideal": ratio_stat(rates, ideal(workers * concurrency, calls)),
                "turnovers": min(m.turnovers for m in runs),
                "failed": sum(m.failed for m in runs),
            }
        )
    notes = [
        f"Latency: {latency_s * 1000:.0f} ms added by the loopback server (127.0.0.1) to every patient and "
        "judge request; the API-backed patient and judge talk to it through the real openai client.",
        "Concurrency: episodes kept in flight per rollout worker (a new one is submitted as each finishes; "
        "one episode per run_groups call, the actors' episodes_per_worker set to the largest concurrency).",
        "Episodes/s: the episodes that finished after the first completion ÷ the time from the first "
        "completion to the last (their API calls per episode are counted the same way); the window "
        f"ends at 2 × workers × concurrency completions (at least {sizes.min_episodes}; capped at "
        f"{sizes.max_window_s:g} s). Episodes still in flight then are cancelled and not counted (from "
        f"{SETTLE_FROM} in flight per worker, one more episode per worker then waits out their leftover "
        "engine work before the next setting). Naive: "
        f"{sizes.min_episodes} episodes ÷ their time, after one warm-up episode. Turnovers = completions ÷ "
        "episodes in flight (the smallest over repeats): below 2 the time cap cut the window, and since "
        "short episodes finish first, such a row over-states episodes/s and under-states API calls per "
        "episode; it happens where the CPU, not the API, is the limit.",
        "Ideal (latency-bound) episodes/s = workers × concurrency ÷ (API calls per episode × latency), "
        "where API calls per episode = patient replies (doctor turns − 1: the opening line is local) + 1 "
        "judge call when the episode gave a diagnosis (no diagnosis, no judge call), averaged over the "
        "measured episodes. It ignores generation time, so on a CPU the share of ideal falls once the "
        "cores are busy.",
        "Cross-check, naive design: requests counted at the server per episode = "
        f"{median_of(stat(server_calls)):.3f} vs {median_of(stat(naive_calls)):.3f} counted from the "
        "episodes.",
        f"Speed-up: per repeat, the setting's episodes/s ÷ the naive episodes/s of the same repeat; "
        f"medians over {ctx.repeats} repeat(s). Each rollout actor and the naive loop run torch with "
        f"{config.ray.rollout_threads or 'default'} thread(s); generation uses the doctor at "
        f"{model_source}.",
    ]
    return BenchResult(
        rows=rows,
        columns=[
            ("design", "design"),
            ("workers", "workers"),
            ("concurrency", "in flight / worker"),
            ("episodes", "episodes"),
            ("episodes_per_s", "episodes/s"),
            ("speedup", "speed-up vs naive"),
            ("api_calls_per_episode", "API calls / episode"),
            ("ideal_episodes_per_s", "ideal episodes/s"),
            ("share_of_ideal", "share of ideal"),
            ("turnovers", "turnovers"),
            ("failed", "failed"),
        ],
        notes=notes,
    )


BENCHMARK = Benchmark(
    name="rollout_api",
    title="rollout throughput with API latency",
    measures="Episodes per second when every patient and judge call takes "
    f"{LATENCY_S * 1000:.0f} ms: the naive sequential loop against Ray rollout actors at rising concurrency.",
    run=run,
)
