"""Cases brought by the user: a JSONL file of case cards, or of AgentClinic OSCE vignettes.

Two formats, one per file, told apart by each line's shape:

- **Case cards** in the project's own schema, one JSON object per line::

      {"condition": "Influenza", "age": 34, "sex": "female", "chief_complaint": "fever",
       "present": ["cough", "muscle aches"], "absent": ["rash"], "id": "my-case-1"}

  ``condition`` by name, synonym or ICD-10-CM code of the knowledge base; ``chief_complaint``,
  ``present`` and ``absent`` by symptom id, phrase or keyword of the knowledge base. ``absent`` is
  optional (default: every other symptom), ``id`` too (default: the file's stem and line number).
  Such cards are played by either patient, exactly like generated ones.
- **AgentClinic OSCE vignettes** (``{"OSCE_Examination": {"Patient_Actor": ..., "Physical_Examination_
  Findings": ..., "Test_Results": ..., "Correct_Diagnosis": ...}}``): free text only a language model
  can play. The patient actor's part becomes the API patient's system prompt (``CaseCard.vignette``);
  the examination and the tests are listed by name only, as things the patient cannot know; the
  ``Correct_Diagnosis`` is the hidden condition the judge scores against, and is never in the prompt.

Every problem is a :class:`~grpodx.config.ConfigError` of one sentence naming the file, the line and
the field. A card's train/eval split is the hash of its content, as for generated cards: training on
a file uses its train share, the held-out evaluation its eval share.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from grpodx.config import Config, ConfigError
from grpodx.medical import icd
from grpodx.medical.cases import EVAL_SHARE, CaseCard, split_of
from grpodx.medical.knowledge import Condition, KnowledgeBase, Symptom, _keyword_key, _name_key, normalise

Format = Literal["cards", "osce"]

CARD_FIELDS = ("id", "condition", "age", "sex", "chief_complaint", "present", "absent")
REQUIRED_CARD_FIELDS = ("condition", "age", "sex", "chief_complaint", "present")
OSCE_KEY = "OSCE_Examination"
_MAX_AGE = 120

# Patient-actor sections in the order the prompt gives them (others follow in the file's order).
_ACTOR_ORDER = (
    "Demographics",
    "History",
    "Past_Medical_History",
    "Medications",
    "Current_Medications",
    "Drug_History",
    "Social_History",
    "Review_of_Systems",
)
_FEMALE = re.compile(r"\b(?:female|woman|girl|gravida|nulliparous|primigravida|pregnant|mother)\b", re.I)
_MALE = re.compile(r"\b(?:male|man|boy)\b", re.I)
_SHE = re.compile(r"\b(?:she|her|hers|herself|daughter)\b", re.I)
_HE = re.compile(r"\b(?:he|him|his|himself|son)\b", re.I)
_YEARS = re.compile(r"(\d+)[\s-]*(?:years?|yrs?)[\s-]*old|(\d+)[\s-]*(?:y/o|yo)\b", re.I)
_UNDER_ONE = re.compile(r"\d+[\s-]*(?:months?|weeks?|days?|hours?)[\s-]*old|newborn|neonate|infant", re.I)


@dataclass(frozen=True)
class CaseFile:
    """The validated cases of one file, in file order, with the line each came from."""

    path: str
    label: str  # how errors name the file: the flag or setting that gave it
    format: Format
    cards: tuple[CaseCard, ...]
    lines: tuple[int, ...]
    sha256: str

    def split(self, split: str) -> list[CaseCard]:
        """The cards of one split (train or eval), in file order."""
        return [card for card in self.cards if card.split == split]

    def empty_share(self, split: str) -> ConfigError:
        share = "training" if split == "train" else "held-out"
        return ConfigError(
            f"{self.label}: none of its {len(self.cards)} cases falls in the {share} share (cases are split "
            f"{1 - EVAL_SHARE:.0%}/{EVAL_SHARE:.0%} by a hash of their content, so that no held-out case is "
            "trained on); add cases" + (" or set train.eval_cases=0" if split == "eval" else "")
        )

    def check_playable(self, config: Config, label: str) -> None:
        """Refuse, in one sentence, cases the configured patient or judge cannot play or score."""
        if self.format != "osce":
            return
        if config.patient.kind != "openai":
            raise ConfigError(
                f"{label} holds AgentClinic OSCE vignettes, which only a language-model patient can play: "
                f"set patient.kind=openai (the scripted patient answers only from case cards of the "
                f"knowledge base)"
            )
        if config.judge.kind != "openai":
            unmapped = [(line, c) for line, c in zip(self.lines, self.cards, strict=True) if not c.icd10]
            if unmapped:
                line, card = unmapped[0]
                raise ConfigError(
                    f"{label}: the offline judge (judge.kind={config.judge.kind}) cannot score "
                    f"{len(unmapped)} of its {len(self.cards)} cases, whose Correct_Diagnosis maps to no "
                    f"ICD-10-CM code (the first: line {line}, {card.condition!r}); set judge.kind=openai"
                )


def load_case_file(path: str | Path, kb: KnowledgeBase, label: str | None = None) -> CaseFile:
    """Read and validate ``path``; ``label`` names it in errors (the flag or setting that gave it)."""
    path = Path(path)
    label = label or str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read the file ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{label}: the file is not UTF-8 text; save it as UTF-8 JSONL") from None
    stem = re.sub(r"[^\w.-]+", "_", path.stem) or "case"
    file_format: Format | None = None
    first_line = 0
    cards: list[CaseCard] = []
    lines: list[int] = []
    seen_ids: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{label} line {number}"
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: expected a JSON object, not {_type_name(record)}")
        line_format: Format = "osce" if OSCE_KEY in record else "cards"
        if file_format is None:
            file_format, first_line = line_format, number
        elif line_format != file_format:
            kinds = {"osce": "an AgentClinic OSCE case", "cards": "a case card"}
            raise ConfigError(
                f"{where}: {kinds[line_format]} in a file whose line {first_line} is "
                f"{kinds[file_format]}; put each format in its own file"
            )
        default_id = f"{stem}-{number:04d}"
        if line_format == "osce":
            card = _osce_card(record, kb, where, default_id)
        else:
            card = _own_card(record, kb, where, default_id)
        if card.case_id in seen_ids:
            raise ConfigError(
                f"{where}, field 'id': {card.case_id!r} is already the id of line {seen_ids[card.case_id]}; "
                "give each case its own id"
            )
        seen_ids[card.case_id] = number
        cards.append(card)
        lines.append(number)
    if not cards:
        raise ConfigError(f"{label}: the file holds no cases; write one JSON object per line")
    assert file_format is not None
    digest = hashlib.sha256(data).hexdigest()
    return CaseFile(str(path), label, file_format, tuple(cards), tuple(lines), digest)


def load_cases_for(config: Config, kb: KnowledgeBase) -> CaseFile | None:
    """The cases of ``train.cases_file`` (checked against the patient and judge), or None when unset."""
    if not config.train.cases_file:
        return None
    label = f"train.cases_file={config.train.cases_file}"
    cases = load_case_file(config.train.cases_file, kb, label)
    cases.check_playable(config, label)
    for split, needed in (("train", True), ("eval", config.train.eval_cases > 0)):
        if needed and not cases.split(split):
            raise cases.empty_share(split)
    return cases


# -- case cards in the project's own schema -------------------------------------------------------


def _own_card(record: dict[str, Any], kb: KnowledgeBase, where: str, default_id: str) -> CaseCard:
    unknown = [key for key in record if key not in CARD_FIELDS]
    if unknown:
        hint = _did_you_mean(unknown[0], CARD_FIELDS)
        raise ConfigError(
            f"{where}, field {unknown[0]!r}: not a field of a case card{hint} (the fields are "
            f"{', '.join(CARD_FIELDS)}; an AgentClinic case has an {OSCE_KEY} object)"
        )
    for name in REQUIRED_CARD_FIELDS:
        if name not in record:
            raise ConfigError(f"{where}, field {name!r}: missing; every case card needs {name}")

    def field_error(name: str, problem: str) -> ConfigError:
        return ConfigError(f"{where}, field {name!r}: {problem}")

    case_id = record.get("id", default_id)
    if not isinstance(case_id, str) or not case_id.strip():
        raise field_error("id", f"expected a non-empty string, not {_type_name(case_id)}")
    condition = _condition(kb, record["condition"], field_error)
    age = record["age"]
    if isinstance(age, bool) or not isinstance(age, int) or not 0 <= age <= _MAX_AGE:
        raise field_error("age", f"expected a whole number of years from 0 to {_MAX_AGE}, not {age!r}")
    sex = record["sex"]
    if sex not in ("female", "male"):
        raise field_error("sex", f'expected "female" or "male", not {sex!r}')
    chief = _symptom(kb, record["chief_complaint"], "chief_complaint", field_error)
    if chief.kind != "symptom":
        raise field_error(
            "chief_complaint",
            f"{record['chief_complaint']!r} is an examination finding ({chief.id}), which a patient cannot "
            "come in with; name a symptom",
        )
    present = _symptom_list(kb, record["present"], "present", field_error)
    if chief.id not in present:
        present.insert(0, chief.id)
    if "absent" in record:
        absent = _symptom_list(kb, record["absent"], "absent", field_error)
        both = [sid for sid in absent if sid in present]
        if both:
            raise field_error("absent", f"{both[0]!r} is also present (or the chief complaint); name it once")
    else:
        absent = [s.id for s in kb.symptoms if s.id not in present]
    # Knowledge-base order, as in a generated card, so equal content gives an equal card.
    order = {s.id: i for i, s in enumerate(kb.symptoms)}
    present_ids = tuple(sorted(present, key=order.__getitem__))
    absent_ids = tuple(sorted(absent, key=order.__getitem__))
    fingerprint = CaseCard(
        "", "train", 0, condition.name, "", age, sex, chief.id, present_ids, ()
    ).fingerprint()
    return CaseCard(
        case_id=case_id.strip(),
        split=split_of(fingerprint),
        seed=_seed(fingerprint),
        condition=condition.name,
        icd10=condition.icd10,
        age=age,
        sex=sex,
        chief_complaint=chief.id,
        present=present_ids,
        absent=absent_ids,
    )


def _condition(kb: KnowledgeBase, value: object, field_error) -> Condition:
    if not isinstance(value, str) or not value.strip():
        raise field_error(
            "condition", f"expected a condition name or ICD-10-CM code, not {_type_name(value)}"
        )
    found = kb.find_condition(value)
    if found is not None:
        return found
    if icd.is_valid_code(value):
        code = icd.normalise_code(value)
        owners = [c for c in kb.conditions if c.icd10 == code]
        if len(owners) == 1:
            return owners[0]
        if len(owners) > 1:
            names = ", ".join(repr(c.name) for c in owners)
            raise field_error("condition", f"ICD-10-CM code {code} is shared by {names}; name the condition")
        raise field_error(
            "condition",
            f"no condition of the knowledge base has ICD-10-CM code {code}; the scripted patient plays only "
            "those (grpodx/medical/knowledge_base.yaml)",
        )
    names = [name for c in kb.conditions for name in c.all_names()]
    raise field_error(
        "condition",
        f"{value!r} is not a condition of the knowledge base (a name, synonym or ICD-10-CM code in "
        f"grpodx/medical/knowledge_base.yaml){_did_you_mean(value, names)}",
    )


def _symptom_index(kb: KnowledgeBase) -> dict[str, str]:
    """Symptom id by every way a card may name it: id, phrase (with or without its article), keyword."""
    index: dict[str, str] = {}
    for symptom in kb.symptoms:
        index.setdefault(symptom.id.lower(), symptom.id)
        index.setdefault(_name_key(symptom.phrase), symptom.id)
    for symptom in kb.symptoms:
        for keyword in symptom.keywords:
            index.setdefault(_keyword_key(keyword), symptom.id)
    return index


def _symptom(kb: KnowledgeBase, value: object, name: str, field_error) -> Symptom:
    if not isinstance(value, str) or not value.strip():
        raise field_error(name, f"expected a symptom id or phrase, not {_type_name(value)}")
    index = _symptom_index(kb)
    for key in (value.strip().lower(), _name_key(value), _keyword_key(normalise(value))):
        if key in index:
            return kb.symptom(index[key])
    hint = _did_you_mean(value, [s.id for s in kb.symptoms] + [s.phrase for s in kb.symptoms])
    raise field_error(
        name,
        f"{value!r} is not a symptom of the knowledge base (an id, phrase or keyword in "
        f"grpodx/medical/knowledge_base.yaml){hint}",
    )


def _symptom_list(kb: KnowledgeBase, value: object, name: str, field_error) -> list[str]:
    if not isinstance(value, list):
        raise field_error(name, f"expected a list of symptoms, not {_type_name(value)}")
    ids: list[str] = []
    for item in value:
        symptom_id = _symptom(kb, item, name, field_error).id
        if symptom_id not in ids:
            ids.append(symptom_id)
    return ids


# -- AgentClinic OSCE vignettes -----------------------------------------------------------------


def _osce_card(record: dict[str, Any], kb: KnowledgeBase, where: str, default_id: str) -> CaseCard:
    def field_error(name: str, problem: str) -> ConfigError:
        return ConfigError(f"{where}, field '{name}': {problem}")

    exam = record[OSCE_KEY]
    if not isinstance(exam, dict):
        raise field_error(OSCE_KEY, f"expected an object, not {_type_name(exam)}")
    actor = exam.get("Patient_Actor")
    if actor is None:
        raise field_error(f"{OSCE_KEY}.Patient_Actor", "missing; it is what the patient plays")
    if not isinstance(actor, dict) or not actor:
        raise field_error(
            f"{OSCE_KEY}.Patient_Actor", f"expected a non-empty object, not {_type_name(actor)}"
        )
    diagnosis = exam.get("Correct_Diagnosis")
    if diagnosis is None:
        raise field_error(f"{OSCE_KEY}.Correct_Diagnosis", "missing; it is what the judge scores against")
    if not isinstance(diagnosis, str) or not diagnosis.strip():
        raise field_error(
            f"{OSCE_KEY}.Correct_Diagnosis", f"expected a diagnosis, not {_type_name(diagnosis)}"
        )
    diagnosis = " ".join(diagnosis.split())
    demographics = actor.get("Demographics")
    demo_field = f"{OSCE_KEY}.Patient_Actor.Demographics"
    if not isinstance(demographics, str) or not demographics.strip():
        raise field_error(
            demo_field, f'expected text such as "35-year-old woman", not {_type_name(demographics)}'
        )
    age = _age(demographics)
    if age is None:
        raise field_error(
            demo_field, f'cannot read an age from {demographics!r}; write e.g. "35-year-old woman"'
        )
    sex = _sex(demographics, actor)
    symptoms = actor.get("Symptoms")
    symptoms_field = f"{OSCE_KEY}.Patient_Actor.Symptoms"
    if not isinstance(symptoms, dict) or not isinstance(symptoms.get("Primary_Symptom"), str):
        raise field_error(
            f"{symptoms_field}.Primary_Symptom", "missing; it is what the patient comes in with"
        )
    chief = " ".join(symptoms["Primary_Symptom"].split()).rstrip(".")
    if not chief:
        raise field_error(f"{symptoms_field}.Primary_Symptom", "empty; it is what the patient comes in with")
    secondary = symptoms.get("Secondary_Symptoms", [])
    if isinstance(secondary, str):
        secondary = [secondary]
    if not isinstance(secondary, list):
        raise field_error(
            f"{symptoms_field}.Secondary_Symptoms", f"expected a list, not {_type_name(secondary)}"
        )
    condition, code = _gold(kb, diagnosis)
    for name, value in (
        ("Physical_Examination_Findings", exam.get("Physical_Examination_Findings")),
        ("Test_Results", exam.get("Test_Results")),
    ):
        if value is not None and not isinstance(value, dict | str | list):
            raise field_error(f"{OSCE_KEY}.{name}", f"expected an object, not {_type_name(value)}")
    vignette = _vignette(actor, chief, secondary, exam)
    card = CaseCard(
        case_id=default_id,
        split="train",
        seed=0,
        condition=condition,
        icd10=code,
        age=age,
        sex=sex,
        chief_complaint=chief,
        present=(),
        absent=(),
        vignette=vignette,
    )
    for name in gold_names(kb, card):
        if _names(name, vignette):
            raise field_error(
                f"{OSCE_KEY}.Patient_Actor",
                f"names the Correct_Diagnosis ({name!r}), which the patient must never be told; remove it",
            )
    fingerprint = card.fingerprint()
    return replace(card, split=split_of(fingerprint), seed=_seed(fingerprint))


def _gold(kb: KnowledgeBase, diagnosis: str) -> tuple[str, str]:
    """(condition, ICD-10-CM code or ""): a knowledge-base condition by name or synonym, else the
    diagnosis as written with the code whose description it is (the judge's offline scale needs one)."""
    found = kb.find_condition(diagnosis)
    if found is None:
        found = kb.find_condition(_without_parenthesis(diagnosis))
    if found is not None:
        return found.name, found.icd10
    for text in (diagnosis, _without_parenthesis(diagnosis)):
        code = icd.code_for_description(text)
        if code is not None:
            return diagnosis, code
    return diagnosis, ""


def gold_names(kb: KnowledgeBase, card: CaseCard) -> list[str]:
    """Every name of a card's hidden condition that the patient must not say: the knowledge base's name
    and synonyms, or for a vignette the diagnosis as written, without and within its parentheses."""
    condition = kb.find_condition(card.condition)
    names = condition.all_names() if condition is not None else []
    if card.vignette is not None:
        names = [*names, card.condition, _without_parenthesis(card.condition)]
        names += re.findall(r"\(([^()]+)\)", card.condition)
    return list(dict.fromkeys(name.strip() for name in names if name.strip()))


def _without_parenthesis(text: str) -> str:
    return " ".join(re.sub(r"\([^()]*\)", " ", text).split())


def _names(name: str, text: str) -> bool:
    """``text`` says ``name`` as whole words (case and apostrophe style ignored)."""
    name, text = name.replace("\u2019", "'"), text.replace("\u2019", "'")
    return bool(re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text, re.IGNORECASE))


