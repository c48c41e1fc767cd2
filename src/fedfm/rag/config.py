"""Typed configuration of a federated RAG job (``fedfm rag index|ask|eval CONFIG``).

Same conventions as a training config: YAML plus dotted ``--set`` overrides, unknown keys and bad
values rejected with the valid choices named, the resolved config saved in the run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from fedfm.config import Section, apply_overrides, format_error, read_yaml_mapping
from fedfm.errors import ConfigError


class CollectionConfig(Section):
    name: Literal["elements", "foldoc", "jsonl"] = Field(
        "elements", description="Document collection: elements, foldoc (from Debian) or a jsonl file of "
        '{"id", "title", "text", "owner"} records.'
    )
    path: str | None = Field(None, description="The jsonl file (name=jsonl).")
    max_owners: int | None = Field(
        8, ge=1, description="FOLDOC: the most frequent domain tags that become owners; the rest is 'other'."
    )
    max_documents: int | None = Field(None, ge=2, description="Evenly spaced subsample of the collection (speed).")

    def documents(self):
        """The collection's documents, with their owners (see :func:`fedfm.data.dictd.load_collection`)."""
        from fedfm.data.dictd import load_collection

        return load_collection(self.name, self.path, self.max_owners, self.max_documents)


class StoreConfig(Section):
    encoder: str = Field("minilm", description="Embedding model: minilm, a model dir, or a fedfm run's final/ "
                         "(a retriever trained with task=retrieval).")
    chunk_words: int = Field(96, ge=8, description="Passage length in whitespace words.")
    chunk_overlap: int = Field(16, ge=0, description="Words shared by consecutive passages of a document.")
    max_length: int = Field(128, ge=8, le=512, description="Encoder token limit per passage.")
    batch_size: int = Field(64, ge=1, description="Passages embedded per batch.")

    @model_validator(mode="after")
    def _check(self) -> StoreConfig:
        if self.chunk_overlap >= self.chunk_words:
            raise ValueError(f"store.chunk_overlap ({self.chunk_overlap}) must be below store.chunk_words ({self.chunk_words})")
        return self


class QueryConfig(Section):
    send: Literal["text", "embedding"] = Field(
        "text", description="What goes to the owners: the question text, or only its embedding (the owner "
        "never sees the words; owner-side answering needs the text)."
    )
    k: int = Field(5, ge=1, le=100, description="Passages the server keeps after merging.")
    per_owner_k: int | None = Field(None, ge=1, le=100, description="Passages asked of each owner (default k).")
    merge: Literal["exact", "rrf"] = Field(
        "exact", description="exact: merge by score (equals one centralized index for exact search); "
        "rrf: reciprocal-rank fusion of the owners' rankings (ignores score scales)."
    )
    rrf_k: int = Field(60, ge=1, description="RRF constant: score = sum over owners of 1 / (rrf_k + rank).")
    deadline_s: float = Field(30.0, gt=0, description="Owners that have not answered by then are left out.")


class GuardConfig(Section):
    min_score: float = Field(0.35, ge=-1, le=1, description="Guarded release: passages below this cosine stay home.")
    max_k: int = Field(3, ge=1, description="Guarded release: at most this many passages per query.")
    budget: int = Field(1000, ge=0, description="Guarded release: queries each requester may make of an owner.")


class GeneratorConfig(Section):
    model: str = Field("smollm2", description="Generator: smollm2 (SmolLM2-135M-Instruct from the cache) or a dir.")
    max_new_tokens: int = Field(24, ge=1, le=512, description="Tokens generated per answer (greedy).")
    context_passages: int = Field(3, ge=1, description="Passages put in the generator's prompt.")
    max_passage_words: int = Field(80, ge=8, description="Words of each passage shown to the generator.")
    owner_min_score: float = Field(
        0.5, ge=-1, le=1, description="Owner-side answering: an owner whose best passage is below this abstains."
    )
    vote: Literal["max", "sum"] = Field(
        "max", description="Owner-side answering: the answer of the most confident owner (max), or the answer "
        "whose owners' confidences sum highest (sum; many owners agreeing on a guess can outvote the one who knows)."
    )


class FaultsConfig(Section):
    slow_owners: dict[str, float] = Field(
        default_factory=dict, description="Simulated faults: owner -> seconds added to each of its answers."
    )


class EvalConfig(Section):
    questions: str | None = Field(
        None, description="JSONL evaluation file of the user's own questions, one per line: {\"question\", "
        "\"relevant\": [doc id, ...], \"answers\": [str, ...] (optional)}; default: questions generated from "
        "the collection."
    )
    max_questions: int | None = Field(None, ge=1, description="Evenly spaced subsample of the question set.")
    answer_questions: int | None = Field(
        40, ge=1, description="Questions used for answer accuracy (generation is the slow part)."
    )
    modes: list[Literal["closed_book", "centralized", "passages", "owner_answers", "guarded"]] = Field(
        ["closed_book", "centralized", "passages", "owner_answers", "guarded"],
        description="Answering modes compared by `fedfm rag eval`.",
    )
    ks: list[Annotated[int, Field(ge=1)]] = Field([1, 5, 10], min_length=1, description="Cut-offs for recall@k.")


class RagConfig(Section):
    name: str = Field("rag", description="Run name: the run directory is output_dir/name.")
    output_dir: str = Field("runs", description="Where run directories are created.")
    seed: int = Field(0, description="Recorded with the run; nothing in RAG is random (questions are subsampled evenly).")
    threads: int | None = Field(None, ge=1, description="torch threads (default: torch's choice).")
    mode: Literal["passages", "owner_answers", "guarded"] = Field(
        "passages", description="What leaves an owner: passages (trusted federation), owner_answers (only "
        "answers with confidences), guarded (passages above a threshold, capped, budgeted, audited)."
    )
    owner_modes: list[Literal["passages", "owner_answers", "guarded"]] = Field(
        ["passages", "owner_answers", "guarded"], min_length=1,
        description="The owners' policy: the modes they answer. A request for any other mode is refused by the owner "
        "itself, whatever the requester asks for.",
    )
    requester: str = Field("server", description="Who asks (budgets and audit logs are kept per requester).")
    collection: CollectionConfig = Field(default_factory=CollectionConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    query: QueryConfig = Field(default_factory=QueryConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check(self) -> RagConfig:
        if self.collection.name == "jsonl" and not self.collection.path:
            raise ValueError("collection.path is required for collection.name=jsonl")
        if self.mode == "owner_answers" and self.query.send == "embedding":
            raise ValueError("mode=owner_answers needs the question text at the owners: set query.send=text")
        asked = [m for m in [self.mode, *self.eval.modes] if m in ("passages", "owner_answers", "guarded")]
        refused = sorted(set(asked) - set(self.owner_modes))
        if refused:
            raise ValueError(f"mode/eval.modes ask owners for {', '.join(refused)}, which owner_modes "
                             f"({', '.join(self.owner_modes)}) does not allow")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


_SECTIONS = {"collection", "store", "query", "guard", "generator", "faults", "eval"}


def load(path: str | Path, overrides: list[str] | None = None) -> RagConfig:
    """Load a RAG YAML config and apply ``key=value`` overrides."""
    raw = apply_overrides(read_yaml_mapping(path), overrides or [])
    raw = {k: ({} if v is None and k in _SECTIONS else v) for k, v in raw.items()}
    try:
        return RagConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_error(err, RagConfig)) from None


def save(cfg: RagConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
