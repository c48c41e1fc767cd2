"""Sentence embeddings with all-MiniLM-L6-v2 (or a retriever fedfm trained from it).

The model is the plain transformers ``AutoModel``; the pooling is all-MiniLM-L6-v2's own recipe
(mean over non-padding tokens, then L2 normalisation, as its sentence-transformers config declares),
so inner products are cosine similarities and a FAISS inner-product index searches exactly by cosine.
A test checks the vectors against ``sentence_transformers.SentenceTransformer`` on the same model.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from fedfm.errors import ModelError


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of token vectors over positions where ``mask`` is 1, then L2-normalised: (batch, dim)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * m).sum(1)
    return torch.nn.functional.normalize(summed / m.sum(1).clamp(min=1e-9), dim=-1)


def encode_batch(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Pooled, normalised embeddings of one tokenised batch (gradients flow: used in training too)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return mean_pool(out.last_hidden_state, batch["attention_mask"])


def load_encoder(source: str = "minilm") -> tuple[torch.nn.Module, object]:
    """(encoder, tokenizer) from a packaged model name, a model directory, or a fedfm run's ``final/``.

    A ``final/`` holding a peft adapter (``adapter_config.json``) is applied to its base model and
    merged, so searching costs the same as with the base model.
    """
    from transformers import AutoModel, AutoTokenizer

    from fedfm.models import _quiet_transformers, resolve_model_path

    _quiet_transformers()
    path = Path(source).expanduser()
    try:
        if (path / "adapter_config.json").is_file():
            from peft import PeftConfig, PeftModel

            base = PeftConfig.from_pretrained(path).base_model_name_or_path
            model = PeftModel.from_pretrained(AutoModel.from_pretrained(base), path).merge_and_unload()
            tokenizer = AutoTokenizer.from_pretrained(path if (path / "tokenizer.json").is_file() else base)
        else:
            path = resolve_model_path(source)
            model, tokenizer = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load encoder from {source}: {exc}") from None
    return model.eval(), tokenizer


def encoder_fingerprint(source: str, max_length: int) -> str:
    """SHA-256 over the encoder's weight files (and an adapter's base) and the token limit: two stores
    embedded with different weights never mix, even when a retrained model is saved at the same path."""
    import hashlib

    from fedfm.models import resolve_model_path

    path = Path(source).expanduser()
    dirs = [path]
    if (path / "adapter_config.json").is_file():
        from peft import PeftConfig

        dirs.append(Path(PeftConfig.from_pretrained(path).base_model_name_or_path))
    else:
        dirs = [resolve_model_path(source)]
    h = hashlib.sha256(f"max_length={max_length}".encode())
    for d in dirs:
        for f in sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin")):
            with open(f, "rb") as fh:
                h.update(f.name.encode())
                h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()[:16]


class Embedder:
    """Texts -> float32 unit vectors (n, dim), in batches, without gradients."""

    def __init__(self, source: str = "minilm", max_length: int = 128, batch_size: int = 64):
        self.source = source
        self.model, self.tokenizer = load_encoder(source)
        self.max_length = max_length
        self.batch_size = batch_size
        self.dim = int(self.model.config.hidden_size)
        self.fingerprint = encoder_fingerprint(source, max_length)
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        # a fast tokenizer refuses concurrent use ("Already borrowed"): owners' threads take turns
        with self._lock:
            return self._encode(texts)

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # sort by length so each batch pads little; results go back to the caller's order
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for s in range(0, len(texts), self.batch_size):
            idx = order[s : s + self.batch_size]
            batch = self.tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            out[idx] = encode_batch(self.model, batch).float().numpy()
        return out
