"""The answer generator: SmolLM2-135M-Instruct with its chat template, greedy decoding.

Used by the server (passages and guarded modes, centralized and closed-book baselines) and by each
owner in owner-side answering. The confidence of an answer is the geometric mean of the probabilities
of its generated tokens (``exp`` of the mean token log-probability, from transformers'
``compute_transition_scores``).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import torch

from fedfm.errors import ModelError

INSTRUCTION_RAG = "Read these passages and copy the exact value that answers the question."
INSTRUCTION_CLOSED = "Give the exact value that answers the question."


@dataclass(frozen=True)
class Passage:
    """A passage shown to the generator, with where it came from (for citations)."""

    owner: str
    doc: str
    text: str
    score: float


@dataclass(frozen=True)
class Generated:
    text: str
    confidence: float
    prompt_tokens: int


def model_dir(name: str):
    if name == "smollm2":
        from fedfm.smollm import smollm2_path

        path = smollm2_path()
        if not (path / "config.json").is_file():
            raise ModelError(f"SmolLM2 is not in the cache ({path}): run `fedfm data fetch --model smollm2`")
        return path
    from fedfm.models import resolve_model_path

    return resolve_model_path(name)


class Generator:
    def __init__(self, name: str = "smollm2", max_new_tokens: int = 24, max_passage_words: int = 80):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from fedfm.models import _quiet_transformers

        _quiet_transformers()
        path = model_dir(name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load generator from {path}: {exc}") from None
        self.max_new_tokens = max_new_tokens
        self.max_passage_words = max_passage_words
        self._lock = threading.Lock()

    def prompt(self, question: str, passages: list[Passage]) -> str:
        """The chat prompt: question, instruction, numbered passages, question again (a small model copies
        the right value far more often when the question comes both before and after the passages)."""
        if passages:
            lines = []
            for i, p in enumerate(passages, 1):
                text = "".join(re.findall(r"\S+\s*", p.text)[: self.max_passage_words]).strip()
                lines.append(f"[{i}] {text}")
            user = (f"Question: {question}\n\n{INSTRUCTION_RAG}\n\n" + "\n".join(lines)
                    + f"\n\nQuestion: {question}\nAnswer:")
        else:
            user = f"Question: {question}\n\n{INSTRUCTION_CLOSED}\n\nQuestion: {question}\nAnswer:"
        messages = [{"role": "user", "content": user}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def answer(self, question: str, passages: list[Passage]) -> Generated:
        # one model is shared by the simulated owners' threads: generate() is not safe to run concurrently
        with self._lock:
            return self._answer(question, passages)

    @torch.no_grad()
    def _answer(self, question: str, passages: list[Passage]) -> Generated:
        enc = self.tokenizer(self.prompt(question, passages), return_tensors="pt")
        out = self.model.generate(
            **enc, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
            return_dict_in_generate=True, output_scores=True,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        )
        new = out.sequences[0, enc["input_ids"].shape[1] :]
        logp = self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)[0]
        keep = new != self.tokenizer.eos_token_id
        conf = float(torch.exp(logp[keep].mean())) if keep.any() else 0.0
        text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        return Generated(text, conf, int(enc["input_ids"].shape[1]))


def normalise_answer(text: str) -> str:
    """Lower-case, punctuation dropped, spaces collapsed: how owner answers are grouped."""
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def is_correct(answer: str, expected: tuple[str, ...], kind: str) -> bool:
    """Exact-answer check: the expected number or symbol appears as a whole token in the answer.

    Symbols are case-sensitive ("Fe", not "fe" inside another word); numbers must not be part of a
    longer number (26 is not found in 126 or 26.98).
    """
    for exp in expected:
        if kind == "number":
            if re.search(rf"(?<![\d.]){re.escape(exp)}(?![\d]|\.\d)", answer):
                return True
        elif kind == "symbol":
            if re.search(rf"(?<![A-Za-z]){re.escape(exp)}(?![a-z])", answer):
                return True
        elif normalise_answer(exp) and normalise_answer(exp) in normalise_answer(answer):
            return True
    return False
