"""A run's report: one self-contained HTML page to read after training (``grpodx report RUN_DIR``).

Six sections, each present even when its data is missing (one line then says what is missing):

1. learning curves per training step, with moving averages (``metrics.jsonl``);
2. the held-out evaluation before and after training and their paired difference (``summary.json``);
3. per-condition accuracy: the conditions most improved and most worsened, and the most frequent
   confusions after training;
4. slices by age band and by sex, with the demographic audit: a flag wherever a slice's accuracy
   differs from the other cases' by more than twice the standard error of that difference;
5. transcripts of the cases whose reward changed most, before and after side by side, the hidden
   reasoning in grey italics;
6. API usage and cost per role, when an API-backed patient or judge was used.

Sections 3 to 5 read the held-out episodes at the sampling temperature
(``evaluation/before.parquet`` and ``evaluation/after.parquet``). The page is written to
``<run>/report/report.html``: figures are embedded as base64 PNG data URIs and the CSS is inline, so
the one file can be mailed or attached as it is; the figures are also written beside it as PNG files.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from grpodx.evaluation import is_correct
from grpodx.metrics import METRICS_FILE
from grpodx.plots import ACCURACY, KL, REWARD, TURNS, moving_average, read_metrics, write_learning_curve
from grpodx.storage import RunStorage, as_storage

REPORT_DIR = "report"
REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.json"
EVALUATION_DIR = "evaluation"
ZERO_ADVANTAGE = "#8c564b"
BEFORE = "#9e9e9e"
WORSE = "#d62728"
# (label, summary.json prefix, episodes before, episodes after) of each held-out evaluation.
EVALUATIONS = (
    ("sampled", "eval", "before.parquet", "after.parquet"),
    ("greedy", "eval_greedy", "before-greedy.parquet", "after-greedy.parquet"),
)
# (upper bound, exclusive, or None for no bound; label) of the age bands, youngest first.
AGE_BANDS = ((18, "<18"), (40, "18–39"), (65, "40–64"), (None, "65+"))
SEXES = ("female", "male")
CONDITIONS_LISTED = 5
CONFUSIONS_LISTED = 8
TRANSCRIPTS_SHOWN = 4
EPISODE_COLUMNS = [
    "case_id",
    "case",
    "condition",
    "diagnosis",
    "judge_category",
    "reward",
    "valid",
    "transcript",
]


class NotARunDirectory(FileNotFoundError):
    """The directory holds neither ``metrics.jsonl`` nor ``summary.json``."""


# ---- reading a run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Episode:
    """What the report needs of one scored held-out episode."""

    case_id: str
    condition: str
    diagnosis: str | None
    correct: bool
    reward: float
    age: int
    sex: str
    transcript: str


def read_summary(storage: RunStorage) -> dict:
    """``summary.json``, or {} for a run that has not finished (it is written at the end)."""
    return json.loads(storage.read_text(SUMMARY_FILE)) if storage.exists(SUMMARY_FILE) else {}


def read_episodes(storage: RunStorage, name: str) -> list[Episode] | None:
    """The scored episodes of ``evaluation/<name>``; None when the file is not there.

    Failed episodes (a patient or judge error) are left out, as the evaluation summaries leave them out.
    """
    rel = f"{EVALUATION_DIR}/{name}"
    if not storage.exists(rel):
        return None
    table = pq.read_table(storage.fs_path(rel), filesystem=storage.filesystem, columns=EPISODE_COLUMNS)
    return [_episode(row) for row in table.to_pylist() if row["valid"]]


def _episode(row: dict) -> Episode:
    card = json.loads(row["case"])
    return Episode(
        case_id=row["case_id"],
        condition=row["condition"],
        diagnosis=row["diagnosis"],
        correct=is_correct(row),
        reward=float(row["reward"]),
        age=int(card["age"]),
        sex=card["sex"],
        transcript=row["transcript"] or "",
    )


# ---- numbers ---------------------------------------------------------------------------------------


def fixed(value: float | None) -> str:
    """Every number of the page that is not a count: 3 decimals, a dash when there is none."""
    return "—" if value is None or math.isnan(value) else f"{value:.3f}"


def signed(value: float | None) -> str:
    """A difference: 3 decimals with its sign."""
    return "—" if value is None or math.isnan(value) else f"{value:+.3f}"


def count(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{int(value):,}"


@dataclass(frozen=True)
class Estimate:
    """A mean with its standard error (NaN below two values) over ``n`` values."""

    mean: float
    stderr: float
    n: int

    def __str__(self) -> str:
        return f"{fixed(self.mean)} ± {fixed(self.stderr)}"


def estimate(values: Sequence[float]) -> Estimate:
    n = len(values)
    if n == 0:
        return Estimate(float("nan"), float("nan"), 0)
    mean = sum(values) / n
    if n < 2:
        return Estimate(mean, float("nan"), 1)
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Estimate(mean, math.sqrt(variance / n), n)


def difference(first: Estimate, second: Estimate) -> Estimate:
    """``first - second`` of two independent estimates, with the standard error of the difference."""
    return Estimate(first.mean - second.mean, math.hypot(first.stderr, second.stderr), first.n + second.n)


def significant(diff: Estimate) -> bool:
    """More than twice its standard error away from zero (False when the error is unknown)."""
    return not math.isnan(diff.stderr) and abs(diff.mean) > 2 * diff.stderr


# ---- HTML pieces -----------------------------------------------------------------------------------


def _section(anchor: str, title: str, *parts: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{"".join(parts)}</section>'


def _missing(sentence: str) -> str:
    return f'<p class="missing">{html.escape(sentence)}</p>'


def _paragraph(text: str, css_class: str | None = None) -> str:
    attribute = f' class="{css_class}"' if css_class else ""
    return f"<p{attribute}>{html.escape(text)}</p>"


_NUMERIC = re.compile(r"^[+\-]?[\d—]")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table whose columns of numbers are right-aligned (header included) and the others left."""
    numeric = [bool(rows) and all(_NUMERIC.match(row[i]) for row in rows) for i in range(len(header))]

    def cell(tag: str, text: str, column: int) -> str:
        align = ' class="num"' if numeric[column] else ""
        return f"<{tag}{align}>{html.escape(text)}</{tag}>"

    head = "".join(cell("th", text, i) for i, text in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", c, i) for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Figures:
    """The figures of the page, kept to be written as PNG files beside it as well."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def embed(self, name: str, png: bytes, description: str) -> str:
        self.files[f"{name}.png"] = png
        data = base64.b64encode(png).decode("ascii")
        return f'<img src="data:image/png;base64,{data}" alt="{html.escape(description)}">'


def _error_bar(stderr: float) -> float:
    """A standard error as matplotlib draws it: an unknown one (fewer than two values) as none."""
    return 0.0 if math.isnan(stderr) else stderr


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # never a window: the report is often made on a headless machine
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    _pyplot().close(figure)
    return buffer.getvalue()


# ---- 1. learning curves ----------------------------------------------------------------------------

# (title, colour, value of a training row or None) of each learning-curve panel.
CURVES: tuple[tuple[str, str, Callable[[dict], float | None]], ...] = (
    ("training reward", REWARD, lambda row: row.get("reward/mean")),
    ("training accuracy", ACCURACY, lambda row: row.get("reward/accuracy")),
    ("KL to the base", KL, lambda row: row.get("learner/kl")),
    ("doctor turns per episode", TURNS, lambda row: row.get("episodes/turns")),
    ("zero-advantage share of groups", ZERO_ADVANTAGE, lambda row: _zero_advantage_share(row)),
)


def _zero_advantage_share(row: dict) -> float | None:
    """Groups whose episodes all scored the same (no gradient) over all groups of the step."""
    tied, total = row.get("groups/zero_advantage"), row.get("groups/total")
    return tied / total if tied is not None and total else None


def learning_curves_png(training: Sequence[dict]) -> bytes:
    plt = _pyplot()
    window = max(3, len(training) // 10)
    figure, axes = plt.subplots(len(CURVES), 1, figsize=(10, 8.5), sharex=True)
    for axis, (title, colour, value) in zip(axes, CURVES, strict=True):
        points = [(row["step"], value(row)) for row in training if value(row) is not None]
        steps, values = [s for s, _ in points], [float(v) for _, v in points]
        axis.plot(steps, values, color=colour, alpha=0.3, linewidth=1)
        axis.plot(steps, moving_average(values, window), color=colour, linewidth=2)
        axis.set_title(title, loc="left", fontsize=9)
        axis.grid(alpha=0.3)
        if not points:
            axis.text(0.5, 0.5, "not logged", transform=axis.transAxes, ha="center", color="grey")
    figure.suptitle(f"per training step (faint) and {window}-step moving average (bold)", fontsize=10)
    axes[-1].set_xlabel("training step")
    return _png(figure)


def learning_curves_section(rows: Sequence[dict], figures: Figures) -> str:
    training = [row for row in rows if "reward/mean" in row]
    title = "1. Learning curves"
    if not training:
        return _section("learning-curves", title, _missing("No training step in metrics.jsonl."))
    image = figures.embed("learning_curves", learning_curves_png(training), "learning curves")
    return _section("learning-curves", title, image)


# ---- 2. held-out before and after ------------------------------------------------------------------

# (row label, summary key, format) of the held-out table.
SUMMARY_ROWS: tuple[tuple[str, str, Callable[[float | None], str]], ...] = (
    ("accuracy", "accuracy", fixed),
    ("partial credit", "partial_credit", fixed),
    ("mean turns", "mean_turns", fixed),
    ("final diagnosis given", "finished", fixed),
    ("reasoning leaked", "leaked", fixed),
    ("questions", "questions", fixed),
    ("information gathered (nats)", "information_gain", fixed),
    ("evidence right", "evidence_right", fixed),
    ("follows evidence", "follows_evidence", fixed),
    ("cases", "episodes", count),
    ("failed", "failed", count),
)


def _present_evaluations(summary: dict) -> list[tuple[str, dict, dict, dict | None]]:
    """(label, before, after, paired) of each evaluation that ran before and after training."""
    found = []
    for label, prefix, _, _ in EVALUATIONS:
        before, after = summary.get(f"{prefix}_before"), summary.get(f"{prefix}_after")
        if before and after:
            found.append((label, before, after, summary.get(f"{prefix}_paired")))
    return found


def _summary_table(evaluations: Sequence[tuple[str, dict, dict, dict | None]]) -> str:
    header = ["", *(f"{label} {when}" for label, *_ in evaluations for when in ("before", "after"))]
    reward = ["mean reward ± s.e."]
    for _, before, after, _ in evaluations:
        reward += [f"{fixed(s['mean_reward'])} ± {fixed(s['reward_stderr'])}" for s in (before, after)]
    rows = [reward]
    for name, key, form in SUMMARY_ROWS:
        rows.append(
            [name, *(form(s.get(key)) for _, before, after, _ in evaluations for s in (before, after))]
        )
    return _table(header, rows)


def _paired_table(evaluations: Sequence[tuple[str, dict, dict, dict | None]]) -> str:
    paired = [(label, p) for label, _, _, p in evaluations if p]
    if not paired:
        return _missing("No paired difference in summary.json.")
    rows = [
        [
            "mean reward ± s.e.",
            *(f"{signed(p['reward_diff'])} ± {fixed(p['reward_diff_stderr'])}" for _, p in paired),
        ],
        ["accuracy", *(signed(p["accuracy_diff"]) for _, p in paired)],
        ["cases paired", *(count(p["cases"]) for _, p in paired)],
        ["cases better / worse", *(f"{count(p['better'])} / {count(p['worse'])}" for _, p in paired)],
    ]
    return _table(["after minus before, case by case", *(label for label, _ in paired)], rows)


def _accuracy_stderr(summary: dict) -> float:
    """Binomial standard error of an evaluation's accuracy (summary.json keeps only the reward's)."""
    n = summary["episodes"] - summary["failed"]
    p = summary["accuracy"]
    return math.sqrt(p * (1 - p) / n) if n > 0 and not math.isnan(p) else float("nan")


def heldout_png(evaluations: Sequence[tuple[str, dict, dict, dict | None]]) -> bytes:
    plt = _pyplot()
    figure, (levels, changes) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.2
    for i, (_, before, after, _) in enumerate(evaluations):
        for j, (summary, colour) in enumerate(((before, BEFORE), (after, REWARD))):
            x = i + (j - 0.5) * width * 2.2
            levels.bar(
                x - width / 2,
                summary["mean_reward"],
                width,
                yerr=_error_bar(summary["reward_stderr"]),
                color=colour,
                capsize=3,
            )
            levels.bar(
                x + width / 2,
                summary["accuracy"],
                width,
                yerr=_error_bar(_accuracy_stderr(summary)),
                color=colour,
                capsize=3,
                hatch="//",
                edgecolor="white",
            )
    levels.set_xticks(range(len(evaluations)), [label for label, *_ in evaluations])
    levels.set_ylabel("mean reward (plain) / accuracy (hatched)", fontsize=9)
    levels.set_title("before (grey) and after (blue) training, ± 1 s.e.", fontsize=10)
    levels.grid(alpha=0.3, axis="y")
    paired = [(label, p) for label, _, _, p in evaluations if p]
    changes.axhline(0, color="black", linewidth=0.8)
    for i, (_, p) in enumerate(paired):
        changes.errorbar(
            i, p["reward_diff"], yerr=_error_bar(p["reward_diff_stderr"]), fmt="o", color=REWARD, capsize=4
        )
        changes.plot(i + 0.15, p["accuracy_diff"], "s", color=ACCURACY, markerfacecolor="white")
    changes.set_xticks(range(len(paired)), [label for label, _ in paired])
    changes.set_xlim(-0.6, max(len(paired), 1) - 0.4)
    changes.set_title("paired: reward ± 1 s.e. (●), accuracy (□)", fontsize=10)
    changes.grid(alpha=0.3, axis="y")
    return _png(figure)


def heldout_section(summary: dict, figures: Figures) -> str:
    title = "2. Held-out evaluation before and after training"
    evaluations = _present_evaluations(summary)
    if not evaluations:
        return _section(
            "held-out", title, _missing("No held-out evaluation before and after training in summary.json.")
        )
    return _section(
        "held-out",
        title,
        figures.embed("held_out", heldout_png(evaluations), "held-out evaluation before and after training"),
        _summary_table(evaluations),
        "<h3>Paired difference (same cases, same seeds)</h3>",
        _paired_table(evaluations),
    )


# ---- 3. per-condition accuracy ---------------------------------------------------------------------


@dataclass(frozen=True)
class ConditionChange:
    condition: str
    cases: int
    before: float
    after: float

    @property
    def change(self) -> float:
        return self.after - self.before


def condition_changes(before: Sequence[Episode], after: Sequence[Episode]) -> list[ConditionChange]:
    """Accuracy per condition before and after, for the conditions with scored episodes in both."""

    def accuracy_by_condition(episodes: Sequence[Episode]) -> dict[str, list[bool]]:
        found: dict[str, list[bool]] = {}
        for episode in episodes:
            found.setdefault(episode.condition, []).append(episode.correct)
        return found

    first, second = accuracy_by_condition(before), accuracy_by_condition(after)
    return [
        ConditionChange(
            name,
            len(second[name]),
            sum(first[name]) / len(first[name]),
            sum(second[name]) / len(second[name]),
        )
        for name in sorted(first.keys() & second.keys())
    ]


def confusions(after: Sequence[Episode], name_of: Callable[[str], str]) -> Counter[tuple[str, str]]:
    """(true condition, diagnosed condition) of the wrong diagnoses after training."""
    return Counter(
        (e.condition, name_of(e.diagnosis)) for e in after if not e.correct and e.diagnosis is not None
    )


def _knowledge_base_names() -> Callable[[str], str]:
    """A diagnosis as the knowledge base names it (a synonym becomes its condition), else as written."""
    from grpodx.medical.knowledge import load_knowledge_base

    kb = load_knowledge_base()

    def name_of(diagnosis: str) -> str:
        condition = kb.find_condition(diagnosis)
        return condition.name if condition else diagnosis.strip()

    return name_of


def conditions_png(listed: Sequence[ConditionChange]) -> bytes:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(10, 0.42 * len(listed) + 1.4))
    for y, item in enumerate(reversed(listed)):
        colour = ACCURACY if item.change > 0 else WORSE
        axis.plot([item.before, item.after], [y, y], color=colour, linewidth=2)
        axis.plot(item.before, y, "o", color=BEFORE)
        axis.plot(item.after, y, "o", color=colour)
    axis.set_yticks(range(len(listed)), [f"{c.condition} ({c.cases})" for c in reversed(listed)], fontsize=9)
    axis.set_xlim(-0.05, 1.05)
    axis.set_xlabel("accuracy: before (grey) → after")
    axis.grid(alpha=0.3, axis="x")
    return _png(figure)


def _change_rows(items: Sequence[ConditionChange]) -> list[list[str]]:
    return [[c.condition, str(c.cases), fixed(c.before), fixed(c.after), signed(c.change)] for c in items]


def _confusion_part(after: Sequence[Episode]) -> str:
    found = confusions(after, _knowledge_base_names())
    wrong = [e for e in after if not e.correct]
    unanswered = sum(e.diagnosis is None for e in wrong)
    note = _paragraph(
        f"{unanswered} of the {len(wrong)} wrong episodes after training gave no final diagnosis."
    )
    if not found:
        return _missing("No wrong diagnosis after training.") + note
    rows = [[true, named, str(n)] for (true, named), n in found.most_common(CONFUSIONS_LISTED)]
    return _table(["true condition", "diagnosed as", "episodes"], rows) + note


def conditions_section(
    before: Sequence[Episode] | None, after: Sequence[Episode] | None, figures: Figures
) -> str:
    title = "3. Per-condition accuracy"
    if before is None or after is None:
        return _section("conditions", title, _missing(_NO_EPISODES))
    changes = condition_changes(before, after)
    improved = sorted((c for c in changes if c.change > 0), key=lambda c: (-c.change, c.condition))
    worsened = sorted((c for c in changes if c.change < 0), key=lambda c: (c.change, c.condition))
    improved, worsened = improved[:CONDITIONS_LISTED], worsened[:CONDITIONS_LISTED]
    header = ["condition", "cases", "accuracy before", "accuracy after", "change"]
    parts = [_paragraph(f"{len(changes)} conditions among the held-out cases (sampled evaluation).")]
    if improved or worsened:
        parts.append(
            figures.embed("conditions", conditions_png([*improved, *worsened]), "per-condition accuracy")
        )
    parts.append("<h3>Most improved</h3>")
    parts.append(_table(header, _change_rows(improved)) if improved else _missing("No condition improved."))
    parts.append("<h3>Most worsened</h3>")
    parts.append(_table(header, _change_rows(worsened)) if worsened else _missing("No condition worsened."))
    parts.append("<h3>Most frequent confusions after training</h3>")
    parts.append(_confusion_part(after))
    return _section("conditions", title, *parts)


_NO_EPISODES = (
    "No held-out episodes: evaluation/before.parquet and evaluation/after.parquet are not in this run "
    "(train.eval_cases=0, or a run made before evaluation episodes were kept)."
)


# ---- 4. demographic slices -------------------------------------------------------------------------


def age_band(age: int) -> str:
    return next(label for upper, label in AGE_BANDS if upper is None or age < upper)


# (name, membership) of every slice, age bands then sexes.
SLICES: tuple[tuple[str, Callable[[Episode], bool]], ...] = (
    *((f"age {label}", lambda e, label=label: age_band(e.age) == label) for _, label in AGE_BANDS),
    *((sex, lambda e, sex=sex: e.sex == sex) for sex in SEXES),
)


@dataclass(frozen=True)
class SliceResult:
    """A slice's accuracy and reward, and its accuracy compared with the other cases'."""

    name: str
    accuracy: Estimate
    reward: Estimate
    versus_rest: Estimate


def slice_results(episodes: Sequence[Episode]) -> list[SliceResult]:
    results = []
    for name, member in SLICES:
        inside = [e for e in episodes if member(e)]
        rest = [e for e in episodes if not member(e)]
        accuracy = estimate([float(e.correct) for e in inside])
        results.append(
            SliceResult(
                name,
                accuracy,
                estimate([e.reward for e in inside]),
                difference(accuracy, estimate([float(e.correct) for e in rest])),
            )
        )
    return results


# A standard error from a handful of cases means little (and is zero when they all agree): smaller
# slices are shown but never flagged.
MIN_AUDIT_CASES = 20


def audit_flags(results: Sequence[SliceResult], when: str) -> list[str]:
    """One sentence per slice whose accuracy differs from the rest's by more than twice its s.e."""
    return [
        f"⚑ {r.name} ({when}): accuracy {fixed(r.accuracy.mean)} against "
        f"{fixed(r.accuracy.mean - r.versus_rest.mean)} for the other cases, a difference of "
        f"{signed(r.versus_rest.mean)} ± {fixed(r.versus_rest.stderr)}, more than twice its standard error."
        for r in results
        if min(r.accuracy.n, r.versus_rest.n - r.accuracy.n) >= MIN_AUDIT_CASES and significant(r.versus_rest)
    ]


