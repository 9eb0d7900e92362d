"""ICD-10-CM helpers on top of the ``simple_icd_10_cm`` package.

The reward compares the doctor's diagnosis with the true one by position in the
ICD-10-CM tree, so partial credit is possible (an NSTEMI named for an STEMI is
closer than a pulmonary embolism). Only diagnosis codes count here: categories
(``I21``) and subcategories (``I21.4``, ``S06.0X0A``); chapters ("9") and blocks
("I20-I25") are structure, not diagnoses, and are rejected.
"""

from __future__ import annotations

import functools
import re
import warnings
from typing import Literal


@functools.cache
def _tables():
    """The ``simple_icd_10_cm`` package, imported on first use: its tables take about 170 MB, which a
    process that only holds an already validated knowledge base (a simulated rollout worker) never needs."""
    with warnings.catch_warnings():
        # The package (or its resource loading) may emit deprecation warnings on import; they
        # are noise for our users and not actionable here.
        warnings.simplefilter("ignore")
        import simple_icd_10_cm

    return simple_icd_10_cm


Closeness = Literal["exact", "category", "block", "chapter", "none"]

_LEVEL_NAMES: tuple[Closeness, ...] = ("category", "block", "chapter")

__all__ = ["Closeness", "closeness", "code_for_description", "is_valid_code", "normalise_code"]


def normalise_code(code: str) -> str:
    """Return the canonical dotted, upper-case form of a diagnosis code (``"i214"`` -> ``"I21.4"``).

    Raises ValueError when ``code`` is not a category or subcategory of ICD-10-CM, so callers
    never compare a typo or a chapter number by accident.
    """
    cleaned = code.strip().upper()
    if len(cleaned) > 3 and "." not in cleaned:
        cleaned = f"{cleaned[:3]}.{cleaned[3:]}"
    cm = _tables()
    if not cm.is_valid_item(cleaned) or not (cm.is_category(cleaned) or cm.is_subcategory(cleaned)):
        raise ValueError(f"{code!r} is not a valid ICD-10-CM diagnosis code")
    return cleaned


def is_valid_code(code: str) -> bool:
    """True for an ICD-10-CM category or subcategory code, written with or without the dot."""
    try:
        normalise_code(code)
    except ValueError:
        return False
    return True


def _levels(code: str) -> tuple[str, str, str]:
    """(category, block, chapter) of a canonical code.

    ``get_ancestors`` lists parents from nearest to farthest and always ends with the block
    and the chapter; the category is the first three characters of any diagnosis code.
    """
    ancestors = _tables().get_ancestors(code)
    return code[:3], ancestors[-2], ancestors[-1]


def closeness(predicted: str, truth: str) -> Closeness:
    """How near ``predicted`` is to ``truth`` in the ICD-10-CM hierarchy.

    ``exact`` (same code), ``category`` (same three-character category), ``block`` (same
    block such as I20-I25), ``chapter`` (same chapter) or ``none``. Raises ValueError for an
    invalid code on either side.
    """
    pred, true = normalise_code(predicted), normalise_code(truth)
    if pred == true:
        return "exact"
    pred_levels, true_levels = _levels(pred), _levels(true)
    for level, name in enumerate(_LEVEL_NAMES):
        if pred_levels[level] == true_levels[level]:
            return name
    return "none"


def _description_key(text: str) -> str:
    """Case, whitespace and punctuation-insensitive key for a description."""
    text = text.lower().replace("'", "").replace("\u2019", "")
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


@functools.lru_cache(maxsize=1)
def _description_index() -> dict[str, str]:
    """Map every diagnosis description to its code; built once, on first use (~0.2 s).

    A category and its only billable child often share a description ("Pneumonia,
    unspecified organism" is both J18 and J18.9); the longer, more specific code wins so a
    diagnosis written as the billable description scores as exact.
    """
    index: dict[str, str] = {}
    cm = _tables()
    for code in cm.get_all_codes(True):
        if code.isdigit() or "-" in code:  # chapters and blocks are not diagnoses
            continue
        key = _description_key(cm.get_description(code))
        if len(code) > len(index.get(key, "")):
            index[key] = code
    return index


def code_for_description(text: str) -> str | None:
    """The code whose official description matches ``text`` after normalisation, or None.

    Used to score diagnoses outside the knowledge base: "Acute pyelonephritis" -> ``N10``.
    Matching ignores case, punctuation and extra whitespace but is otherwise exact.
    """
    key = _description_key(text)
    return _description_index().get(key) if key else None
