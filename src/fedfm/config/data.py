"""Where the examples come from and how they are split over owners.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedfm.config.base import Section


FILE_SOURCES = ("csv", "jsonl", "parquet", "hf_disk")
COLLECTIONS = ("foldoc", "elements")  # document collections read by fedfm.data.dictd
INSTRUCTION_SOURCES = ("foldoc", "chatterbot")  # packaged corpora that give instruction pairs


class DataConfig(Section):
    source: Literal[
        "tweets", "bbc", "shakespeare", "brown", "austen", "foldoc", "elements", "chatterbot", "csv", "jsonl", "parquet",
        "hf_disk",
    ] = Field(
        "tweets",
        description="Corpus: a packaged labelled corpus (tweets, bbc), a packaged text corpus for language "
        "modelling (shakespeare, brown, austen), a document collection giving (question, passage) pairs for "
        "retrieval (foldoc, elements), instruction pairs with natural owners (foldoc 'What is X?' -> definition, "
        "chatterbot dialogs by topic; task=instruction) or a generic file/dir format.",
    )
    owner: str | None = Field(
        None, description="Natural owner key of a text corpus: shakespeare play|role, brown genre, austen novel."
    )
    owner_count: int | None = Field(
        None,
        ge=1,
        description="FOLDOC (chatterbot): the N most frequent domain tags (topics) are owners, every other entry is "
        "pooled as 'other' (None: one owner per tag, over a hundred for FOLDOC).",
    )
    max_per_key: int | None = Field(
        None, ge=1, description="Seeded cap on the examples of each natural owner key (of each label when the source has "
        "no owner keys), applied before max_examples."
    )
    response_words: int = Field(
        32, ge=4, description="task=instruction on foldoc/chatterbot: reference responses are cut to this many words "
        "(at a sentence end when one falls in them)."
    )
    path: str | None = Field(None, description="File or directory for csv/jsonl/parquet/hf_disk sources.")
    text_column: str = Field("text", description="Column holding the input text (generic sources; retrieval: the query).")
    label_column: str = Field("label", description="Column holding the class label (generic sources).")
    passage_column: str | None = Field(
        None,
        description="Column holding the relevant passage of each query (generic sources with task=retrieval; "
        "then no label column is read).",
    )
    system_prompt: str | None = Field(
        None, description="task=instruction: the system turn of every conversation (None: the chat template's default)."
    )
    response_column: str | None = Field(
        None, description="Column holding the reference response of each instruction (generic sources with task=instruction)."
    )
    key_column: str | None = Field(
        None, description="Column holding a natural owner key (generic sources); tweets use 'topic'."
    )
    max_examples: int | None = Field(
        None, ge=10, description="Random, seeded subsample of the corpus before splitting (speed)."
    )
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Share of the corpus held out as global test set.")
    client_test_fraction: float = Field(
        0.2, ge=0, lt=1, description="Share of each client's shard kept as that client's own test split."
    )
    partition: Literal["iid", "dirichlet", "natural", "quantity", "pathological"] = Field(
        "dirichlet", description="How the training pool is split over clients; pathological: each client holds "
        "data.classes_per_client classes only (label-pure owners with 1: a spam trap holds only spam)."
    )
    classes_per_client: int = Field(
        1, ge=1, description="pathological: classes per client, assigned cyclically (client i gets class i mod C, "
        "then the next ones), each class's examples divided evenly among the clients that hold it.",
    )
    alpha: float = Field(
        0.5, gt=0, description="Dirichlet concentration: label skew (dirichlet) or size skew (quantity)."
    )
    min_partition_size: int = Field(
        2, ge=0, description="Dirichlet: resample until every client has at least this many examples."
    )
    max_length: int = Field(
        64,
        ge=8,
        le=4096,
        description="Tokenised sequence length: truncation (classification; retrieval: of queries and passages), "
        "block size (causal_lm), prompt + response tokens (instruction).",
    )
