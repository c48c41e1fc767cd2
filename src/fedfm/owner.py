"""An owner's private data directory: what a Flower SuperNode trains on.

In a deployment each owner keeps its data on its own machine; the SuperNode started for it is told the
directory (``fedfm deploy supernode --data DIR``) and only the ClientApp running there ever reads it. The format
is small and plain, so an owner can write it from its own records::

    owner.json   {"format": "fedfm-owner/1", "name": "hospital-a", "index": 0, "num_clients": 3,
                  "task": "classification", "label_names": ["business", "sport", ...]}
    train.jsonl  one example per line: {"text": ..., "label": ...}  (retrieval / instruction: "text", "passage";
    test.jsonl   causal_lm: "text" only)

``index`` is the owner's position in the federation (it names the owner in sampling and seeds its client RNG);
``fedfm deploy split CONFIG --out DIR`` writes one such directory per client of a config's simulated split, so
a deployed run can be checked against the embedded engine on exactly the same shards.
"""

from __future__ import annotations

import json
from pathlib import Path

from typing import TYPE_CHECKING

from fedfm.errors import DataError

if TYPE_CHECKING:  # the data stack is imported only where data is read (a node's hello reads owner.json only)
    from fedfm.config import RunConfig
    from fedfm.data import FederatedSplit, TextDataset

FORMAT = "fedfm-owner/1"
PAIRS = ("retrieval", "instruction")


def _row(ds: TextDataset, i: int, task: str) -> dict:
    if task in PAIRS:
        return {"text": ds.texts[i], "passage": ds.passages[i]}
    if task == "classification":
        return {"text": ds.texts[i], "label": ds.label_names[int(ds.labels[i])]}
    return {"text": ds.texts[i]}


def export_owners(cfg: RunConfig, out: Path) -> list[Path]:
    """Write each client of ``cfg``'s seeded split as an owner directory under ``out`` (created; must be empty)."""
    from fedfm.data import load_dataset, split

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} is not empty: choose a new directory for the owners' data")
    ds = load_dataset(cfg.data, cfg.seed, cfg.task)
    sp = split(ds, cfg.data, cfg.federation.num_clients, cfg.seed, cfg.server_data.fraction)
    n, dirs = len(sp.client_names), []
    for i, (name, tr, te) in enumerate(zip(sp.client_names, sp.client_train, sp.client_test)):
        d = out / f"owner-{i:0{len(str(n - 1))}d}"
        tmp = d.with_name(d.name + ".partial")
        tmp.mkdir(parents=True)
        for part, idx in (("train", tr), ("test", te)):
            with open(tmp / f"{part}.jsonl", "w", encoding="utf-8") as f:
                for j in idx:
                    f.write(json.dumps(_row(ds, int(j), cfg.task), ensure_ascii=False) + "\n")
        meta = {"format": FORMAT, "name": name, "index": i, "num_clients": n, "task": cfg.task,
                "label_names": list(ds.label_names) if cfg.task == "classification" else []}
        (tmp / "owner.json").write_text(json.dumps(meta, indent=1))
        tmp.rename(d)  # a directory without .partial is complete
        dirs.append(d)
    return dirs


