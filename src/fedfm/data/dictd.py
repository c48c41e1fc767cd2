"""Document collections for retrieval-augmented generation: FOLDOC and the Elements, from Debian.

Both ship as dictd databases (``apt-get download dict-foldoc dict-elements``): a ``.index`` file of
``headword<TAB>offset<TAB>length`` lines, the numbers in dictd's base-64 alphabet, and a gzip-readable
``.dict.dz`` holding the entries back to back. No PyPI package reads this format (the ``dictd``
tools are a C server), so the twenty lines of parsing here are written by hand.

:func:`fetch_foldoc` / :func:`fetch_elements` write one JSONL file per collection in the fedfm cache;
:func:`load_collection` reads it back as :class:`Document` records with a natural owner each:
FOLDOC's first domain tag (``<networking, protocol>`` -> ``networking``), the Elements' period of the
periodic table. :func:`element_questions` and :func:`foldoc_questions` build the question sets whose
answers are known (atomic number and symbol; "What is X?" against X's definition).
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fedfm.data.corpora import _apt_download, _run, build_dir_atomically
from fedfm.data.fetch import cache_dir
from fedfm.data.jsonl import read_jsonl
from fedfm.errors import DataError

COLLECTIONS = {"foldoc": "dict-foldoc", "elements": "dict-elements"}
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_PERIOD_ENDS = (2, 10, 18, 36, 54, 86, 118)  # last atomic number of each period of the periodic table


@dataclass(frozen=True)
class Document:
    """One document of a collection: ``id`` is unique in the collection, ``owner`` its natural owner."""

    id: str
    title: str
    text: str
    owner: str
    meta: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Question:
    """A question with a known answer: the relevant document ids and accepted answer strings."""

    id: str
    text: str
    doc_ids: tuple[str, ...]
    answers: tuple[str, ...]
    kind: str


def b64_number(s: str) -> int:
    """A dictd index number: base 64, most significant digit first, alphabet ``A-Za-z0-9+/``."""
    n = 0
    for ch in s:
        k = _B64.find(ch)
        if k < 0:
            raise DataError(f"bad dictd index number {s!r}")
        n = n * 64 + k
    return n


def read_dictd(index: Path, dict_dz: Path) -> list[tuple[list[str], str]]:
    """Entries of a dictd database as (headwords, entry text), in file order.

    Several headwords may point at the same bytes (``16750C`` and ``16C750``): they become one entry.
    The ``00database...`` metadata entries are skipped.
    """
    try:
        with gzip.open(dict_dz) as fh:
            raw = fh.read()
        lines = index.read_text(encoding="utf-8", errors="replace").splitlines()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read dictd database {dict_dz}: {exc}") from None
    spans: dict[tuple[int, int], list[str]] = {}
    for no, line in enumerate(lines, 1):
        parts = line.split("\t")
        if len(parts) < 3:
            raise DataError(f"{index}:{no}: expected headword, offset and length separated by tabs")
        word, off, length = parts[0], b64_number(parts[1]), b64_number(parts[2])
        if word.startswith(("00database", "00-database")):
            continue
        if off + length > len(raw):
            raise DataError(f"{index}:{no}: entry {word!r} points past the end of {dict_dz.name}")
        spans.setdefault((off, length), []).append(word)
    return [(words, raw[o : o + n].decode("utf-8", errors="replace")) for (o, n), words in sorted(spans.items())]


_TAGS = re.compile(r"^\s*<([^>]+)>")
_BRACES = re.compile(r"\{([^{}]*)\}")
_DATE = re.compile(r"\n\s*\(\d{4}-\d{2}-\d{2}\)\s*$")


def foldoc_document(words: list[str], entry: str) -> dict | None:
    """One FOLDOC entry as a JSON-ready record, or None for an empty one.

    The entry starts with its headword line(s); the body's first ``<...>`` holds the domain tags.
    Cross-reference braces ``{UART}`` are dropped to plain words and the trailing date removed.
    """
    lines = entry.strip("\n").split("\n")
    title = lines[0].strip()
    body_start = next((i for i, ln in enumerate(lines) if ln.startswith(" ") or not ln.strip()), len(lines))
    body = "\n".join(lines[body_start:]).strip()
    m = _TAGS.match(body)
    tags = [t.strip().lower() for t in m.group(1).split(",") if t.strip()] if m else []
    if m:
        body = body[m.end() :]
    body = _DATE.sub("", "\n" + body).strip()
    body = _BRACES.sub(r"\1", body)
    body = re.sub(r"[ \t]*\n[ \t]*", "\n", body)
    body = re.sub(r"(?<!\n)\n(?!\n)", " ", body)  # re-flow wrapped lines, keep paragraph breaks
    body = re.sub(r"[ \t]+", " ", body).strip()
    if not body:
        return None
    return {"id": title, "title": title, "aliases": [w for w in words if w != title], "tags": tags, "text": body}


def element_document(words: list[str], entry: str) -> dict | None:
    """One Elements entry (name, ``Symbol:``, ``Atomic number:``, description) as a record, or None."""
    lines = [ln.rstrip() for ln in entry.strip("\n").split("\n")]
    name = lines[0].strip()
    fields: dict[str, str] = {}
    desc: list[str] = []
    for ln in lines[1:]:
        key, sep, value = ln.partition(":")
        if sep and key.strip() in ("Symbol", "Atomic number", "Atomic weight") and not desc:
            fields[key.strip()] = value.strip()
        elif ln.strip():
            desc.append(ln.strip())
    if "Atomic number" not in fields or not fields["Atomic number"].isdigit():
        return None
    number = int(fields["Atomic number"])
    symbol = fields.get("Symbol", "")
    text = f"{name.capitalize()}\nSymbol: {symbol}\nAtomic number: {number}\n"
    if "Atomic weight" in fields:
        text += f"Atomic weight: {fields['Atomic weight']}\n"
    text += _BRACES.sub(r"\1", " ".join(desc))
    return {"id": name, "title": name, "symbol": symbol, "number": number, "text": text.strip()}


def collection_path(name: str) -> Path:
    """``<cache>/<name>/<name>.jsonl`` (it may not exist yet)."""
    if name not in COLLECTIONS:
        raise DataError(f"unknown collection {name!r}: choose one of {', '.join(COLLECTIONS)}")
    return cache_dir() / name / f"{name}.jsonl"


def _fetch(name: str, force: bool, parse) -> Path:
    dest = collection_path(name)

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="fedfm-fetch-") as dl:
            where = Path(dl)
            deb = _apt_download(COLLECTIONS[name], where)
            unpacked = where / "x"
            _run(["dpkg", "-x", str(deb), str(unpacked)], f"dpkg -x {deb.name}")
            share = unpacked / "usr" / "share" / "dictd"
            records = [r for words, entry in read_dictd(share / f"{name}.index", share / f"{name}.dict.dz")
                       if (r := parse(words, entry)) is not None]
            seen: Counter = Counter()
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as fh:
                for r in records:
                    seen[r["id"]] += 1
                    if seen[r["id"]] > 1:  # FOLDOC has a few repeated titles: keep ids unique
                        r["id"] = f"{r['id']} ({seen[r['id']]})"
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            licence = unpacked / "usr" / "share" / "doc" / COLLECTIONS[name] / "copyright"
            if licence.is_file():
                shutil.copyfile(licence, tmp / "copyright")

    build_dir_atomically(dest.parent, dest.is_file() and not force, build)
    return dest


def fetch_foldoc(force: bool = False) -> Path:
    """FOLDOC (14,995 headwords, 12,014 entries once aliases are merged, domain-tagged) from Debian's
    dict-foldoc into the cache."""
    return _fetch("foldoc", force, foldoc_document)


def fetch_elements(force: bool = False) -> Path:
    """The Elements (symbol, atomic number, description) from Debian's dict-elements into the cache."""
    return _fetch("elements", force, element_document)


