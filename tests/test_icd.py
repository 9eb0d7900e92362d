"""ICD-10-CM helpers: validity, hierarchy closeness and description lookup."""

from __future__ import annotations

import warnings

import pytest

from grpodx.medical.icd import closeness, code_for_description, is_valid_code, normalise_code

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import simple_icd_10_cm as cm


@pytest.mark.parametrize("code", ["I21.4", "I214", " i21.4 ", "I10", "J18.9", "S06.0X0A", "I21.A1"])
def test_valid_codes(code: str) -> None:
    assert is_valid_code(code)


@pytest.mark.parametrize("code", ["I20-I25", "9", "XYZ", "", "I21.99999", "I21."])
def test_invalid_codes(code: str) -> None:
    assert not is_valid_code(code)


def test_normalise_code_adds_dot_and_upper_cases() -> None:
    assert normalise_code("i214") == "I21.4"
    assert normalise_code("J00") == "J00"


def test_closeness_ladder_on_real_codes() -> None:
    truth = "I21.4"  # NSTEMI: category I21, block I20-I25, chapter 9
    same_category = "I21.09"
    same_block = "I25.10"
    same_chapter = "I26.99"
    other_chapter = "J18.9"
    # The test codes really sit where their names claim.
    category, block, chapter = "I21", *cm.get_ancestors(truth)[-2:]
    assert category in cm.get_ancestors(same_category)
    assert same_block[:3] != category and cm.get_ancestors(same_block)[-2] == block
    assert cm.get_ancestors(same_chapter)[-2] != block and cm.get_ancestors(same_chapter)[-1] == chapter
    assert cm.get_ancestors(other_chapter)[-1] != chapter

    ladder = [truth, same_category, same_block, same_chapter, other_chapter]
    assert [closeness(code, truth) for code in ladder] == ["exact", "category", "block", "chapter", "none"]


def test_closeness_ignores_dot_and_case() -> None:
    assert closeness("i214", "I21.4") == "exact"
    assert closeness("I21A1", "I21.4") == "category"


def test_closeness_is_symmetric() -> None:
    pairs = [("I21.4", "I21.09"), ("I21.4", "I25.10"), ("I21.4", "I26.99"), ("I21.4", "J18.9")]
    for a, b in pairs:
        assert closeness(a, b) == closeness(b, a)


@pytest.mark.parametrize("pair", [("XYZ", "I21.4"), ("I21.4", "I20-I25"), ("I21.4", "")])
def test_closeness_rejects_invalid_codes(pair: tuple[str, str]) -> None:
    with pytest.raises(ValueError):
        closeness(*pair)


@pytest.mark.parametrize("code", ["N10", "J18.9", "I21.4", "K35.80", "S06.0X0A"])
def test_code_for_description_round_trips(code: str) -> None:
    assert code_for_description(cm.get_description(code)) == code


def test_code_for_description_normalises_case_and_punctuation() -> None:
    assert code_for_description("  ACUTE PYELONEPHRITIS. ") == "N10"
    assert code_for_description("pneumonia unspecified organism") == "J18.9"


@pytest.mark.parametrize("text", ["", "   ", "definitely not a diagnosis", "pyelonephritis"])
def test_code_for_description_misses(text: str) -> None:
    assert code_for_description(text) is None