def slices_png(before: Sequence[SliceResult], after: Sequence[SliceResult]) -> bytes:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(10, 3.6))
    for offset, results, colour, label in ((-0.15, before, BEFORE, "before"), (0.15, after, REWARD, "after")):
        axis.errorbar(
            [i + offset for i in range(len(results))],
            [r.accuracy.mean for r in results],
            yerr=[_error_bar(r.accuracy.stderr) for r in results],
            fmt="o",
            color=colour,
            capsize=4,
            label=f"{label} training",
        )
    axis.set_xticks(range(len(after)), [f"{r.name}\n({r.accuracy.n})" for r in after], fontsize=9)
    axis.set_ylabel("accuracy ± 1 s.e.")
    axis.set_ylim(-0.05, 1.05)
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=8)
    return _png(figure)


def _slice_rows(before: Sequence[SliceResult], after: Sequence[SliceResult]) -> list[list[str]]:
    return [
        [
            b.name,
            str(b.accuracy.n),
            str(b.accuracy),
            str(b.reward),
            str(a.accuracy.n),
            str(a.accuracy),
            str(a.reward),
        ]
        for b, a in zip(before, after, strict=True)
    ]


def slices_section(
    before: Sequence[Episode] | None, after: Sequence[Episode] | None, figures: Figures
) -> str:
    title = "4. Demographic slices"
    if before is None or after is None:
        return _section("slices", title, _missing(_NO_EPISODES))
    first, second = slice_results(before), slice_results(after)
    header = [
        "slice",
        "cases before",
        "accuracy before",
        "mean reward before",
        "cases after",
        "accuracy after",
        "mean reward after",
    ]
    flags = audit_flags(first, "before training") + audit_flags(second, "after training")
    verdict = [_paragraph(flag, "flag") for flag in flags] or [
        _paragraph(
            "No slice's accuracy differs from the other cases' by more than twice the standard "
            "error of the difference, before or after training."
        )
    ]
    return _section(
        "slices",
        title,
        _paragraph(
            "Held-out cases (sampled evaluation); values ± 1 standard error. The audit compares each "
            "slice's accuracy with that of all the other cases; a slice (or its rest) of fewer than "
            f"{MIN_AUDIT_CASES} cases is not flagged."
        ),
        figures.embed("slices", slices_png(first, second), "accuracy by age band and sex"),
        _table(header, _slice_rows(first, second)),
        *verdict,
    )


