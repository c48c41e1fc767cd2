"""A run's whole configuration: every section, evaluation, server data, comparison; checks within a concern.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

import fedfm.config.continual as continual_concern
import fedfm.config.engine as engine_concern
import fedfm.config.federation as federation_concern
import fedfm.config.head as head_concern
import fedfm.config.personal as personal_concern
import fedfm.config.privacy as privacy_concern
import fedfm.config.strategy as strategy_concern
import fedfm.config.train as train_concern
import fedfm.config.updates as updates_concern
from fedfm.config.base import Section
from fedfm.config.continual import ContinualConfig
from fedfm.config.data import COLLECTIONS, FILE_SOURCES, INSTRUCTION_SOURCES, DataConfig
from fedfm.config.engine import EngineConfig
from fedfm.config.federation import FederationConfig
from fedfm.config.head import HeadConfig
from fedfm.config.personal import PersonalConfig
from fedfm.config.model import ModelConfig, PeftSection
from fedfm.config.privacy import DPConfig, DPSGDConfig, SecAggConfig
from fedfm.config.rules import Cap, Part, check
from fedfm.config.strategy import StrategyConfig
from fedfm.config.train import TrainConfig
from fedfm.config.updates import AttackConfig, CompressionConfig


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


# recipe -> section -> settings it applies (benchmarks/results/label_skew.md measured them)
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "label_skew": {"head": {"loss": "fedetf", "calibrate": "ccvr"}},
}


class RunConfig(Section):
    name: str = Field("run", description="Run name; the run directory is <output_dir>/<name>.")
    seed: int = Field(0, description="Seed for data splits, initialisation, sampling and local training.")
    rounds: int = Field(5, ge=1, description="Federated rounds.")
    recipe: Literal["none", "label_skew"] = Field(
        "none",
        description="label_skew: the settings benchmarks/label_skew.py found to work for owners that hold one or a "
        "few classes (head.loss=fedetf and head.calibrate=ccvr, unless the head section says otherwise). CCVR "
        "reveals each owner's per-class feature mean and covariance: see the README's privacy table.",
    )
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
    head: HeadConfig = Field(default_factory=HeadConfig)
    personal: PersonalConfig = Field(default_factory=PersonalConfig)
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
    def _one_client_per_owner(cls, raw: Any) -> Any:
        """data.partition=natural: one client per owner key unless federation.num_clients is given (its default of 10
        is for the synthetic partitions)."""
        if not isinstance(raw, dict):
            return raw
        data, fed = raw.get("data"), raw.get("federation")
        natural = isinstance(data, dict) and data.get("partition") == "natural"
        if natural and (fed is None or (isinstance(fed, dict) and "num_clients" not in fed)):
            raw = {**raw, "federation": {**(fed or {}), "num_clients": None}}
        return raw

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, raw: Any) -> Any:
        """recipe: its settings under whatever the config sets itself."""
        if not isinstance(raw, dict) or raw.get("recipe") not in RECIPES:
            return raw
        out = dict(raw)
        for section, values in RECIPES[raw["recipe"]].items():
            mine = out.get(section)
            out[section] = {**values, **(mine if isinstance(mine, dict) else {})} if not isinstance(mine, Section) else mine
        return out

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
        """Each concern's own requirements first, then the compatibility of everything switched on."""
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
        if self.model.quantization is not None and self.peft.method == "none":
            raise ValueError(f"model.quantization={self.model.quantization} freezes a quantized base: it needs a peft "
                             "method (peft.method=lora for QLoRA), not full fine-tuning")
        if self.model.quantization is not None and self.model.source == "scratch":
            raise ValueError("model.quantization quantizes pretrained weights: not with model.source=scratch")
        if ("server" in self.compare.methods or self.server_data.steps > 0) and not self.server_data.active:
            raise ValueError("server_data.steps and the 'server' method need server_data.fraction > 0")
        for concern in (privacy_concern, continual_concern, strategy_concern, federation_concern, updates_concern,
                        head_concern, personal_concern):
            concern.check(self)
        check(self.parts())
        return self

    def parts(self) -> list[Part]:
        """Every part this config switches on, with its declared capabilities (``fedfm.config.rules``)."""
        concerns = (strategy_concern, federation_concern, privacy_concern, train_concern, head_concern,
                    personal_concern, continual_concern, updates_concern, engine_concern)
        return [*self._own_parts(), *(part for c in concerns for part in c.parts(self))]

    def _own_parts(self) -> list[Part]:
        """The task, the comparison's baselines and the server's own data."""
        out = []
        if self.task == "retrieval":
            coupled = "the in-batch-negatives loss couples the examples of a batch (each one is the others' negative)"
            out.append(Part("task=retrieval", {Cap.COUPLED_EXAMPLES: coupled, Cap.WHOLE_BATCH_LOSS: coupled},
                            fix="use dp (client-level DP-FedAvg) instead"))
        if self.task == "instruction":
            out.append(Part("task=instruction", {Cap.COUPLED_EXAMPLES: "its response-only loss is not supported with "
                                                 "per-example clipping"}, fix="use dp (client-level DP-FedAvg)"))
        baselines = [m for m in self.compare.methods if m in ("centralized", "local", "server")]
        if baselines:
            out.append(Part(f"compare.methods includes {', '.join(baselines)}", {Cap.BASELINES: ""}))
        if self.server_data.active:
            caps = {Cap.SERVER_UPDATE: "the server's own update joins the aggregate",
                    Cap.SIMULATED: "the coordinator holds no owner data there, and its own data is drawn from the "
                    "config's split"}
            if self.server_data.weight is None:
                caps[Cap.EXAMPLE_WEIGHTED] = ""
            out.append(Part("server_data", caps))
        return out

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

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
