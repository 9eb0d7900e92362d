"""The medical knowledge base: conditions, the symptoms a doctor can ask about, and text matching.

The simulated patient, the reward and the data generator all read the same YAML file
(``knowledge_base.yaml``). The loader validates it strictly because a silent mistake there
(an unknown symptom id, a condition name hidden in a symptom phrase) would quietly corrupt
every episode. Keyword matching is precompiled once per knowledge base since it runs on
every doctor turn.
"""

from __future__ import annotations

import functools
import re
import string
from pathlib import Path
from typing import Annotated, Literal, NamedTuple, NoReturn

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, ValidationError

from grpodx.medical.icd import normalise_code

__all__ = [
    "DEFAULT_PATH",
    "Condition",
    "Demographics",
    "KeywordMatch",
    "KnowledgeBase",
    "KnowledgeBaseError",
    "NextStep",
    "Symptom",
    "load_knowledge_base",
    "normalise",
    "validate_knowledge_base",
]

DEFAULT_PATH = Path(__file__).parent / "knowledge_base.yaml"

_Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
_SYMPTOM_ID = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
_EDGE_CHARS = string.punctuation + string.whitespace + "\u2018\u2019\u201c\u201d\u00ab\u00bb\u2026"
_ARTICLES = ("a", "an", "the")
_SEPARATOR = re.compile(r"[\s\-]+")
_MIN_AGE, _MAX_AGE = 0, 110
# The C loader parses the packaged file about ten times faster; both are safe loaders.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class KnowledgeBaseError(ValueError):
    """The knowledge base file is malformed; the message names the culprit and the fix."""


def normalise(text: str) -> str:
    """Lower-case, collapse whitespace and strip punctuation at both ends."""
    return " ".join(text.lower().split()).strip(_EDGE_CHARS)


def _name_key(text: str) -> str:
    """Matching key for condition names: ``normalise`` plus punctuation and leading-article folding.

    "The flu." -> "flu", "COVID-19" -> "covid 19", "Bell's palsy" -> "bells palsy". Anything
    else (plurals, qualifiers such as "acute") must match exactly.
    """
    text = normalise(text).replace("'", "").replace("\u2019", "")
    words = re.sub(r"[^\w\s]", " ", text).split()
    if len(words) > 1 and words[0] in _ARTICLES:
        words = words[1:]
    return " ".join(words)


def _keyword_key(keyword: str) -> str:
    """Canonical form of a keyword: lower case, hyphens and whitespace runs become one space."""
    return " ".join(part for part in _SEPARATOR.split(keyword.lower()) if part)


def _keyword_pattern(keyword: str) -> str:
    """Regex for one keyword as whole words: "x-ray" also matches "x ray"; a plural "s"/"es" is allowed."""
    parts = [re.escape(part) for part in _SEPARATOR.split(keyword.lower()) if part]
    return r"[\s\-]+".join(parts) + r"(?:e?s)?(?!\w)"


def _clean_text(text: str) -> str:
    """Fold typographic (curly) apostrophes into ASCII ones so keywords like "can't" still match."""
    return text.replace("\u2019", "'").replace("\u2018", "'")


@functools.lru_cache(maxsize=4096)
def _any_keyword_regex(keywords: tuple[str, ...]) -> re.Pattern[str]:
    """One compiled regex matching any of ``keywords`` as whole words (cached per keyword set)."""
    ordered = sorted({_keyword_key(k) for k in keywords}, key=len, reverse=True)
    alternatives = "|".join(_keyword_pattern(k) for k in ordered)
    return re.compile(rf"(?<!\w)(?:{alternatives})", re.IGNORECASE)


class KeywordMatch(NamedTuple):
    """One symptom keyword found in a text: its character span and the symptom it names."""

    start: int
    end: int
    symptom_id: str


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Symptom(_Model):
    """Something a doctor can ask about; ``finding`` needs an examination or a test to know."""

    id: _Text
    phrase: _Text
    keywords: list[_Text] = Field(min_length=1)
    kind: Literal["symptom", "finding"]


class NextStep(_Model):
    """A test, treatment or referral a safe final answer must name."""

    name: _Text
    keywords: list[_Text] = Field(min_length=1)


class Demographics(_Model):
    """Who can plausibly have the condition; the patient generator samples within it."""

    min_age: int
    max_age: int
    sex: Literal["any", "female", "male"]


