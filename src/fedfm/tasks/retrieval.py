"""Retrieval: contrastive training of a sentence encoder on (query, passage) pairs; recall@k and MRR.

The encoder is trained exactly as ``fedfm.rag`` uses it: the mean of its token vectors over the attention
mask, L2-normalised (:func:`fedfm.rag.embed.encode_batch`), so a cosine similarity ranks passages. The loss
is the in-batch-negatives InfoNCE of sentence-transformers' ``MultipleNegativesRankingLoss`` (Henderson et
al. 2017, "Efficient Natural Language Response Suggestion"; van den Oord et al. 2018): each query must pick
its own passage among every passage of the batch. It is written here in four lines because
sentence-transformers (a dev dependency only) computes it on a ``SentenceTransformer`` model, not on the
peft-wrapped ``AutoModel`` a client trains; a test checks it against that class.

Evaluation ranks every held-out query against all distinct held-out passages of the split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedfm.placement import placement_of
from fedfm.rag.embed import encode_batch

SCALE = 20.0  # MultipleNegativesRankingLoss's default: cosine x 20, i.e. a temperature of 0.05
RETRIEVAL_METRICS = ("recall@1", "recall@5", "mrr")  # what evaluate() reports besides the loss


@dataclass
class Pairs:
    """Tokenised (query, passage) pairs, padded to ``max_length`` once and trimmed per batch.

    ``passage_key[i]`` numbers the distinct passage texts of the whole dataset, so the same passage (two
    questions about one document) is recognised in any subset: it is never its own negative, and it is
    ranked once.
    """

    query_ids: torch.Tensor  # [N, L] int64
    query_mask: torch.Tensor  # [N, L] int64
    passage_ids: torch.Tensor  # [N, L] int64
    passage_mask: torch.Tensor  # [N, L] int64
    passage_key: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return int(self.passage_key.shape[0])

    def subset(self, idx: np.ndarray | torch.Tensor) -> Pairs:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Pairs(self.query_ids[idx], self.query_mask[idx], self.passage_ids[idx], self.passage_mask[idx], self.passage_key[idx])

    @staticmethod
    def cat(parts: list[Pairs]) -> Pairs:
        return Pairs(*(torch.cat([getattr(p, f) for p in parts]) for f in Pairs.__dataclass_fields__))


def encode_pairs(tokenizer, queries: list[str], passages: list[str], max_length: int) -> Pairs:
    """Tokenise every query and passage once up front (truncated to ``max_length`` tokens)."""
    numbers: dict[str, int] = {}
    key = [numbers.setdefault(p, len(numbers)) for p in passages]
    if not len(queries):  # no examples (HF tokenizers fail on an empty list)
        none = torch.zeros((0, max_length), dtype=torch.long)
        return Pairs(none, none.clone(), none.clone(), none.clone(), torch.zeros(0, dtype=torch.long))
    q = tokenizer(list(queries), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    p = tokenizer(list(passages), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return Pairs(q["input_ids"], q["attention_mask"], p["input_ids"], p["attention_mask"], torch.tensor(key, dtype=torch.long))


def _trim(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dynamic padding: drop the columns that are padding for every row (padding is on the right)."""
    width = int(mask.sum(1).max())
    return {"input_ids": ids[:, :width], "attention_mask": mask[:, :width]}


def info_nce(queries: torch.Tensor, passages: torch.Tensor, passage_key: torch.Tensor | None = None,
             scale: float = SCALE) -> torch.Tensor:
    """Mean cross-entropy of each query's scaled cosine scores over the batch's passages, target its own.

    ``queries`` and ``passages`` are unit vectors (b, d); row i of each is a pair. As
    sentence-transformers' ``MultipleNegativesRankingLoss`` (query-to-passage direction), except that a
    passage repeated in the batch (same ``passage_key``) is removed from the other rows' negatives.
    """
    scores = scale * queries @ passages.T
    if passage_key is not None:
        same = passage_key[:, None] == passage_key[None, :]
        scores = scores.masked_fill(same & ~torch.eye(len(same), dtype=torch.bool), float("-inf"))
    return F.cross_entropy(scores, torch.arange(len(queries)))


def ranking_metrics(scores: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """recall@k and mean reciprocal rank, one relevant candidate per query.

    ``scores`` (queries, candidates); ``target[i]`` is query i's relevant candidate. Its rank is the number
    of candidates scoring at least as high as it, so ties count against the query (as in scikit-learn's
    ``label_ranking_average_precision_score``, which equals MRR here): an encoder that gives every passage
    the same score ranks nothing, instead of looking perfect.
    """
    pos = scores.gather(1, target[:, None])
    rank = (scores >= pos).sum(1).double()
    return {**{f"recall@{k}": float((rank <= k).double().mean()) for k in ks}, "mrr": float((1.0 / rank).mean())}


class RetrievalTask:
    """Batches, loss (in-batch-negatives InfoNCE) and metrics (recall@1, recall@5, MRR) for a sentence encoder."""

    record_metrics: tuple[str, ...] = RETRIEVAL_METRICS  # what a round record shows beside the loss

    def __init__(self, scale: float = SCALE):
        self.scale = scale

    @staticmethod
    def batch(data: Pairs, idx: torch.Tensor) -> dict:
        return {
            "query": _trim(data.query_ids[idx], data.query_mask[idx]),
            "passage": _trim(data.passage_ids[idx], data.passage_mask[idx]),
            "passage_key": data.passage_key[idx],
        }

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        q, p = encode_batch(model, batch["query"]), encode_batch(model, batch["passage"])
        return info_nce(q, p, batch["passage_key"], self.scale)

    @staticmethod
    def _embed(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, batch_size: int) -> torch.Tensor:
        where, parts = placement_of(model), []
        for i in torch.arange(len(ids)).split(batch_size):
            with where.autocast():
                parts.append(encode_batch(model, where.move(_trim(ids[i], mask[i]))).float().cpu())
        return torch.cat(parts)

    def evaluate(self, model: torch.nn.Module, data: Pairs, batch_size: int = 128) -> dict[str, float]:
        """Each query ranked against every distinct passage of ``data``: recall@1, recall@5, MRR, and the loss
        (InfoNCE against all those passages, so it is not comparable to the in-batch training loss)."""
        if len(data) == 0:
            return {"loss": math.nan, **{k: math.nan for k in RETRIEVAL_METRICS}}
        was_training = model.training
        model.eval()
        # one row per distinct passage: the first pair that holds it; target[i] = query i's passage row
        distinct, target = torch.unique(data.passage_key, return_inverse=True)
        first = torch.full((len(distinct),), len(data)).scatter_reduce(0, target, torch.arange(len(data)), "amin")
        with torch.inference_mode():
            q = self._embed(model, data.query_ids, data.query_mask, batch_size)
            p = self._embed(model, data.passage_ids[first], data.passage_mask[first], batch_size)
        model.train(was_training)
        scores = q @ p.T
        loss = float(F.cross_entropy(self.scale * scores, target))
        return {"loss": loss, **ranking_metrics(scores, target)}