def _age(demographics: str) -> int | None:
    years = _YEARS.search(demographics)
    if years:
        return int(years.group(1) or years.group(2))
    return 0 if _UNDER_ONE.search(demographics) else None


def _sex(demographics: str, actor: dict[str, Any]) -> Literal["female", "male", "unknown"]:
    female, male = bool(_FEMALE.search(demographics)), bool(_MALE.search(demographics))
    if female != male:
        return "female" if female else "male"
    # "Newborn, born at 33 weeks": the history's pronouns tell ("her eyes", "his knee").
    story = " ".join(_flatten(actor.get("History", "")))
    she, he = len(_SHE.findall(story)), len(_HE.findall(story))
    if she != he:
        return "female" if she > he else "male"
    return "unknown"  # a vignette may not say ("Newborn, born at 33 weeks of gestation")


def _vignette(actor: dict[str, Any], chief: str, secondary: Sequence[object], exam: dict[str, Any]) -> str:
    """The patient actor's part as prompt text: about the patient, the symptoms, and (by name only) the
    examination and tests the patient cannot know the results of."""
    keys = [k for k in _ACTOR_ORDER if k in actor] + [k for k in actor if k not in _ACTOR_ORDER]
    about = []
    for key in keys:
        if key == "Symptoms":
            continue
        text = "; ".join(_flatten(actor[key]))
        if text:
            about.append(f"- {_label(key)}: {text}")
    symptoms = [chief] + [" ".join(str(s).split()) for s in secondary if str(s).strip()]
    unknown = []
    for part in ("Physical_Examination_Findings", "Test_Results"):
        value = exam.get(part)
        if isinstance(value, dict):
            unknown += [_label(key) for key in value]
        elif value:
            unknown.append(_label(part))
    sections = [
        "About you:\n" + ("\n".join(about) or "- (nothing more)"),
        "Symptoms you have:\n" + "\n".join(f"- {s}" for s in symptoms),
        "Things you cannot know, because they need an examination or a test:\n"
        + ("\n".join(f"- {u}" for u in unknown) or "- (none)"),
    ]
    return "\n\n".join(sections)


