"""Case cards: deterministic for a seed, train and eval never overlap, demographics respected."""

from grpodx.medical.cases import CaseSampler, eval_cases, split_of
from grpodx.medical.knowledge import load_knowledge_base

KB = load_knowledge_base()


def test_same_seed_same_cases_different_seed_different():
    first = [CaseSampler(KB, "train", seed=3).case_at(i) for i in range(50)]
    again = [CaseSampler(KB, "train", seed=3).case_at(i) for i in range(50)]
    other = [CaseSampler(KB, "train", seed=4).case_at(i) for i in range(50)]
    assert first == again
    assert first != other


def test_sampler_position_is_resumable():
    sampler = CaseSampler(KB, "train", seed=1)
    drawn = [sampler.sample() for _ in range(5)]
    resumed = CaseSampler(KB, "train", seed=1)
    resumed.load_state_dict(sampler.state_dict())
    assert resumed.sample() == sampler.case_at(5)
    assert drawn[0] == CaseSampler(KB, "train", seed=1).sample()


def test_eval_cases_are_never_train_cases():
    train = {CaseSampler(KB, "train", seed=s).case_at(i).fingerprint() for s in range(3) for i in range(1500)}
    evaluation = {card.fingerprint() for card in eval_cases(KB, 300)}
    assert not train & evaluation
    assert all(split_of(f) == "eval" for f in evaluation)
    assert all(split_of(f) == "train" for f in train)


def test_cards_respect_the_knowledge_base():
    sampler = CaseSampler(KB, "train", seed=0)
    seen_conditions = set()
    for i in range(600):
        card = sampler.case_at(i)
        condition = KB.condition(card.condition)
        seen_conditions.add(card.condition)
        assert card.icd10 == condition.icd10
        assert condition.demographics.min_age <= card.age <= condition.demographics.max_age
        assert condition.demographics.sex in ("any", card.sex)
        assert card.chief_complaint in condition.chief_complaints
        assert card.chief_complaint in card.present
        assert set(card.present).isdisjoint(card.absent)
        assert set(card.present) | set(card.absent) == {s.id for s in KB.symptoms}
    assert len(seen_conditions) > 0.8 * len(KB.conditions)