def period(number: int) -> int:
    """Period (row) of the periodic table of atomic number ``number``."""
    return next((i + 1 for i, end in enumerate(_PERIOD_ENDS) if number <= end), len(_PERIOD_ENDS) + 1)


def load_collection(name: str, path: str | Path | None = None, max_owners: int | None = None,
                    max_documents: int | None = None) -> list[Document]:
    """Documents of collection ``name`` (``foldoc``, ``elements``, or ``jsonl`` at ``path``).

    Owners: FOLDOC's domain tags, the ``max_owners`` most frequent ones each an owner (an entry goes to
    the most frequent of its tags) and the rest (and untagged entries) pooled as ``other``; the
    Elements' period (``period-1`` ... ``period-7``); a JSONL file's ``owner`` field. ``max_documents`` keeps that many documents evenly spaced in file order (the same
    ones every time, owners in proportion to their size).
    """
    if name == "jsonl":
        if path is None:
            raise DataError("a jsonl collection needs a path")
        file = Path(path).expanduser()
    else:
        file = collection_path(name)
        if not file.is_file():
            raise DataError(f"{name} collection not fetched: run `fedfm data fetch --corpus {name}`")
    if not file.is_file():
        raise DataError(f'collection file not found: "{file}"')
    records, lines = read_jsonl(file, f'"{file}"')
    for r, no in zip(records, lines):
        if not isinstance(r.get("text"), str) or not r["text"].strip():
            raise DataError(f'"{file}" line {no}: needs a non-empty "text" field')
    if not records:
        raise DataError(f'collection "{file}" is empty')
    if name == "foldoc":
        counts = Counter(t for r in records for t in r.get("tags", []))
        rank = {t: i for i, (t, _) in enumerate(counts.most_common(max_owners))}
        # an entry goes to the most common of its tags among the kept ones; untagged or rare -> "other"
        owners = [min((t for t in r.get("tags", []) if t in rank), key=rank.get, default="other") for r in records]
    elif name == "elements":
        owners = [f"period-{period(r['number'])}" for r in records]
    else:
        owners = [str(r.get("owner", "owner-0")) for r in records]
    docs = []
    for i, (r, owner) in enumerate(zip(records, owners)):
        meta = {k: v for k, v in r.items() if k not in ("id", "title", "text")}
        docs.append(Document(str(r.get("id", i)), str(r.get("title", r.get("id", i))), r["text"], owner, meta))
    if len({d.id for d in docs}) != len(docs):
        dup = next(k for k, c in Counter(d.id for d in docs).items() if c > 1)
        raise DataError(f'collection "{file}": document id {dup!r} appears more than once')
    if max_documents and len(docs) > max_documents:
        step = len(docs) / max_documents
        docs = [docs[int(i * step)] for i in range(max_documents)]
    return docs


