"""`grpodx report`: one self-contained HTML page of a run, built from the files a run leaves behind.

The synthetic run below is designed so that every finding is known in advance: which condition
improved and which worsened, the confusion after training, the one demographic slice the audit must
flag (patients of 65 and over after training) and those it must not (the sexes, and everything before
training), and the case whose reward changed most.
"""

from __future__ import annotations

import base64
import io
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from grpodx.cli import app
from grpodx.data.trajectory import TRAJECTORY_SCHEMA
from grpodx.medical.cases import CaseCard
from grpodx.report import Episode, Figures, conditions_section, write_report
from tests.conftest import small_run_settings

SECTION_HEADINGS = (
    "1. Learning curves",
    "2. Held-out evaluation before and after training",
    "3. Per-condition accuracy",
    "4. Demographic slices",
    "5. Transcripts that changed most",
    "6. API usage and cost",
)
CASES = 80
AGES = (10, 30, 50, 70)  # one per age band, cycling with the case index
# (correct before, correct after) -> (condition, diagnosis when wrong): the outcome fixes the condition,
# so each condition's change in accuracy is known.
CONDITION_BY_OUTCOME = {
    (False, True): ("Community-acquired pneumonia", "Acute bronchitis"),  # improved: 0 -> 1
    (True, False): ("Migraine", "tension headache"),  # worsened: 1 -> 0, a synonym of Tension-type headache
    (True, True): ("Asthma exacerbation", None),
    (False, False): ("Gout", "Septic arthritis"),
}
LARGEST_CHANGE_CASE = 1  # a worsened case whose reward falls from 1.0 to 0.0; every other change is 0.8

SUMMARY = {
    "steps": 30,
    "eval_before": {
        "episodes": 80.0,
        "failed": 0.0,
        "accuracy": 0.4125,
        "mean_reward": 0.42137,
        "reward_stderr": 0.03121,
        "partial_credit": 0.51234,
        "mean_turns": 3.45678,
        "finished": 0.91234,
        "leaked": 0.01234,
        "questions": 2.34567,
        "information_gain": 0.87654,
        "information_per_question": 0.3737,
        "evidence_right": 0.61111,
        "follows_evidence": 0.52222,
    },
    "eval_after": {
        "episodes": 81.0,
        "failed": 1.0,
        "accuracy": 0.6625,
        "mean_reward": 0.60871,
        "reward_stderr": 0.02904,
        "partial_credit": 0.68888,
        "mean_turns": 2.98765,
        "finished": 0.97777,
        "leaked": 0.00444,
        "questions": 1.98765,
        "information_gain": 1.01234,
        "information_per_question": 0.5093,
        "evidence_right": 0.70333,
        "follows_evidence": 0.66444,
    },
    "eval_paired": {
        "cases": 80.0,
        "reward_diff": 0.18734,
        "reward_diff_stderr": 0.02191,
        "accuracy_diff": 0.25,
        "better": 31.0,
        "worse": 12.0,
    },
    "eval_greedy_before": {
        "episodes": 80.0,
        "failed": 0.0,
        "accuracy": 0.4875,
        "mean_reward": 0.50311,
        "reward_stderr": 0.03333,
    },
    "eval_greedy_after": {
        "episodes": 80.0,
        "failed": 0.0,
        "accuracy": 0.7125,
        "mean_reward": 0.69123,
        "reward_stderr": 0.02777,
    },
    "eval_greedy_paired": {
        "cases": 80.0,
        "reward_diff": 0.18812,
        "reward_diff_stderr": 0.01987,
        "accuracy_diff": 0.225,
        "better": 25.0,
        "worse": 7.0,
    },
}