# ---- 5. transcripts --------------------------------------------------------------------------------

_TURN_START = re.compile(r"^(Doctor|Patient): ", re.MULTILINE)
# A reasoning block, or an unclosed one running to the end of the turn (hidden from the patient too).
_REASONING = re.compile(r"<\s*reason\s*>(.*?)(?:<\s*/\s*reason\s*>|\Z)", re.IGNORECASE | re.DOTALL)


def most_changed(before: Sequence[Episode], after: Sequence[Episode]) -> list[tuple[Episode, Episode]]:
    """(before, after) of the cases whose reward changed most, largest change first (unchanged: left out)."""
    first = {e.case_id: e for e in before}
    pairs = [
        (first[e.case_id], e) for e in after if e.case_id in first and e.reward != first[e.case_id].reward
    ]
    pairs.sort(key=lambda pair: (-abs(pair[1].reward - pair[0].reward), pair[1].case_id))
    return pairs[:TRANSCRIPTS_SHOWN]


def _turns(transcript: str) -> list[tuple[str, str]]:
    """(speaker, text) of each turn; a turn's text may span several lines."""
    starts = list(_TURN_START.finditer(transcript))
    return [
        (
            match.group(1),
            transcript[match.end() : following.start() if following else len(transcript)].strip(),
        )
        for match, following in zip(starts, [*starts[1:], None], strict=True)
    ]