def element_questions(docs: list[Document]) -> list[Question]:
    """Two questions per element: its atomic number and its chemical symbol (when it has one)."""
    out = []
    for d in docs:
        name, number, symbol = d.title, d.meta.get("number"), d.meta.get("symbol")
        if number is not None:
            out.append(Question(f"{d.id}/number", f"What is the atomic number of {name}?", (d.id,), (str(number),), "number"))
        if symbol:
            out.append(Question(f"{d.id}/symbol", f"What is the chemical symbol of {name}?", (d.id,), (symbol,), "symbol"))
    return out


def foldoc_questions(docs: list[Document]) -> list[Question]:
    """"What is X?" for every FOLDOC entry; the relevant document is X's definition."""
    return [Question(f"{d.id}/what", f"What is {d.title}?", (d.id,), (), "definition") for d in docs]


def questions_for(name: str, docs: list[Document]) -> list[Question]:
    if name == "elements":
        return element_questions(docs)
    if name == "foldoc":
        return foldoc_questions(docs)
    return [Question(f"{d.id}/title", d.title, (d.id,), (), "title") for d in docs]


def chunk_document(doc: Document, words: int = 96, overlap: int = 16) -> list[str]:
    """Passages of ``doc``: windows of ``words`` whitespace words overlapping by ``overlap``, each
    headed by the document's title (a definition is found by its term, as in any dictionary)."""
    if words <= overlap:
        raise ValueError(f"chunk words ({words}) must exceed the overlap ({overlap})")
    toks = re.findall(r"\S+\s*", doc.text.strip())  # words with the space after them: line breaks survive
    step = words - overlap
    starts = range(0, max(1, len(toks) - overlap), step)
    head = doc.title if doc.title.lower() not in "".join(toks[:3]).lower() else ""
    return [(f"{head}\n" if head else "") + "".join(toks[s : s + words]).strip() for s in starts]
