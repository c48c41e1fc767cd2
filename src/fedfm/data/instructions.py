"""Instruction data with natural owners, built from real corpora (task=instruction).

- ``foldoc``: "What is X?" -> the start of X's FOLDOC definition (cut at a sentence end after at most
  ``response_words`` words); the owner is the entry's domain tag, as in the RAG collection.
- ``chatterbot``: the chatterbot-corpus dialogs (pip package ``chatterbot-corpus``, BSD): every
  (statement, reply) pair of a conversation at user/assistant positions; the owner is the topic file.

Both give ``TextDataset`` records whose ``texts`` are instructions and ``passages`` the reference responses.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from fedfm.errors import DataError

_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def short_response(text: str, max_words: int) -> str:
    """``text`` cut after at most ``max_words`` words, at the last sentence end inside them when one falls
    after a third of them (else at the word limit). Line breaks and indentation inside the kept part stay
    (code answers keep their layout)."""
    text = text.strip()
    words = list(re.finditer(r"\S+", text))
    if len(words) <= max_words:
        return text
    head = text[: words[max_words - 1].end()]
    ends = [m.end() for m in _SENTENCE_END.finditer(head)]
    if ends and len(head[: ends[-1]].split()) >= max_words // 3:
        return head[: ends[-1]]
    return head


def foldoc_instructions(max_owners: int | None, max_words: int) -> tuple[list[str], list[str], list[str]]:
    """(instructions, responses, owners) for every FOLDOC entry."""
    from fedfm.data.dictd import foldoc_questions, load_collection

    docs = load_collection("foldoc", max_owners=max_owners)
    by_id = {d.id: d for d in docs}
    questions = foldoc_questions(docs)
    responses = [short_response(by_id[q.doc_ids[0]].text, max_words) for q in questions]
    keep = [i for i, r in enumerate(responses) if r]
    return (
        [questions[i].text for i in keep],
        [responses[i] for i in keep],
        [by_id[questions[i].doc_ids[0]].owner for i in keep],
    )


def chatterbot_dir() -> Path:
    try:
        import chatterbot_corpus
    except ImportError:
        raise DataError("data.source=chatterbot needs the package chatterbot-corpus: pip install chatterbot-corpus") from None
    return Path(chatterbot_corpus.__file__).parent / "data" / "english"


def chatterbot_instructions(max_owners: int | None, max_words: int) -> tuple[list[str], list[str], list[str]]:
    """(instructions, responses, owners): turns 0->1, 2->3, ... of every English conversation; owner = topic.

    With ``max_owners`` the most frequent topics are owners and the rest are pooled as ``other``.
    """
    import yaml

    root = chatterbot_dir()
    texts, responses, topics = [], [], []
    for f in sorted(root.glob("*.yml")):
        try:
            doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise DataError(f'"{f}": not valid YAML ({exc})') from None
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None]
            for i in range(0, len(turns) - 1, 2):
                if turns[i] and turns[i + 1]:
                    texts.append(turns[i])
                    responses.append(short_response(turns[i + 1], max_words))
                    topics.append(f.stem)
    if not texts:
        raise DataError(f'no conversations found under "{root}"')
    if max_owners is not None:
        kept = {t for t, _ in Counter(topics).most_common(max_owners)}
        topics = [t if t in kept else "other" for t in topics]
    return texts, responses, topics