class Condition(_Model):
    """One diagnosis with its presentation and the steps a safe answer must include."""

    name: _Text
    synonyms: list[_Text] = Field(default_factory=list)
    icd10: _Text
    demographics: Demographics
    chief_complaints: list[_Text] = Field(min_length=1)
    symptoms: dict[str, float] = Field(min_length=1)
    against: list[_Text] = Field(default_factory=list)
    next_steps: list[NextStep] = Field(default_factory=list)

    def all_names(self) -> list[str]:
        """The canonical name followed by its synonyms."""
        return [self.name, *self.synonyms]


class KnowledgeBase(_Model):
    """The whole file, with lookup tables and a precompiled symptom-keyword matcher."""

    version: int
    symptoms: list[Symptom]
    conditions: list[Condition]

    _symptoms_by_id: dict[str, Symptom] = PrivateAttr(default_factory=dict)
    _conditions_by_name: dict[str, Condition] = PrivateAttr(default_factory=dict)
    _conditions_by_key: dict[str, Condition] = PrivateAttr(default_factory=dict)
    _keyword_owner: dict[str, str] = PrivateAttr(default_factory=dict)
    _keyword_regex: re.Pattern[str] | None = PrivateAttr(default=None)

    def model_post_init(self, context: object, /) -> None:
        self._symptoms_by_id = {s.id: s for s in self.symptoms}
        self._conditions_by_name = {c.name: c for c in self.conditions}
        self._conditions_by_key = {}
        for condition in self.conditions:
            for name in condition.all_names():
                self._conditions_by_key.setdefault(_name_key(name), condition)
        self._keyword_owner = {}
        for symptom in self.symptoms:
            for keyword in symptom.keywords:
                self._keyword_owner.setdefault(_keyword_key(keyword), symptom.id)
        # Longest keywords first so that, at one starting position, "chest pain" beats "chest".
        # The lookahead reports a match at every word start, overlapping ones included, so
        # overlaps that start at different positions can be resolved by length afterwards.
        ordered = sorted(self._keyword_owner, key=len, reverse=True)
        alternatives = "|".join(_keyword_pattern(k) for k in ordered)
        self._keyword_regex = re.compile(rf"(?<!\w)(?=({alternatives}))", re.IGNORECASE) if ordered else None

    def symptom(self, symptom_id: str) -> Symptom:
        """The symptom with this id; KeyError if there is none."""
        try:
            return self._symptoms_by_id[symptom_id]
        except KeyError:
            raise KeyError(f"no symptom with id {symptom_id!r} in the knowledge base") from None

    def condition(self, name: str) -> Condition:
        """The condition with this exact canonical name; KeyError (with a hint) if there is none."""
        try:
            return self._conditions_by_name[name]
        except KeyError:
            hint = self.find_condition(name)
            extra = f"; did you mean {hint.name!r}?" if hint is not None else ""
            raise KeyError(f"no condition named {name!r} in the knowledge base{extra}") from None

    def find_condition(self, text: str) -> Condition | None:
        """The condition whose name or synonym equals ``text`` up to case, punctuation,
        whitespace and a leading "a"/"an"/"the"; None otherwise."""
        return self._conditions_by_key.get(_name_key(text))

    def symptoms_mentioned(self, text: str) -> list[str]:
        """Ids of the symptoms whose keywords occur in ``text``, in order of first occurrence.

        Matches are whole words, case-insensitive. When two matches overlap the longer one
        wins ("chest pain" rather than a generic "pain"), so a question is attributed to the
        most specific symptom it names.
        """
        ids: list[str] = []
        for match in self.keyword_matches(text):
            if match.symptom_id not in ids:
                ids.append(match.symptom_id)
        return ids

    def keyword_matches(self, text: str) -> list[KeywordMatch]:
        """The symptom keywords in ``text`` with their spans, in text order, overlaps resolved as above."""
        if self._keyword_regex is None:
            return []
        candidates = [
            (match.start(), match.start() + len(match.group(1)), match.group(1))
            for match in self._keyword_regex.finditer(_clean_text(text))
        ]
        chosen: list[tuple[int, int, str]] = []
        taken: list[tuple[int, int]] = []
        for start, end, matched in sorted(candidates, key=lambda c: (c[0] - c[1], c[0])):
            if all(end <= s or start >= e for s, e in taken):
                taken.append((start, end))
                chosen.append((start, end, matched))
        matches: list[KeywordMatch] = []
        for start, end, matched in sorted(chosen):
            symptom_id = self._owner_of(matched)
            if symptom_id is not None:
                matches.append(KeywordMatch(start, end, symptom_id))
        return matches

    def _owner_of(self, matched: str) -> str | None:
        """Symptom id for matched text, undoing the optional plural suffix the regex allows."""
        key = _keyword_key(matched)
        for candidate in (key, key[:-1], key[:-2]):
            if candidate in self._keyword_owner:
                return self._keyword_owner[candidate]
        return None

    def steps_named(self, steps: list[NextStep], text: str) -> list[str]:
        """Names of the ``steps`` that ``text`` mentions through any of their keywords."""
        text = _clean_text(text)
        return [step.name for step in steps if _any_keyword_regex(tuple(step.keywords)).search(text)]