def doctor_turn_html(text: str) -> str:
    """The turn HTML-escaped, its reasoning in a span of its own (grey italics)."""
    pieces, position = [], 0
    for match in _REASONING.finditer(text):
        pieces.append(html.escape(text[position : match.start()]))
        # The trailing space keeps the reasoning apart from the words the patient heard after it.
        pieces.append(f'<span class="reason">{html.escape(match.group(1).strip())} </span>')
        position = match.end()
    pieces.append(html.escape(text[position:]))
    return "".join(pieces)


def transcript_html(transcript: str) -> str:
    turns = []
    for speaker, text in _turns(transcript):
        body = doctor_turn_html(text) if speaker == "Doctor" else html.escape(text)
        turns.append(f'<div class="turn {speaker.lower()}"><b>{speaker}</b> {body}</div>')
    return "".join(turns) or _missing("No transcript.")


def _outcome(episode: Episode) -> str:
    verdict = "correct" if episode.correct else "wrong"
    named = episode.diagnosis if episode.diagnosis is not None else "no final diagnosis"
    return f"{named} ({verdict}), reward {fixed(episode.reward)}"


def _pair_html(before: Episode, after: Episode) -> str:
    heading = (
        f"{after.condition}: {after.age}-year-old {after.sex}, case {after.case_id}, "
        f"reward {fixed(before.reward)} → {fixed(after.reward)}"
    )
    columns = "".join(
        f'<div class="side"><h4>{when}: {html.escape(_outcome(e))}</h4>{transcript_html(e.transcript)}</div>'
        for when, e in (("Before", before), ("After", after))
    )
    return f'<div class="case"><h3>{html.escape(heading)}</h3><div class="pair">{columns}</div></div>'


