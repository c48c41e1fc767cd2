"""A user's own evaluation questions for ``fedfm rag eval`` (``eval.questions``, ``--questions FILE``).

JSON Lines, one question per line::

    {"question": "Who discovered hydrogen?", "relevant": ["hydrogen"], "answers": ["Cavendish"]}

``relevant``: the ids of the documents that answer it (a non-empty list, or one id as a string), scored by
recall@k and MRR. ``answers`` (optional): accepted answer strings, scored by answer accuracy (an answer is
correct when one of them appears in it, compared lower-cased without punctuation). Blank lines are skipped.
Every line is checked and all bad lines are reported in one error.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedfm.data.dictd import Question
from fedfm.errors import DataError

KEYS = ("question", "relevant", "answers")
KIND = "text"  # fedfm.rag.generate.is_correct: a normalised substring match (not a number's or symbol's rule)
MAX_REPORTED = 50  # bad lines named in one error; the count of the rest follows


def _relevant(rec: dict):
    """The ``relevant`` field, one id given as a string read as a list of one."""
    rel = rec.get("relevant")
    return [rel] if isinstance(rel, str) else rel


def _problems(rec: object, known: set[str] | None, scope: str) -> list[str]:
    """What is wrong with one parsed line (empty when it is a valid question)."""
    if not isinstance(rec, dict):
        return [f"expected a JSON object, got {type(rec).__name__}"]
    out = [f"unknown key {json.dumps(k)} (keys: {', '.join(KEYS)})" for k in rec if k not in KEYS]
    text = rec.get("question")
    if not isinstance(text, str) or not text.strip():
        out.append('"question" must be a non-empty string')
    rel = _relevant(rec)
    if not isinstance(rel, list) or not rel or not all(isinstance(d, str) and d for d in rel):
        number = next((d for d in rel if isinstance(d, int | float)), None) if isinstance(rel, list) else None
        hint = f' (ids are strings: write "{number}", not {number})' if number is not None else ""
        out.append(f'"relevant" must be a non-empty list of document ids{hint}')
    elif known is not None:
        unknown = [d for d in dict.fromkeys(rel) if d not in known]
        if unknown:
            out.append(f"document id{'s' if len(unknown) > 1 else ''} not in {scope}: "
                       + ", ".join(json.dumps(d) for d in unknown))
    ans = rec.get("answers", [])
    if not isinstance(ans, list) or not all(isinstance(a, str) and a.strip() for a in ans):
        out.append('"answers" must be a list of non-empty strings (e.g. ["Paris"])')
    return out


def read_questions(path: str | Path, doc_ids: set[str] | None, scope: str = "the collection") -> list[Question]:
    """The questions of a JSONL evaluation file whose relevant documents are among ``doc_ids`` (``scope``
    names them in errors; None: not checked, as by a coordinator that holds none of the owners' documents).

    Raises one :class:`DataError` naming every bad line (up to ``MAX_REPORTED`` of them) and why.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f'questions file not found: "{file}"')
    try:
        raw_lines = file.read_bytes().splitlines()
    except OSError as exc:
        raise DataError(f'cannot read questions file "{file}": {exc.strerror}') from None
    questions, bad = [], []
    for no, raw in enumerate(raw_lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad.append(f"line {no}: not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})")
            continue
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append(f"line {no}: not JSON ({exc.msg} at column {exc.colno})")
            continue
        problems = _problems(rec, doc_ids, scope)
        if problems:
            bad.append(f"line {no}: " + ", ".join(problems))
            continue
        questions.append(Question(f"{file.name}:{no}", rec["question"].strip(), tuple(dict.fromkeys(_relevant(rec))),
                                  tuple(rec.get("answers", [])), KIND))
    if bad:
        more = f"; and {len(bad) - MAX_REPORTED} more bad lines" if len(bad) > MAX_REPORTED else ""
        raise DataError(f"{file} " + "; ".join(bad[:MAX_REPORTED]) + more)
    if not questions:
        raise DataError(f'questions file "{file}" has no questions')
    return questions