def _fail(message: str) -> NoReturn:
    raise KnowledgeBaseError(message)


def _check_symptoms(kb: KnowledgeBase) -> None:
    seen_ids: set[str] = set()
    keyword_owner: dict[str, str] = {}
    for symptom in kb.symptoms:
        if not _SYMPTOM_ID.match(symptom.id):
            _fail(
                f"Symptom id {symptom.id!r} is not snake_case; rename it to lower-case words joined by '_'."
            )
        if symptom.id in seen_ids:
            _fail(f"Symptom id {symptom.id!r} is defined twice; merge the two entries or rename one.")
        seen_ids.add(symptom.id)
        for keyword in symptom.keywords:
            key = _keyword_key(keyword)
            owner = keyword_owner.setdefault(key, symptom.id)
            if owner != symptom.id:
                _fail(
                    f"Keyword {keyword!r} is claimed by both symptom {owner!r} and symptom {symptom.id!r}; "
                    "keep it in only one of them."
                )


def _check_condition(condition: Condition, known: set[str]) -> None:
    label = f"Condition {condition.name!r}"
    try:
        canonical = normalise_code(condition.icd10)
    except ValueError:
        _fail(f"{label} has icd10 {condition.icd10!r}, which is not a valid ICD-10-CM code; use a valid one.")
    if canonical != condition.icd10:
        _fail(f"{label} has icd10 {condition.icd10!r}; write it in the canonical form {canonical!r}.")
    demo = condition.demographics
    if not (_MIN_AGE <= demo.min_age <= demo.max_age <= _MAX_AGE):
        _fail(
            f"{label} has ages {demo.min_age}-{demo.max_age}; "
            f"they must satisfy {_MIN_AGE} <= min_age <= max_age <= {_MAX_AGE}."
        )
    for field, ids in (
        ("symptoms", list(condition.symptoms)),
        ("against", condition.against),
        ("chief_complaints", condition.chief_complaints),
    ):
        for symptom_id in ids:
            if symptom_id not in known:
                _fail(f"{label} lists unknown symptom {symptom_id!r} in {field}; define it or fix the id.")
    for symptom_id, frequency in condition.symptoms.items():
        if not 0.0 < frequency <= 1.0:
            _fail(f"{label} gives {symptom_id!r} frequency {frequency}; frequencies must be in (0, 1].")
    for symptom_id in condition.against:
        if symptom_id in condition.symptoms:
            _fail(f"{label} lists {symptom_id!r} in both symptoms and against; keep it in only one.")
    for symptom_id in condition.chief_complaints:
        frequency = condition.symptoms.get(symptom_id, 0.0)
        if frequency < 0.5:
            _fail(
                f"{label} has chief complaint {symptom_id!r} with symptom frequency {frequency}; "
                "chief complaints need a frequency of at least 0.5 in symptoms."
            )


def _check_names(kb: KnowledgeBase) -> None:
    owners: dict[str, str] = {}
    for condition in kb.conditions:
        for name in condition.all_names():
            key = _name_key(name)
            if not key:
                _fail(
                    f"Condition {condition.name!r} has a name or synonym {name!r} with no letters; remove it."
                )
            if key in owners:
                _fail(
                    f"Name {name!r} of condition {condition.name!r} duplicates a name of condition "
                    f"{owners[key]!r}; keep it in only one place."
                )
            owners[key] = condition.name
    # A patient who only ever speaks symptom phrases must never utter a diagnosis. Keys are
    # space-separated words, so a space-bounded search is a whole-word search.
    if not owners:
        return
    alternatives = "|".join(re.escape(key) for key in sorted(owners, key=len, reverse=True))
    name_regex = re.compile(rf"(?<!\S)(?:{alternatives})(?!\S)")
    for symptom in kb.symptoms:
        for text in (symptom.phrase, *symptom.keywords):
            found = name_regex.search(_name_key(text))
            if found:
                _fail(
                    f"Symptom {symptom.id!r} text {text!r} contains {found.group()!r}, a name of condition "
                    f"{owners[found.group()]!r}; reword the symptom or drop that name."
                )