def vignette_opening(card: CaseCard) -> str:
    """What the patient of a vignette says first: who came in and why (age, sex, chief complaint only)."""
    chief = card.chief_complaint
    if len(chief) > 1 and not chief[:2].isupper():
        chief = chief[0].lower() + chief[1:]
    adult = {"female": "woman", "male": "man"}.get(card.sex, "person")
    child = {"female": "daughter", "male": "son"}.get(card.sex, "child")
    if card.age >= 18:
        return f"I am a {card.age}-year-old {adult}. I came in because of {chief}."
    if card.age >= 1:
        return f"I am here with my {card.age}-year-old {child}. We came in because of {chief}."
    baby = "baby" if child == "child" else f"baby {child}"
    return f"I am here with my {baby}. We came in because of {chief}."


def _flatten(value: object) -> list[str]:
    if isinstance(value, dict):
        return [f"{_label(k)}: {'; '.join(_flatten(v))}" for k, v in value.items()]
    if isinstance(value, list):
        return [text for item in value for text in _flatten(item)]
    text = " ".join(str(value).split()) if value is not None else ""
    return [text] if text else []


def _label(key: str) -> str:
    """A JSON key as words: "Past_Medical_History" -> "Past medical history", "MRI_Brain" -> "MRI brain"."""
    words = [w if w.isupper() and len(w) > 1 else w.lower() for w in key.replace("_", " ").split()]
    text = " ".join(words)
    return text[:1].upper() + text[1:]


def _seed(fingerprint: str) -> int:
    return int(fingerprint[8:24], 16) & (2**63 - 1)


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"{value!r}" if value.strip() else "an empty string"
    return {dict: "an object", list: "a list", bool: "a boolean"}.get(type(value), repr(value))


def _did_you_mean(value: str, options: Sequence[str]) -> str:
    by_lower = {option.lower(): option for option in options}
    close = difflib.get_close_matches(str(value).lower(), list(by_lower), n=1, cutoff=0.7)
    return f"; did you mean {by_lower[close[0]]!r}?" if close else ""