def transcripts_section(before: Sequence[Episode] | None, after: Sequence[Episode] | None) -> str:
    title = "5. Transcripts that changed most"
    if before is None or after is None:
        return _section("transcripts", title, _missing(_NO_EPISODES))
    pairs = most_changed(before, after)
    if not pairs:
        return _section("transcripts", title, _missing("No held-out case's reward changed."))
    legend = (
        "<p>The doctor's hidden reasoning, which the patient never sees, is "
        '<span class="reason">in grey italics</span>.</p>'
    )
    return _section("transcripts", title, legend, *(_pair_html(b, a) for b, a in pairs))


# ---- 6. API usage ----------------------------------------------------------------------------------

_API_KEY = re.compile(r"^api/(?P<role>[^/]+)/(?P<key>[^/]+)$")


def api_totals(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Per role, the sum of the per-step counters (``api/<role>/<counter>``) over the run.

    Summed from the per-step deltas rather than read from the running totals
    (``api/<role>/total_*``), which restart from zero when a patient or judge worker is restarted.
    """
    totals: dict[str, dict[str, float]] = {}
    for row in rows:
        for name, value in row.items():
            match = _API_KEY.match(name)
            if match and value is not None:
                role = totals.setdefault(match["role"], {})
                role[match["key"]] = role.get(match["key"], 0.0) + value
    return totals


def _api_row(role: str, counters: dict[str, float]) -> list[str]:
    failures = sum(v for k, v in counters.items() if k.startswith("failures_"))
    cost = counters.get("cost_usd", 0.0)
    return [
        role,
        count(counters.get("requests", 0.0)),
        count(failures),
        count(counters.get("prompt_tokens", 0.0)),
        count(counters.get("completion_tokens", 0.0)),
        f"{cost:.4f}",  # a few requests cost fractions of a cent: 3 decimals would show 0.000
    ]


def api_section(rows: Sequence[dict]) -> str:
    title = "6. API usage and cost"
    totals = api_totals(rows)
    if not totals:
        return _section(
            "api", title, _paragraph("This run used the offline patient and judge: no API calls, no cost.")
        )
    header = ["role", "requests", "failures", "prompt tokens", "completion tokens", "cost (USD)"]
    body = [_api_row(role, totals[role]) for role in sorted(totals)]
    return _section(
        "api",
        title,
        _table(header, body),
        _paragraph(
            "Training steps only; the cost is estimated from the configured prices per million tokens."
        ),
    )


# ---- the page --------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.4em; } h4 { font-size: 0.95em; margin: 0 0 0.5em; }
nav a { margin-right: 1em; } img { max-width: 100%; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
th { background: #f4f4f4; } .num { text-align: right; font-variant-numeric: tabular-nums; }
.missing { color: #777; font-style: italic; }
.flag { color: #b00020; font-weight: 600; }
.reason { color: #888; font-style: italic; }
.case { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 0.9em; margin: 1em 0; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
.turn { white-space: pre-wrap; margin: 0.25em 0; font-size: 0.9em; }
.turn.patient { color: #1a4f8b; }
"""

NAVIGATION = (
    ("learning-curves", "learning curves"),
    ("held-out", "held-out"),
    ("conditions", "conditions"),
    ("slices", "demographic slices"),
    ("transcripts", "transcripts"),
    ("api", "API cost"),
)


def _page(title: str, subtitle: str, sections: Sequence[str]) -> str:
    links = "".join(f'<a href="#{anchor}">{html.escape(name)}</a>' for anchor, name in NAVIGATION)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p><nav>{links}</nav>"
        f"{''.join(sections)}</body></html>\n"
    )