def validate_knowledge_base(kb: KnowledgeBase) -> None:
    """Check the cross-references and content rules that the schema alone cannot express.

    Raises KnowledgeBaseError with one sentence naming the culprit and what to change.
    """
    _check_symptoms(kb)
    known = {s.id for s in kb.symptoms}
    for condition in kb.conditions:
        _check_condition(condition, known)
    _check_names(kb)
    # The patient simulator answers "Do you have <phrase>?" by matching keywords, so every
    # phrase must be heard as exactly its own symptom.
    for symptom in kb.symptoms:
        heard = kb.symptoms_mentioned(symptom.phrase)
        if heard != [symptom.id]:
            _fail(
                f"Symptom {symptom.id!r} phrase {symptom.phrase!r} is matched as {heard}; "
                "add a keyword so that the phrase matches only its own symptom."
            )
    used = {sid for c in kb.conditions for sid in (*c.symptoms, *c.against)}
    for symptom in kb.symptoms:
        if symptom.id not in used:
            _fail(f"Symptom {symptom.id!r} is not used by any condition; use it or remove it.")


def _schema_error_message(path: Path, data: object, error: ValidationError) -> str:
    """Turn the first pydantic error into one sentence that names the condition or symptom."""
    first = error.errors()[0]
    loc = list(first["loc"])
    culprit = f"Knowledge base {path.name}"
    if (
        len(loc) >= 2
        and loc[0] in ("conditions", "symptoms")
        and isinstance(loc[1], int)
        and isinstance(data, dict)
    ):
        entries = data.get(loc[0]) or []
        entry = entries[loc[1]] if loc[1] < len(entries) else None
        label = "name" if loc[0] == "conditions" else "id"
        ident = entry.get(label) if isinstance(entry, dict) else None
        kind = "Condition" if loc[0] == "conditions" else "Symptom"
        culprit = f"{kind} {ident!r}" if ident is not None else f"{kind} #{loc[1] + 1}"
        loc = loc[2:]
    where = ".".join(str(part) for part in loc)
    if first["type"] == "extra_forbidden":
        problem = f"has unknown key {where!r}; remove or rename it"
    elif first["type"] == "missing":
        problem = f"is missing required key {where!r}; add it"
    else:
        problem = f"has an invalid value at {where or 'the top level'!r} ({first['msg']}); fix it"
    more = len(error.errors()) - 1
    suffix = f" ({more} more schema error{'s' if more > 1 else ''} follow)" if more else ""
    return f"{culprit} {problem}{suffix}."


def _load(path: Path) -> KnowledgeBase:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
    except FileNotFoundError:
        raise KnowledgeBaseError(f"Knowledge base file {path} does not exist; check the path.") from None
    except yaml.YAMLError as exc:
        raise KnowledgeBaseError(
            f"Knowledge base file {path} is not valid YAML ({exc}); fix the syntax."
        ) from None
    if not isinstance(data, dict):
        raise KnowledgeBaseError(
            f"Knowledge base file {path} must be a mapping with version, symptoms, conditions."
        )
    try:
        kb = KnowledgeBase.model_validate(data)
    except ValidationError as exc:
        raise KnowledgeBaseError(_schema_error_message(path, data, exc)) from None
    validate_knowledge_base(kb)
    return kb


@functools.lru_cache(maxsize=1)
def _load_default() -> KnowledgeBase:
    return _load(DEFAULT_PATH)


def load_knowledge_base(path: str | Path | None = None) -> KnowledgeBase:
    """Load and validate a knowledge base; ``None`` gives the packaged one, loaded once and cached.

    Raises KnowledgeBaseError when the file is missing, malformed or inconsistent.
    """
    if path is None:
        return _load_default()
    return _load(Path(path))
