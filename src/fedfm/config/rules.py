"""Compatibility from declared capabilities: which switched-on parts cannot run together, and why.

Each concern's module declares, for the parts of fedfm its section switches on, what they do (``Part``: the config
key that switches it on, and a phrase for each capability). A ``Rule`` names two capabilities that cannot meet
and how to say so; ``check`` applies every rule to every pair of declared parts, in the order of ``RULES`` (the
first conflict found is the message). So a new feature declares its capabilities once, and every rule that
concerns them applies to it: there is no list of pairs of features to keep by hand. Each refusal names both
parts and what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto


class Cap(Enum):
    """What a part of a run does, as far as other parts are concerned."""

    EACH_UPDATE = auto()  # the server must see each client's update (robust statistics, LoRA products, screening)
    SUM_ONLY = auto()  # the server sees only the sum of the updates (secure aggregation)
    NOISED_SUM = auto()  # the aggregate is noised: individual updates mean nothing (DP-FedAvg)
    CLIENT_PRIVACY = auto()  # protects each client's whole participation (DP-FedAvg, secure aggregation)
    DP_CLAIM = auto()  # the run states a differential-privacy guarantee (dp, dpsgd)
    HIDES_COUNTS = auto()  # clients' example counts are not released (DP-FedAvg counts each client as 1)
    CLEAR_TENSORS = auto()  # sends something in the clear beside the update (control variates, Fisher, label counts)
    PER_EXAMPLE = auto()  # clips each example's gradient (DP-SGD)
    NON_EXAMPLE_GRADIENT = auto()  # a loss or gradient term that is not a sum over examples
    COUPLED_EXAMPLES = auto()  # each example's loss depends on the other examples of its batch
    EXAMPLE_ACCOUNTING = auto()  # accounts for each example's sampling rate in its owner's whole shard (DP-SGD)
    STAGE_SUBSETS = auto()  # trains each owner on a subset of its shard that changes by stage
    FIXED_SAMPLING_ACCOUNTING = auto()  # accounts for fixed-size sampling among all clients (DP-FedAvg, fixed)
    STAGE_OWNER_SAMPLING = auto()  # samples among the stage's eligible owners only
    STAGE_SCHEDULE = auto()  # the data changes by stage (continual learning)
    LABEL_PRIOR = auto()  # assumes one label distribution for the whole run
    CONTROL_VARIATES = auto()  # needs a control variate from every update it aggregates (SCAFFOLD)
    SERVER_UPDATE = auto()  # the server's own update joins the aggregate (Algorithm 2)
    EXAMPLE_WEIGHTED = auto()  # weighs the server's update against the clients' example counts
    IGNORES_WEIGHTS = auto()  # a robust statistic that ignores (or drops) an update's weight
    NOT_MEAN = auto()  # aggregates otherwise than by the weighted mean
    REPLACES_MEAN = auto()  # takes the weighted mean's place (LoRA-aware aggregation)
    REBASES = auto()  # re-factorises the adapter in a new basis each round (exact / FlexLoRA)
    STATEFUL_SERVER_OPT = auto()  # the server optimizer keeps state across rounds (momentum, moments)
    STATEFUL_CLIENT_OPT = auto()  # clients keep AdamW state across rounds
    SCALED_STEP = auto()  # the server step is not the plain aggregate (server_lr != 1)
    RESETS_ADAPTER = auto()  # each stage starts a fresh adapter
    COMPRESSES = auto()  # what a client sends is a compressed message
    DENSE_UPDATE = auto()  # needs each client's full dense update
    OWN_RANK = auto()  # each client sends only its own rank's LoRA components
    SIMULATED = auto()  # exists only in simulation
    PLAIN_SIMULATION = auto()  # simulated on plain federated runs only (no DP, no secure aggregation)
    FEDERATED_SIMULATION = auto()  # simulated in federated training only (not in the baselines)
    BASELINES = auto()  # the run compares centralized / local / server-only training
    DEPLOYED = auto()  # runs on real owners' machines (Flower)
    WHOLE_BATCH_LOSS = auto()  # the loss is a function of the whole batch, not a sum of per-example terms
    SPLITS_BATCHES = auto()  # computes one batch's gradient as the weighted sum of its micro-batches' gradients
    REPLACES_LOSS = auto()  # trains the clients on a loss of its own instead of the task's
    PARTIAL_UPDATE = auto()  # clients send only some of the trainable tensors


@dataclass(frozen=True)
class Part:
    """A part of fedfm that a config switches on: its key, and what each of its capabilities means for it."""

    key: str  # how the config switches it on, e.g. "strategy.name=median"
    caps: dict[Cap, str] = field(default_factory=dict)  # capability -> phrase (what it does, or what to change)
    fix: str = ""  # what to change so that it runs


@dataclass(frozen=True)
class Rule:
    """Parts with capability ``a`` and parts with capability ``b`` cannot run together."""

    a: Cap
    b: Cap
    message: str  # formatted with a, b (the parts' keys), a_why, b_why (their phrases), a_fix, b_fix

    def explain(self, a: Part, b: Part) -> str:
        return self.message.format(a=a.key, b=b.key, a_why=a.caps[self.a], b_why=b.caps[self.b], a_fix=a.fix,
                                   b_fix=b.fix)


REBASE_FIX = ("{a} re-factorises the adapter in a new basis each round: not with {b} ({b_why}); use "
              "strategy.name=fedavg or fedprox with server_lr=1 and no server_data")

RULES = [
    Rule(Cap.EACH_UPDATE, Cap.SUM_ONLY, "{a} needs individual client updates ({a_why}), but {b} reveals only their "
         "sum; {a_fix}"),
    Rule(Cap.EACH_UPDATE, Cap.NOISED_SUM, "{a} needs individual client updates ({a_why}), but {b} noises only their "
         "sum; {a_fix}"),
    Rule(Cap.BASELINES, Cap.DP_CLAIM, "{a}, which would carry no DP guarantee beside a DP run ({b}); set "
         "compare.methods=[federated] and compare with baselines from a config without dp/dpsgd"),
    Rule(Cap.CLEAR_TENSORS, Cap.CLIENT_PRIVACY, "{a} with {b}: {a_why}, which {b} does not cover; {a_fix}"),
    Rule(Cap.COUPLED_EXAMPLES, Cap.PER_EXAMPLE, "{b} with {a}: {a_why}, so per-example clipping would not bound one "
         "example's influence; {a_fix}"),
    Rule(Cap.NON_EXAMPLE_GRADIENT, Cap.PER_EXAMPLE, "{b} with {a}: {a_why}, so its gradient would bypass {b}'s "
         "per-example clipping; {a_fix}"),
    Rule(Cap.EXAMPLE_ACCOUNTING, Cap.STAGE_SUBSETS, "{a} with {b}: each stage trains on a subset of the shard, so "
         "the sampling rate is higher than the accountant's batch / shard size; turn one of them off"),
    Rule(Cap.FIXED_SAMPLING_ACCOUNTING, Cap.STAGE_OWNER_SAMPLING, "{a} with {b} needs federation.sampling=poisson: "
         "fixed-size sampling draws from the stage's eligible owners, a higher rate than the accountant's fraction of "
         "all clients"),
    Rule(Cap.EXAMPLE_WEIGHTED, Cap.HIDES_COUNTS, "{a} with {b}: Algorithm 2's server update cannot be weighted by "
         "example counts (clients' counts are not released): set server_data.weight"),
    Rule(Cap.STAGE_SCHEDULE, Cap.SERVER_UPDATE, "{a} with {b}: the server's data has no stage schedule; unset "
         "server_data"),
    Rule(Cap.STAGE_SCHEDULE, Cap.LABEL_PRIOR, "{a} with {b}: the label prior changes by stage; turn it off"),
    Rule(Cap.STAGE_SCHEDULE, Cap.CONTROL_VARIATES, "{b} with {a} is not supported"),
    Rule(Cap.RESETS_ADAPTER, Cap.STATEFUL_SERVER_OPT, "{a} with {b}: optimizer state from the last stage would push "
         "the fresh adapter; use fedavg/fedprox, or stage_start=merged"),
    Rule(Cap.RESETS_ADAPTER, Cap.STATEFUL_CLIENT_OPT, "{a} with {b}: optimizer state from the last stage would push "
         "the fresh adapter; turn it off, or stage_start=merged"),
    Rule(Cap.COMPRESSES, Cap.DENSE_UPDATE, "{a} with {b}: {b_why}; {b_fix}"),
    Rule(Cap.OWN_RANK, Cap.COMPRESSES, "{a} cannot be combined with {b}: {a_why}"),
    Rule(Cap.OWN_RANK, Cap.SUM_ONLY, "{a} cannot be combined with {b}: {a_why}"),
    Rule(Cap.OWN_RANK, Cap.NOISED_SUM, "{a} cannot be combined with {b}: {a_why}"),
    Rule(Cap.REPLACES_MEAN, Cap.NOT_MEAN, "{a} replaces the weighted mean; {b} aggregates otherwise ({b_why}): choose "
         "one of them"),
    Rule(Cap.REBASES, Cap.STATEFUL_SERVER_OPT, REBASE_FIX),
    Rule(Cap.REBASES, Cap.SCALED_STEP, REBASE_FIX),
    Rule(Cap.REBASES, Cap.SERVER_UPDATE, REBASE_FIX),
    Rule(Cap.IGNORES_WEIGHTS, Cap.SERVER_UPDATE, "{b} with {a}: {a_why}, so server_data's share would not be what is "
         "logged; use a mean aggregator"),
    Rule(Cap.CONTROL_VARIATES, Cap.SERVER_UPDATE, "{a} with {b}: the server's update carries no control variate"),
    Rule(Cap.FEDERATED_SIMULATION, Cap.BASELINES, "{a} with {b}: {a_why}; set compare.methods=[federated]"),
    Rule(Cap.PLAIN_SIMULATION, Cap.CLIENT_PRIVACY, "{a} with {b}: {a_why}"),
    Rule(Cap.SPLITS_BATCHES, Cap.WHOLE_BATCH_LOSS, "{a} with {b}: {b_why}, so a batch's loss is not the sum of its "
         "micro-batches' losses; unset train.micro_batch_size"),
    Rule(Cap.SPLITS_BATCHES, Cap.PER_EXAMPLE, "{a} with {b}: per-example clipping and noise apply once per optimizer "
         "step of the whole batch; unset train.micro_batch_size"),
    Rule(Cap.REPLACES_LOSS, Cap.REPLACES_LOSS, "{a} with {b}: each replaces the clients' loss; choose one of them"),
    Rule(Cap.PARTIAL_UPDATE, Cap.COMPRESSES, "{a} with {b}: {a_why}, and the compressed message covers every tensor; "
         "{a_fix}"),
    Rule(Cap.PARTIAL_UPDATE, Cap.SUM_ONLY, "{a} with {b}: {a_why}, and the masked sum covers every tensor; {a_fix}"),
    Rule(Cap.SIMULATED, Cap.DEPLOYED, "{a} is not available on {b}: {a_why}"),
]


def check(parts: list[Part]) -> None:
    """ValueError with the first rule two of ``parts`` break."""
    for rule in RULES:
        for a in parts:
            if rule.a not in a.caps:
                continue
            for b in parts:
                if b is not a and rule.b in b.caps:
                    raise ValueError(rule.explain(a, b))