def _correct(index: int, after: bool) -> bool:
    """Before: right for half of every slice alike. After: 16 of 20 in each band under 65, 4 of 20 at
    65 and over, the same for women and men."""
    if not after:
        return (index // 8) % 2 == 0
    elderly = AGES[index % 4] >= 65
    return ((index // 4) % 5 == 0) == elderly


def _card(index: int, condition: str) -> dict:
    card = CaseCard(
        case_id=f"eval-{index:04d}",
        split="eval",
        seed=index,
        condition=condition,
        icd10="X00",
        age=AGES[index % 4],
        sex="female" if (index // 4) % 2 == 0 else "male",
        chief_complaint="cough",
        present=("cough",),
        absent=("fever",),
    )
    return card.to_dict()


def _episode(index: int, after: bool) -> dict:
    outcome = (_correct(index, False), _correct(index, True))
    condition, wrong_answer = CONDITION_BY_OUTCOME[outcome]
    correct = outcome[after]
    diagnosis = condition if correct else wrong_answer
    reward = 0.9 if correct else 0.1
    if index == LARGEST_CHANGE_CASE:
        reward = 0.0 if after else 1.0
    transcript = (
        f"Doctor: <reason>Cough & fever in case {index}: think of {condition}</reason>What brings you in?\n"
        "Patient: A cough <b>for days</b> & chills.\n"
        "Doctor: Any chest pain & <i>wheeze</i>?\n"
        "Patient: No.\n"
        f"Doctor: <reason>Enough.</reason>Final diagnosis: {diagnosis}"
    )
    return {
        "step": 30 if after else 0,
        "case_id": f"eval-{index:04d}",
        "case": json.dumps(_card(index, condition)),
        "condition": condition,
        "diagnosis": diagnosis,
        "judge_category": "exact" if correct else "wrong",
        "reward": reward,
        "valid": True,
        "transcript": transcript,
        "transcript_visible": re.sub(r"<reason>.*?</reason>", "", transcript),
        "turns": 2,
        "reasoning_leaks": 0,
    }


def _failed_episode() -> dict:
    """An episode whose judge call failed: it must count nowhere."""
    return {
        **_episode(0, after=True),
        "case_id": "eval-failed",
        "valid": False,
        "reward": None,
        "judge_category": None,
        "error": "judge: timeout",
    }


def _write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=TRAJECTORY_SCHEMA), path)


def _metrics_rows(api: bool) -> list[dict]:
    rows = [{"step": 0, "eval/mean_reward": 0.42137, "eval/reward_stderr": 0.03121}]
    for step in range(1, 31):
        row = {
            "step": step,
            "reward/mean": 0.4 + 0.006 * step,
            "reward/accuracy": 0.35 + 0.01 * step,
            "learner/kl": 0.001 * step if step != 4 else float("nan"),
            "episodes/turns": 3.5 - 0.02 * step,
            "groups/zero_advantage": float(step % 3),
            "groups/total": 4.0,
        }
        if api:
            for role, requests in (("patient", 10.0), ("judge", 4.0)):
                row |= {
                    f"api/{role}/requests": requests,
                    f"api/{role}/failures_timeout": 1.0 if step == 7 else 0.0,
                    f"api/{role}/prompt_tokens": 100 * requests,
                    f"api/{role}/completion_tokens": 20 * requests,
                    f"api/{role}/cost_usd": 0.0001 * requests,
                    f"api/{role}/total_cost_usd": 0.0001 * requests * step,  # running total: not summed
                }
        rows.append(row)
    rows.append({"step": 30, "eval/mean_reward": 0.60871, "eval/reward_stderr": 0.02904})
    return rows


def make_run(root, *, api: bool = True, evaluation: bool = True, summary: bool = True):
    """A run directory with the files a finished run leaves behind."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in _metrics_rows(api)))
    if summary:
        (root / "summary.json").write_text(json.dumps(SUMMARY, indent=2))
    if evaluation:
        _write_parquet(root / "evaluation" / "before.parquet", [_episode(i, False) for i in range(CASES)])
        after = [_episode(i, True) for i in range(CASES)] + [_failed_episode()]
        _write_parquet(root / "evaluation" / "after.parquet", after)
        training = [{**_episode(i, False), "step": 1, "group_id": "g0"} for i in range(4)]
        _write_parquet(root / "trajectories" / "step-000001.parquet", training)
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """(run directory, the report's HTML) of the full synthetic run."""
    run = make_run(tmp_path_factory.mktemp("runs") / "run-full")
    path = write_report(str(run))
    assert path == run / "report" / "report.html"
    return run, path.read_text()


def _section(page: str, anchor: str) -> str:
    return re.search(rf'<section id="{anchor}">(.*?)</section>', page, re.DOTALL).group(1)


def _numbers(*cells: str) -> str:
    """Table cells of numbers, as the page writes them (right-aligned)."""
    return "".join(f'<td class="num">{cell}</td>' for cell in cells)


def _embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_the_page_is_self_contained_and_every_image_decodes(report):
    from matplotlib.image import imread

    run, page = report
    for link in re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]+)', page):
        assert link.startswith(("data:image/png;base64,", "#")), link
    assert "http://" not in page and "https://" not in page and "url(" not in page
    images = _embedded_pngs(page)
    assert len(images) == 4  # learning curves, held-out, conditions, slices
    for png in images:
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert imread(io.BytesIO(png)).shape[0] > 200
    # The same figures as PNG files beside the page.
    files = {p.name: p.read_bytes() for p in (run / "report").glob("*.png")}
    assert set(files) == {"learning_curves.png", "held_out.png", "conditions.png", "slices.png"}
    assert sorted(files.values()) == sorted(images)


def test_every_section_is_there(report):
    _, page = report
    for heading in SECTION_HEADINGS:
        assert f"<h2>{heading}</h2>" in page


def test_held_out_numbers_are_those_of_summary_json(report):
    _, page = report
    held_out = _section(page, "held-out")
    for mode in ("eval", "eval_greedy"):
        for when in ("before", "after"):
            summary = SUMMARY[f"{mode}_{when}"]
            assert f"{summary['mean_reward']:.3f} ± {summary['reward_stderr']:.3f}" in held_out
            for key in ("accuracy", "mean_turns", "partial_credit", "finished", "leaked", "information_gain"):
                if key in summary:
                    assert f">{summary[key]:.3f}</td>" in held_out, (mode, when, key)
        paired = SUMMARY[f"{mode}_paired"]
        assert f"{paired['reward_diff']:+.3f} ± {paired['reward_diff_stderr']:.3f}" in held_out
        assert f">{paired['accuracy_diff']:+.3f}</td>" in held_out
        assert f">{int(paired['better'])} / {int(paired['worse'])}</td>" in held_out
    # A summary without a greedy evaluation leaves a greedy column out, not an empty one.
    assert '<th class="num">greedy before</th>' in held_out


def test_conditions_most_improved_most_worsened_and_confusions(report):
    _, page = report
    conditions = _section(page, "conditions")
    improved, worsened, confused = re.split(
        r"<h3>Most worsened</h3>|<h3>Most frequent confusions", conditions
    )
    assert "Community-acquired pneumonia" in improved and "+1.000" in improved
    assert "Migraine" in worsened and "-1.000" in worsened
    for unchanged in ("Asthma exacerbation", "Gout"):
        assert unchanged not in improved and unchanged not in worsened
    # The synonym the doctor wrote is named as the knowledge base's condition.
    assert "<td>Migraine</td><td>Tension-type headache</td>" in confused
    assert "<td>Gout</td><td>Septic arthritis</td>" in confused
    assert "Acute bronchitis" not in confused  # pneumonia is always right after training


def _scored(condition: str, correct: bool) -> Episode:
    return Episode("c", condition, None, correct, float(correct), 30, "female", "")


def test_only_the_five_largest_changes_are_listed():
    # Seven conditions that improve by 1/7, 2/7, ..., 7/7 (k of 7 cases right after, none before).
    before, after = [], []
    for k in range(1, 8):
        before += [_scored(f"Condition {k}", False) for _ in range(7)]
        after += [_scored(f"Condition {k}", i < k) for i in range(7)]
    section = conditions_section(before, after, Figures())
    improved = section.split("<h3>Most worsened</h3>")[0]
    assert [f"Condition {k}<" in improved for k in range(1, 8)] == [
        False,
        False,
        True,
        True,
        True,
        True,
        True,
    ]
    assert improved.index("Condition 7<") < improved.index("Condition 3<")  # largest change first


def test_the_demographic_audit_flags_the_slice_that_differs_and_no_other(report):
    _, page = report
    slices = _section(page, "slices")
    flags = re.findall(r'<p class="flag">(.*?)</p>', slices)
    # Only 65+ after training: the other bands (0.800 against 0.600) stay within twice the error of
    # their difference, and before training, like women and men throughout, every slice equals the rest.
    assert len(flags) == 1, flags
    assert flags[0].startswith("⚑ age 65+ (after training): accuracy 0.200 against 0.800 for the other cases")
    assert "No slice's accuracy differs" not in slices
    # Counts, accuracy and reward with standard errors, before and after: 20 cases per age band.
    assert "<td>age 65+</td>" + _numbers("20", "0.500 ± 0.115") in slices
    assert "<td>female</td>" + _numbers("40") in slices


def test_transcripts_of_the_largest_changes_with_reasoning_set_apart_and_escaped(report):
    _, page = report
    transcripts = _section(page, "transcripts")
    cases = re.findall(r'<div class="case"><h3>(.*?)</h3>', transcripts)
    assert len(cases) == 4
    assert cases[0].startswith(f"Migraine: 30-year-old female, case eval-{LARGEST_CHANGE_CASE:04d}")
    assert "reward 1.000 → 0.000" in cases[0]
    assert not [case for case in cases if "Asthma exacerbation" in case or "Gout" in case]  # unchanged
    assert '<span class="reason">Cough &amp; fever in case 1: think of Migraine </span>' in transcripts
    assert "A cough &lt;b&gt;for days&lt;/b&gt; &amp; chills." in transcripts
    assert "Any chest pain &amp; &lt;i&gt;wheeze&lt;/i&gt;?" in transcripts
    assert (
        "<b>for days</b>" not in transcripts
        and "<i>wheeze" not in transcripts
        and "&lt;reason&gt;" not in transcripts
    )


def test_api_usage_is_summed_per_role(report):
    _, page = report
    api = _section(page, "api")
    # 30 steps of 10 (patient) and 4 (judge) requests; one timeout each; cost 0.0001 per request.
    assert "<tr><td>judge</td>" + _numbers("120", "1", "12,000", "2,400", "0.0120") + "</tr>" in api
    assert "<tr><td>patient</td>" + _numbers("300", "1", "30,000", "6,000", "0.0300") + "</tr>" in api


def test_a_run_without_evaluation_episodes_or_api_says_so_in_each_section(tmp_path):
    run = make_run(tmp_path / "run", api=False, evaluation=False, summary=False)
    page = write_report(run).read_text()
    for heading in SECTION_HEADINGS:
        assert f"<h2>{heading}</h2>" in page
    assert "No held-out evaluation before and after training in summary.json." in page
    for anchor in ("conditions", "slices", "transcripts"):
        assert "No held-out episodes: evaluation/before.parquet" in _section(page, anchor)
    assert "This run used the offline patient and judge: no API calls, no cost." in page
    assert len(_embedded_pngs(page)) == 1  # the learning curves only


def test_cli_writes_the_report_and_prints_its_path(tmp_path):
    run = make_run(tmp_path / "run")
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(run / "report" / "report.html")
    assert (run / "report" / "report.html").stat().st_size > 10_000


@pytest.mark.parametrize("kind", ["missing", "not a run"])
def test_cli_refuses_a_directory_that_is_not_a_run(tmp_path, kind):
    target = tmp_path / "nowhere"
    if kind == "not a run":
        target.mkdir()
        (target / "notes.txt").write_text("hello")
    result = CliRunner().invoke(app, ["report", str(target)])
    assert result.exit_code == 2
    assert (
        result.output.strip()
        == f"error: {target} is not a run directory: it has no metrics.jsonl or summary.json"
    )
    assert "Traceback" not in result.output and not (target / "report").exists()


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_report_of_a_short_real_run(ray_session, small_model_dir, tmp_path):
    from matplotlib.image import imread

    from grpodx.config import load_config
    from grpodx.orchestrator import Orchestrator

    settings = small_run_settings(
        small_model_dir,
        tmp_path,
        "report-test",
        *("train.max_steps=2", "train.save_steps=2", "train.batch_size=2", "train.eval_cases=4"),
        *("train.eval_temperature=0.7", "train.eval_greedy=true", "ray.num_rollout_workers=1"),
    )
    orchestrator = Orchestrator(load_config(None, settings), progress=False)
    try:
        run = orchestrator.train().run_dir
    finally:
        orchestrator.shutdown()
    page = write_report(run).read_text()
    for heading in SECTION_HEADINGS:
        assert f"<h2>{heading}</h2>" in page
    summary = json.loads((run / "summary.json").read_text())
    held_out = _section(page, "held-out")
    for key in ("eval_before", "eval_after", "eval_greedy_before", "eval_greedy_after"):
        assert f"{summary[key]['mean_reward']:.3f} ± {summary[key]['reward_stderr']:.3f}" in held_out, key
        assert f">{summary[key]['accuracy']:.3f}</td>" in held_out, key
    paired = summary["eval_paired"]
    assert f"{paired['reward_diff']:+.3f} ± {paired['reward_diff_stderr']:.3f}" in held_out
    # The evaluation episodes were read: the age bands share out the scored held-out cases.
    scored = summary["eval_before"]["episodes"] - summary["eval_before"]["failed"]
    bands = re.findall(r'<td>age [^<]+</td><td class="num">(\d+)</td>', _section(page, "slices"))
    assert len(bands) == 4 and sum(map(int, bands)) == scored > 0
    assert "offline patient and judge" in _section(page, "api")
    for png in _embedded_pngs(page):
        assert imread(io.BytesIO(png)).shape[0] > 200


def test_a_slice_of_a_handful_of_cases_is_never_flagged():
    """Four women all wrong against eight others half right: a zero standard error, not evidence."""
    from grpodx.report import MIN_AUDIT_CASES, audit_flags, slice_results

    def episode(sex: str, correct: bool) -> Episode:
        return Episode("c", "Influenza", None, correct, float(correct), 30, sex, "")

    few = [episode("female", False)] * 4 + [episode("male", i % 2 == 0) for i in range(8)]
    assert audit_flags(slice_results(few), "after training") == []
    # The same proportions with enough cases on both sides are flagged.
    scale = MIN_AUDIT_CASES
    many = [episode("female", False)] * (4 * scale) + [episode("male", i % 2 == 0) for i in range(8 * scale)]
    flags = audit_flags(slice_results(many), "after training")
    assert any(flag.startswith("⚑ female (after training)") for flag in flags)