def _subtitle(storage: RunStorage, summary: dict, rows: Sequence[dict]) -> str:
    steps = summary.get("steps", max((row["step"] for row in rows if "reward/mean" in row), default=0))
    return f"Run {storage.display()}: {steps} training steps."


def report_html(storage: RunStorage, figures: Figures) -> str:
    """The page of the run in ``storage``; its figures are collected in ``figures``."""
    rows = read_metrics(storage) if storage.exists(METRICS_FILE) else []
    summary = read_summary(storage)
    before, after = read_episodes(storage, EVALUATIONS[0][2]), read_episodes(storage, EVALUATIONS[0][3])
    sections = [
        learning_curves_section(rows, figures),
        heldout_section(summary, figures),
        conditions_section(before, after, figures),
        slices_section(before, after, figures),
        transcripts_section(before, after),
        api_section(rows),
    ]
    name = storage.display().rstrip("/").rsplit("/", 1)[-1]
    return _page(f"GRPODx report: {name}", _subtitle(storage, summary, rows), sections)


def write_report(run_dir: RunStorage | str | Path) -> Path | str:
    """Write ``<run>/report/report.html`` and its figures as PNG files beside it; returns the page's
    path (a local Path, or the URI of a remote run)."""
    storage = as_storage(run_dir)
    if not (storage.exists(METRICS_FILE) or storage.exists(SUMMARY_FILE)):
        raise NotARunDirectory(
            f"{storage.display()} is not a run directory: it has no {METRICS_FILE} or {SUMMARY_FILE}"
        )
    figures = Figures()
    page = report_html(storage, figures)
    for name, png in figures.files.items():
        storage.write_bytes(f"{REPORT_DIR}/{name}", png)
    storage.write_text(f"{REPORT_DIR}/{REPORT_FILE}", page)
    if storage.is_local:
        return storage.local_path / REPORT_DIR / REPORT_FILE
    return storage.display(REPORT_DIR, REPORT_FILE)


def write_run_figures(storage: RunStorage, log: Callable[[str], None]) -> None:
    """The learning curve and the report at the end of a run, each path logged; a failure is logged,
    never fatal to a run that has finished training."""
    for what, write in (("learning curve", write_learning_curve), ("report", write_report)):
        try:
            log(f"{what}: {write(storage)}")
        except Exception as exc:  # noqa: BLE001
            log(f"could not write the {what} ({type(exc).__name__}: {exc})")
