"""Who trains together: the groups of a method, and the seeded sampling of each round.

A group is a set of participants that share one model:

- ``federated``: one group holding every client (the aggregator combines their updates);
- ``centralized``: one group holding a single participant with all clients' training data pooled, seeing the same
  number of examples per round as the federation;
- ``local``: one group per client (each owner alone, its own model);
- ``server``: one group holding the server's own data only (Algorithm 2's data, without the federation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedfm.client import derive_seed, examples_per_round
from fedfm.config import RunConfig
from fedfm.errors import FedFMError

METHODS = ("federated", "centralized", "local", "server")


@dataclass
class Group:
    name: str
    members: list[int]  # participant (shard) indices
    num_examples: int | None = None  # per-participant examples per round (None: from train config)
    batch_size: int | None = None  # per-participant batch size (None: train.batch_size)


def plan_groups(app, method: str) -> list[Group]:
    n = len(app.split.client_names)
    if method == "federated":
        return [Group("global", list(range(n)))]
    if method == "local":
        return [Group(app.shards[i].name, [i]) for i in range(n)]
    if method == "centralized":
        pooled = next((i for i, s in enumerate(app.shards) if s.name == "pooled"), None)
        pooled = app.add_pooled_shard() if pooled is None else pooled
        return [pooled_group(pooled, [len(app.shards[i].train) for i in range(n)], app.cfg)]
    if method == "server":
        if app.server_index is None:
            raise FedFMError("method 'server' needs server data: set server_data.fraction > 0")
        steps = app.cfg.server_data.steps or math.ceil(len(app.shards[app.server_index].train) / app.cfg.train.batch_size)
        return [Group("server", [app.server_index], steps * app.cfg.train.batch_size)]
    raise FedFMError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")


def pooled_group(pooled: int, sizes: list[int], cfg: RunConfig) -> Group:
    """The centralized participant, seeing per round the same budget of examples as a federation of owners with
    ``sizes`` training examples: the expected sampled share of all their work."""
    n = len(sizes)
    examples = max(1, round(num_sampled(n, cfg) / n * sum(examples_per_round(k, cfg.train) for k in sizes)))
    if cfg.compare.centralized == "synchronous":  # data-parallel: one big step per client step
        return Group("pooled", [pooled], examples, cfg.train.batch_size * num_sampled(n, cfg))
    return Group("pooled", [pooled], examples)


def num_sampled(n: int, cfg: RunConfig) -> int:
    # round half up (Python's round() is half-to-even: 0.25 * 10 -> 2 but 0.35 * 10 -> 4)
    return min(n, max(cfg.federation.min_clients, math.floor(cfg.federation.fraction * n + 0.5)))


def sample(group: Group, round_: int, cfg: RunConfig) -> list[int]:
    """Seeded client sampling, a pure function of (seed, round): resumable without saved RNG state.

    'fixed' takes exactly ``num_sampled`` clients; 'poisson' includes each client independently with
    probability ``federation.fraction`` (the count varies from round to round and may be below min_clients).
    """
    if len(group.members) == 1:
        return list(group.members)
    rng = np.random.default_rng(derive_seed(cfg.seed, round_, 0x5A3))
    if cfg.federation.sampling == "poisson":
        keep = rng.random(len(group.members)) < cfg.federation.fraction
        return [m for m, k in zip(group.members, keep) if k]
    k = num_sampled(len(group.members), cfg)
    return sorted(rng.choice(group.members, size=k, replace=False).tolist())


def expected_sampled(n: int, cfg: RunConfig) -> float:
    """Expected clients per round: fraction x n under Poisson sampling, the fixed count otherwise."""
    return cfg.federation.fraction * n if cfg.federation.sampling == "poisson" else float(num_sampled(n, cfg))


def needed(group: Group, cfg: RunConfig) -> int:
    """The fewest valid updates the group's round completes with (federation.min_clients, at most its size)."""
    return min(cfg.federation.min_clients, len(group.members))


def shard_sizes(app, engine, i: int) -> tuple[int, int]:
    """Client ``i``'s (train, test) example counts: as its node reported them on a deployment (the owner's own
    directory), else from the simulated split."""
    reported = getattr(engine, "sizes", {}).get(i)
    return reported if reported is not None else (len(app.shards[i].train), len(app.shards[i].test))
