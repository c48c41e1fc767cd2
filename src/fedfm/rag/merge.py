"""Pure functions of the server side of federated retrieval: merging owners' rankings, and metrics.

Written by hand: they are a few lines each and no library offers them in this form (FAISS merges
shards of one index, not rankings that arrive over the network from independent owners).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OwnedHit:
    """A passage in a merged ranking: which owner returned it, and its score in that merge."""

    owner: str
    doc: str
    chunk: int
    score: float
    text: str | None = None


def merge_exact(lists: dict[str, list[OwnedHit]], k: int) -> list[OwnedHit]:
    """The ``k`` best passages over all owners by score (ties: owner name, then chunk id).

    When every owner returns its own exact top-``k`` by the same similarity, this is exactly the top-k
    of one index over all the owners' passages: any passage of the global top-k is within the top-k of
    the owner that holds it. (Only passages with bit-identical scores may be ordered differently from a
    central index, which breaks such ties by its own chunk ids.)
    """
    every = [h for hits in lists.values() for h in hits]
    return sorted(every, key=lambda h: (-h.score, h.owner, h.chunk))[:k]


def merge_rrf(lists: dict[str, list[OwnedHit]], k: int, rrf_k: int = 60) -> list[OwnedHit]:
    """Reciprocal-rank fusion (Cormack et al. 2009): each owner's list is one ranking; a passage scores
    ``1 / (rrf_k + rank)`` (rank from 1) in the ranking that holds it, summed over rankings.

    Owners hold disjoint passages, so every owner's first passage gets the same fused score: RRF over
    shards interleaves the owners rank by rank. Ties are broken by the owner's own score (then owner
    name and chunk id), which orders passages of equal rank but never lifts a rank-2 passage above a
    rank-1 one. RRF needs no comparable scores, so owners with different encoders can still be fused."""
    fused: dict[tuple[str, int], list] = {}
    for owner, hits in lists.items():
        ranked = sorted(hits, key=lambda h: (-h.score, h.chunk))
        for rank, h in enumerate(ranked, 1):
            entry = fused.setdefault((owner, h.chunk), [0.0, h])
            entry[0] += 1.0 / (rrf_k + rank)
    order = sorted(fused.values(), key=lambda e: (-e[0], -e[1].score, e[1].owner, e[1].chunk))
    return [OwnedHit(h.owner, h.doc, h.chunk, s, h.text) for s, h in order[:k]]


def doc_ranking(hits: list) -> list[str]:
    """Document ids in ranked order, each once (a document with several passages counts at its best)."""
    return list(dict.fromkeys(h.doc for h in hits))


def recall_at(ranking: list[str], relevant: set[str], k: int) -> float:
    """Share of the relevant documents found in the first ``k`` of ``ranking``."""
    if not relevant:
        raise ValueError("a question needs at least one relevant document")
    return len(relevant & set(ranking[:k])) / len(relevant)


def reciprocal_rank(ranking: list[str], relevant: set[str]) -> float:
    """1 / (position of the first relevant document), 0 when none was retrieved."""
    return next((1.0 / i for i, d in enumerate(ranking, 1) if d in relevant), 0.0)
