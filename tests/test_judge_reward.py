"""The offline judge's ICD-10-CM partial credit, and the reward built from recorded parts."""

import itertools

import pytest

from grpodx.config import RewardConfig
from grpodx.env.judge import PARTIAL_CREDIT, IcdJudge
from grpodx.env.reward import compute_reward, guideline_adherence, is_hedged
from grpodx.medical import icd
from grpodx.medical.cases import CaseSampler
from grpodx.medical.knowledge import load_knowledge_base

KB = load_knowledge_base()
JUDGE = IcdJudge(KB)


def _case_of(condition_name):
    sampler = CaseSampler(KB, "train", 0)
    for i in range(5000):
        card = sampler.case_at(i)
        if card.condition == condition_name:
            return card
    raise AssertionError(f"no case of {condition_name}")


def _pairs_by_level():
    """Pairs of knowledge-base conditions at each level of ICD closeness."""
    found = {}
    for a, b in itertools.permutations(KB.conditions, 2):
        level = icd.closeness(a.icd10, b.icd10)
        found.setdefault(level, (a, b))
    return found


def test_partial_credit_scale_is_strictly_ordered():
    values = [PARTIAL_CREDIT[level] for level in ("exact", "category", "block", "chapter", "none")]
    assert values == sorted(values, reverse=True) and len(set(values)) == 5
    assert values[0] == 1.0 and values[-1] == 0.0


def test_judge_scores_by_hierarchy_level():
    pairs = _pairs_by_level()
    assert {"block", "chapter", "none"} <= set(pairs)
    scores = {}
    for level, (truth, guess) in pairs.items():
        verdict = JUDGE.verdict(_case_of(truth.name), guess.name)
        assert verdict.category == level
        scores[level] = verdict.score
    ordered = [scores[level] for level in ("category", "block", "chapter", "none") if level in scores]
    assert ordered == sorted(ordered, reverse=True)
    assert scores["none"] == 0.0


def test_exact_name_and_synonyms_score_one():
    for condition in KB.conditions[:20]:
        case = _case_of(condition.name)
        for name in condition.all_names():
            assert JUDGE.verdict(case, name.upper()).score == 1.0, name


def test_missing_and_unknown_diagnoses_score_zero():
    case = _case_of(KB.conditions[0].name)
    assert JUDGE.verdict(case, None).score == 0.0
    assert JUDGE.verdict(case, "").category == "none"
    assert JUDGE.verdict(case, "a made-up syndrome of the elbow").score == 0.0


def test_hedge_is_scored_on_the_first_named_condition():
    truth, other = KB.conditions[0], KB.conditions[1]
    case = _case_of(truth.name)
    assert JUDGE.verdict(case, f"{other.name} or {truth.name}").score < 1.0
    assert JUDGE.verdict(case, f"{truth.name} or {other.name}").score == 1.0
    assert is_hedged(f"{truth.name} or {other.name}")
    assert not is_hedged(truth.name)


def test_reward_parts_and_weights():
    config = RewardConfig(judge_weight=1.0, hedge_penalty=0.3, guideline_weight=0.2, format_penalty=0.2)
    with_steps = next(c for c in KB.conditions if len(c.next_steps) >= 2)
    case = _case_of(with_steps.name)
    all_steps = ", ".join(step.keywords[0] for step in with_steps.next_steps)
    good = f"Final diagnosis: {with_steps.name}. Next steps: {all_steps}."
    reward = compute_reward(
        config, KB, case, judge_score=1.0, diagnosis=with_steps.name, final_text=good, malformed_turns=0
    )
    assert reward.total == 1.0 and reward.guideline == 1.0 and reward.format_errors == 0

    one_step = with_steps.next_steps[0].keywords[0]
    partial = f"Final diagnosis: {with_steps.name}. Next steps: {one_step}."
    reward = compute_reward(
        config, KB, case, judge_score=1.0, diagnosis=with_steps.name, final_text=partial, malformed_turns=0
    )
    missing = 1 - 1 / len(with_steps.next_steps)
    assert reward.guideline == pytest.approx(1 - missing)
    assert reward.total == pytest.approx(1.0 - 0.2 * missing)

    hedged = compute_reward(
        config,
        KB,
        case,
        judge_score=1.0,
        diagnosis=f"{with_steps.name} or flu",
        final_text=good,
        malformed_turns=1,
    )
    assert hedged.hedged and hedged.format_errors == 1
    assert hedged.total == pytest.approx(1.0 - 0.3 - 0.2)

    nothing = compute_reward(
        config, KB, case, judge_score=0.0, diagnosis=None, final_text=None, malformed_turns=2
    )
    assert nothing.total == 0.0 and nothing.format_errors == 3  # clipped at 0


def test_conditions_without_steps_have_full_guideline_credit():
    benign = next(c for c in KB.conditions if not c.next_steps)
    assert guideline_adherence(KB, _case_of(benign.name), "Final diagnosis: something") == 1.0