def read_owner(data_dir: Path) -> dict:
    """The owner's ``owner.json``, checked; a clear DataError for a missing or malformed directory."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"owner data directory {d} does not exist (start the SuperNode with --data pointing at the "
                        "owner's directory, e.g. one written by `fedfm deploy split`)")
    path = d / "owner.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{d} has no owner.json: it is not a fedfm owner directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path}: expected \"format\": \"{FORMAT}\"")
    for key, kind in (("name", str), ("index", int), ("num_clients", int), ("task", str), ("label_names", list)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):  # JSON true is no count
            raise DataError(f"{path}: field {key!r} must be a {kind.__name__}")
    if not 0 <= meta["index"] < meta["num_clients"]:
        raise DataError(f"{path}: index {meta['index']} is outside 0..{meta['num_clients'] - 1}")
    return meta


def check_owner(data_dir: Path, task: str, num_clients: int | None) -> dict:
    """``owner.json`` checked against a run (its task and federation size): cheap, no data is parsed.

    ``num_clients`` None (a natural partition, whose size comes from the data) leaves the size to the
    coordinator, which sends the number of owners of its split in its first message to every node."""
    meta, d = read_owner(data_dir), Path(data_dir)
    if meta["task"] != task:
        raise DataError(f"{d} holds {meta['task']} data but the run's task is {task}")
    if num_clients is not None and meta["num_clients"] != num_clients:
        raise DataError(f"{d} belongs to a federation of {meta['num_clients']} owners, the run has "
                        f"federation.num_clients={num_clients}")
    for part in ("train", "test"):
        if not (d / f"{part}.jsonl").is_file():
            raise DataError(f"owner data file {d / f'{part}.jsonl'} does not exist")
    return meta


def count_rows(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _rows(path: Path, task: str, label_names: list[str]) -> tuple[list[str], list[int], list[str]]:
    texts, labels, passages = [], [], []
    if not path.is_file():
        raise DataError(f"owner data file {path} does not exist")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}, line {n}: not UTF-8 text ({exc})") from None
            try:
                row = json.loads(line)
                texts.append(str(row["text"]))
                if task in PAIRS:
                    passages.append(str(row["passage"]))
                label = row.get("label") if task == "classification" else None
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise DataError(f"{path}, line {n}: {type(exc).__name__}: {exc}") from None
            if task == "classification":
                if label not in label_names:
                    raise DataError(f"{path}, line {n}: label {label!r} is not one of {label_names}")
                labels.append(label_names.index(label))
    return texts, labels, passages


def load_coordinator(cfg: RunConfig, names: list[str], label_names: list[str],
                     test_file: Path | None = None) -> tuple[TextDataset, FederatedSplit]:
    """The coordinator's data on Flower: none of the owners' examples. Its own test file (owner format) is its
    global test set; without one the global test set is empty and the owners evaluate (``names``: the owners,
    by federation index, as their nodes named themselves; ``label_names``: the label set they share)."""
    import numpy as np

    from fedfm.data import FederatedSplit, TextDataset

    texts: list[str] = []
    labels: list[int] = []
    passages: list[str] = []
    if test_file is not None:
        texts, labels, passages = _rows(Path(test_file), cfg.task, label_names)
        if not texts:
            raise DataError(f"the coordinator's test file {test_file} has no examples")
    task = cfg.task
    ds = TextDataset(
        texts=texts,
        labels=np.asarray(labels if task == "classification" else [0] * len(texts), dtype=np.int64),
        label_names=list(label_names) if task == "classification" else ["text"],
        keys=None,
        name="coordinator" + (f" test file {Path(test_file).name}" if test_file else " (no data)"),
        passages=passages if task in PAIRS else None,
    )
    empty = np.empty(0, dtype=np.int64)
    sp = FederatedSplit(global_test=np.arange(len(texts)), client_train=[empty] * len(names),
                        client_test=[empty] * len(names), client_names=list(names))
    return ds, sp


def load_owner(data_dir: Path, cfg: RunConfig) -> tuple[TextDataset, FederatedSplit, dict]:
    """The owner's data as a one-owner dataset and split: its shard at its own index, every other client empty.

    Checked against the run's config: same task, same number of clients."""
    import numpy as np

    from fedfm.data import FederatedSplit, TextDataset

    meta = check_owner(data_dir, cfg.task, cfg.federation.num_clients)
    d = Path(data_dir)
    tr = _rows(d / "train.jsonl", cfg.task, meta["label_names"])
    te = _rows(d / "test.jsonl", cfg.task, meta["label_names"])
    if not tr[0]:
        raise DataError(f"{d / 'train.jsonl'} has no examples")
    texts = tr[0] + te[0]
    task = cfg.task
    ds = TextDataset(
        texts=texts,
        labels=np.asarray(tr[1] + te[1] if task == "classification" else [0] * len(texts), dtype=np.int64),
        label_names=list(meta["label_names"]) if task == "classification" else ["text"],
        keys=None,
        name=f"owner {meta['name']}",
        passages=tr[2] + te[2] if task in PAIRS else None,
    )
    n, i, empty = meta["num_clients"], meta["index"], np.empty(0, dtype=np.int64)
    ntr = len(tr[0])
    sp = FederatedSplit(
        global_test=empty,
        client_train=[np.arange(ntr) if j == i else empty for j in range(n)],
        client_test=[np.arange(ntr, len(texts)) if j == i else empty for j in range(n)],
        client_names=[meta["name"] if j == i else f"owner-{j}" for j in range(n)],
    )
    return ds, sp, meta
