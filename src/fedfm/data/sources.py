"""Load a labelled text corpus into a :class:`TextDataset`.

Sources: the packaged real corpora (``tweets``, ``bbc``), the text corpora for language modelling, the
document collections giving (question, passage) pairs for retrieval (``foldoc``, ``elements``), instruction
pairs (``foldoc``, ``chatterbot``; see :mod:`fedfm.data.instructions`) and generic user data (``csv``, ``jsonl``,
``parquet``, Hugging Face ``datasets`` saved with ``save_to_disk``; with ``passage_column`` or
``response_column`` set they hold pairs). Every problem with the input is reported as a one-line
:class:`~fedfm.errors.DataError` naming the file and row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedfm.config import COLLECTIONS, DataConfig
from fedfm.data.fetch import bbc_dir, tweets_path
from fedfm.data.jsonl import read_jsonl
from fedfm.errors import DataError


@dataclass
class TextDataset:
    """Texts with integer labels (index into ``label_names``) and optional natural owner keys.

    A pairs dataset (task=retrieval or instruction) also has ``passages``: ``texts[i]`` is a query (an
    instruction), ``passages[i]`` the passage that answers it (the reference response); its labels are the owners, so the stratified global test set holds every owner.
    """

    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    keys: np.ndarray | None
    name: str
    passages: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: np.ndarray) -> TextDataset:
        """The examples at ``idx`` (in that order); label names are kept whole so ids stay valid."""
        idx = np.asarray(idx, dtype=np.int64)
        return TextDataset(
            texts=[self.texts[i] for i in idx],
            labels=self.labels[idx],
            label_names=list(self.label_names),
            keys=None if self.keys is None else self.keys[idx],
            name=self.name,
            passages=None if self.passages is None else [self.passages[i] for i in idx],
        )


# Tweet topics, tried in order; the first pattern found in the lower-cased text wins. The corpus
# mixes several CrowdFlower jobs, so the job's subject is a natural "data owner". Order matters
# for the few tweets that match two rules: airline complaints mentioning an iPhone or an
# "automated" phone line stay airline; self-driving tweets mentioning Apple/Google stay
# self_driving; "dropped the ball" in an airline tweet stays airline.
TWEET_TOPICS: list[tuple[str, str]] = [
    (
        "airline",
        r"@(united|usairways|americanair|southwestair|jetblue|virginamerica|delta\w*)\b|\bflight|airline",
    ),
    (
        "self_driving",
        (
            r"driver\W*less|self\W*driv|autonomous|automous|automated|connected (car|vehicle)"
            r"|google\W+car|robot car|drives? itself"
        ),
    ),
    (
        "deflategate",
        (
            r"deflat|#def|brady|belichick|patriots|football|\bnfl|super ?bowl|goo?dd?ell|seahawks"
            r"|\bballs?\b|inflated"
        ),
    ),
    ("coachella", r"coachella|#coac"),
    ("claritin", r"claritin"),
    ("apple", r"\bapple|aapl|iphone|ipad|\bmac\b|itunes|\bios\b|ipod"),
]
_TOPIC_RES = [(name, re.compile(pat)) for name, pat in TWEET_TOPICS]


def tweet_topic(text: str) -> str:
    """Topic of one tweet by keyword rules (see ``TWEET_TOPICS``); ``"other"`` when none match.

    Rules, first match wins: ``airline`` (@united, @usairways, @americanair, @southwestair,
    @jetblue, @virginamerica, @delta*, "flight", "airline"); ``self_driving`` (driverless,
    self-driving, autonomous, automated, connected car, google car); ``deflategate`` (deflat*,
    Brady, Belichick, Patriots, NFL, Super Bowl, Goodell, balls, inflated); ``coachella``;
    ``claritin``; ``apple`` (apple, AAPL, iPhone, iPad, Mac, iTunes, iOS, iPod).
    """
    low = text.lower()
    for name, rx in _TOPIC_RES:
        if rx.search(low):
            return name
    return "other"


def _label_names(values: list) -> list[str]:
    """Sorted unique str() forms; integer labels sort numerically so "10" comes after "9"."""
    uniq = {str(v): v for v in values}
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in uniq.values()):
        return [str(v) for v in sorted({int(v) for v in uniq.values()})]
    return sorted(uniq)


def _make_dataset(texts: list[str], raw_labels: list, keys: list | None, name: str, where: str) -> TextDataset:
    if not texts:
        raise DataError(f"{where}: dataset is empty (no rows)")
    names = _label_names(raw_labels)
    if len(names) < 2:
        raise DataError(f"{where}: need at least 2 distinct labels, found {len(names)} ({', '.join(names)})")
    lookup = {n: i for i, n in enumerate(names)}
    labels = np.array([lookup[str(v)] for v in raw_labels], dtype=np.int64)
    key_arr = None if keys is None else np.array([str(k) for k in keys], dtype=object)
    return TextDataset(texts=list(texts), labels=labels, label_names=names, keys=key_arr, name=name)


def _is_blank(v) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and np.isnan(v):
        return True
    return isinstance(v, str) and not v.strip()


def _py(v):
    """numpy scalars -> python (so ints are recognised as int labels)."""
    return v.item() if isinstance(v, np.generic) else v


def _make_pairs(queries: list[str], passages: list[str] | None, owners: list | None, name: str, where: str) -> TextDataset:
    """A pairs dataset (or, with ``passages`` None, a text-only one for language modelling); owners (or one owner,
    ``all``) double as labels for the stratified test split."""
    if not queries:
        raise DataError(f"{where}: dataset is empty (no pairs)")
    owner_names = [str(o) for o in owners] if owners is not None else ["all"] * len(queries)
    names = sorted(set(owner_names))
    lookup = {n: i for i, n in enumerate(names)}
    labels = np.array([lookup[o] for o in owner_names], dtype=np.int64)
    keys = None if owners is None else np.array(owner_names, dtype=object)
    return TextDataset(list(queries), labels, names, keys, name, passages=None if passages is None else list(passages))


def _wanted_columns(cfg: DataConfig, task: str = "classification") -> list[str]:
    """Columns a generic source must have: text and label, or text and passage for pairs, or text alone for language
    modelling; then the key."""
    second = [] if task == "causal_lm" else [cfg.passage_column or cfg.response_column or cfg.label_column]
    return [cfg.text_column, *second] + ([cfg.key_column] if cfg.key_column else [])


def _from_frame(df: pd.DataFrame, cfg: DataConfig, name: str, where: str, row_word: str = "row",
                task: str = "classification") -> TextDataset:
    """Validate columns and cells of a loaded table and build the dataset."""
    wanted = _wanted_columns(cfg, task)
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"available: {', '.join(repr(str(c)) for c in df.columns) or '(none)'}"
        )
    cols = {c: [_py(v) for v in df[c].tolist()] for c in wanted}
    for c in wanted:
        bad = [i for i, v in enumerate(cols[c]) if _is_blank(v)]
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise DataError(f"{where}: {row_word} {bad[0] + 1} has a null/empty {c!r}{more}")
    texts = [str(t) for t in cols[cfg.text_column]]
    keys = cols[cfg.key_column] if cfg.key_column else None
    if task == "causal_lm":  # documents, and their owner when data.key_column names one
        return _make_pairs(texts, None, keys, name, where)
    paired = cfg.passage_column or cfg.response_column
    if paired:
        return _make_pairs(texts, [str(p) for p in cols[paired]], keys, name, where)
    return _make_dataset(texts, cols[cfg.label_column], keys, name, where)


def _first_bad_utf8_line(path: Path) -> str:
    """Locate the first undecodable line so the error points at it (pandas only gives a byte offset)."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return f"line {lineno}, byte {raw[exc.start]:#04x} at column {exc.start + 1}"
    return "unknown line"


def _load_csv(path: Path, cfg: DataConfig, task: str) -> TextDataset:
    where = f'"{path}"'
    try:
        # keep_default_na=False: a text like "NA" or "null" is text, only empty cells are missing.
        df = pd.read_csv(path, encoding="utf-8", keep_default_na=False, na_values=[""])
    except UnicodeDecodeError:
        raise DataError(f"{where} is not valid UTF-8: {_first_bad_utf8_line(path)}") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{where}: file is empty") from None
    except pd.errors.ParserError as exc:
        raise DataError(f"{where}: malformed CSV: {str(exc).strip().splitlines()[-1]}") from None
    # Rows are numbered as data rows; with a header line, file line = row + 1 (barring multi-line cells).
    return _from_frame(df, cfg, path.stem, where, row_word="data row", task=task)


def _load_jsonl(path: Path, cfg: DataConfig, task: str) -> TextDataset:
    where = f'"{path}"'
    records, lines = read_jsonl(path, where)
    if not records:
        raise DataError(f"{where}: dataset is empty (no rows)")
    df = pd.DataFrame.from_records(records)
    try:
        return _from_frame(df, cfg, path.stem, where, row_word="record", task=task)
    except DataError as exc:
        # Translate "record N" into the file line for the user.
        msg = re.sub(r"record (\d+)", lambda m: f"line {lines[int(m.group(1)) - 1]}", str(exc))
        raise DataError(msg) from None


def _load_parquet(path: Path, cfg: DataConfig, task: str) -> TextDataset:
    where = f'"{path}"'
    try:
        df = pd.read_parquet(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise DataError(f"{where}: cannot read parquet ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    return _from_frame(df, cfg, path.stem, where, task=task)


def _load_hf_disk(path: Path, cfg: DataConfig, task: str) -> TextDataset:
    import datasets  # imported lazily: heavy, and only this source needs it

    where = f'"{path}"'
    try:
        obj = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:  # raised for a directory that is not a saved dataset
        raise DataError(f"{where}: not a dataset saved with save_to_disk ({str(exc).splitlines()[0]})") from None
    parts = list(obj.values()) if isinstance(obj, datasets.DatasetDict) else [obj]
    frames = []
    for part in parts:
        missing = [c for c in _wanted_columns(cfg, task) if c not in part.column_names]
        if missing:
            split = f" (split {part.split})" if part.split else ""
            raise DataError(
                f"{where}{split}: missing column(s) {', '.join(repr(c) for c in missing)}; "
                f"available: {', '.join(repr(c) for c in part.column_names)}"
            )
        df = part.to_pandas()
        labelled = task != "causal_lm" and not (cfg.passage_column or cfg.response_column)
        feat = part.features.get(cfg.label_column) if labelled else None
        if isinstance(feat, datasets.ClassLabel):  # use the class names, not their integer codes
            df[cfg.label_column] = [
                feat.int2str(int(v)) if v is not None and v >= 0 else None for v in df[cfg.label_column]
            ]
        frames.append(df)
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return _from_frame(df, cfg, path.name, where, task=task)


def _load_tweets() -> TextDataset:
    path = tweets_path()
    if not path.is_file():
        raise DataError("tweets corpus not fetched: run `fedfm data fetch`")
    df = pd.read_csv(path, encoding="latin-1", keep_default_na=False, na_values=[""])
    df = df[df["text"].fillna("").astype(str).str.strip() != ""]
    texts = df["text"].astype(str).tolist()
    keys = [tweet_topic(t) for t in texts]
    return _make_dataset(texts, df["sentiment"].tolist(), keys, "tweets", f'"{path}"')


def _load_bbc() -> TextDataset:
    root = bbc_dir()
    texts, labels = [], []
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(cls.glob("*.txt")):
            texts.append(f.read_text(encoding="latin-1").strip())
            labels.append(cls.name)
    return _make_dataset(texts, labels, None, "bbc", f'"{root}"')


_FILE_LOADERS = {"csv": _load_csv, "jsonl": _load_jsonl, "parquet": _load_parquet, "hf_disk": _load_hf_disk}


TEXT_CORPORA = ("shakespeare", "brown", "austen")


def _load_text_corpus(cfg: DataConfig) -> TextDataset:
    """A text corpus for language modelling: documents labelled by their natural owner.

    The owner is both the key (natural partition) and the label, so the stratified global test set
    holds every owner's text and Dirichlet partitioning skews owners over clients.
    """
    from fedfm.data.corpora import load_corpus

    corpus = load_corpus(cfg.source, cfg.owner)
    return _make_dataset(corpus.documents, corpus.owners, corpus.owners, corpus.name, cfg.source)


def _load_collection_pairs(cfg: DataConfig) -> TextDataset:
    """(question, passage) pairs of a document collection, one per document, for training a retriever.

    The query is the collection's question about the document — FOLDOC's "What is X?", the Elements'
    "What is the atomic number of X?" (one question per element, so no passage is the positive of two
    queries) — and the passage is the document's first chunk as :func:`~fedfm.data.dictd.chunk_document`
    cuts it with its default sizes, i.e. the passage the RAG store indexes. The owner is the document's.
    """
    from fedfm.data.dictd import chunk_document, element_questions, foldoc_questions, load_collection

    docs = load_collection(cfg.source, max_owners=cfg.owner_count)
    if cfg.source == "foldoc":
        questions = foldoc_questions(docs)
    else:
        questions = [q for q in element_questions(docs) if q.kind == "number"]
    by_id = {d.id: d for d in docs}
    relevant = [by_id[q.doc_ids[0]] for q in questions]
    passages = [chunk_document(d)[0] for d in relevant]
    return _make_pairs([q.text for q in questions], passages, [d.owner for d in relevant], cfg.source, cfg.source)


def _load_instruction_pairs(cfg: DataConfig) -> TextDataset:
    """(instruction, response) pairs of a packaged corpus, labelled by their natural owner (task=instruction)."""
    from fedfm.data.instructions import chatterbot_instructions, foldoc_instructions

    build = foldoc_instructions if cfg.source == "foldoc" else chatterbot_instructions
    texts, responses, owners = build(cfg.owner_count, cfg.response_words)
    return _make_pairs(texts, responses, owners, cfg.source, cfg.source)


def _cap_per_key(ds: TextDataset, cap: int, seed: int) -> TextDataset:
    """At most ``cap`` examples of each natural key (seeded choice, original order kept)."""
    rng = np.random.default_rng(seed)
    keys = ds.keys if ds.keys is not None else np.array(ds.label_names, dtype=object)[ds.labels]
    keep = []
    for k in sorted(set(keys)):
        idx = np.flatnonzero(keys == k)
        keep.append(idx if len(idx) <= cap else rng.choice(idx, size=cap, replace=False))
    return ds.subset(np.sort(np.concatenate(keep)))


def load_dataset(cfg: DataConfig, seed: int, task: str = "classification") -> TextDataset:
    """Load the corpus named by ``cfg.source``; subsample to ``cfg.max_examples`` (seeded) if set.

    ``task=instruction`` reads a document collection or the chatterbot dialogs as (instruction,
    response) pairs; ``data.max_per_key`` caps each natural owner first.

    The subsample keeps the original order of the kept rows. Raises :class:`DataError` with one
    line for a missing file, missing columns, undecodable or malformed rows, null/empty cells,
    fewer than 2 labels or an empty dataset.
    """
    if cfg.source == "tweets":
        ds = _load_tweets()
    elif cfg.source == "bbc":
        ds = _load_bbc()
    elif cfg.source in TEXT_CORPORA:
        ds = _load_text_corpus(cfg)
    elif task == "instruction" and cfg.source in ("foldoc", "chatterbot"):
        ds = _load_instruction_pairs(cfg)
    elif cfg.source in COLLECTIONS:
        ds = _load_collection_pairs(cfg)
    elif cfg.source in _FILE_LOADERS:
        if not cfg.path:
            raise DataError(f"data.path is required for data.source={cfg.source}")
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise DataError(f'file not found: "{path}"')
        if cfg.source != "hf_disk" and path.is_dir():
            raise DataError(f'"{path}" is a directory; data.source={cfg.source} needs a file')
        ds = _FILE_LOADERS[cfg.source](path, cfg, task)
    else:  # unreachable through DataConfig validation
        raise DataError(f"unknown data source {cfg.source!r}")
    if cfg.max_per_key is not None:
        ds = _cap_per_key(ds, cfg.max_per_key, seed)
    if cfg.max_examples and len(ds) > cfg.max_examples:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(ds), size=cfg.max_examples, replace=False))
        ds = ds.subset(keep)
    return ds
