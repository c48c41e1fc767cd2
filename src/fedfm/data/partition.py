"""Split a :class:`TextDataset` into a global test set and per-client train/test shards.

Client shards come from ``flwr_datasets`` partitioners (iid, dirichlet label skew, natural owner
keys) or from seeded Dirichlet sizes (quantity skew). Each step draws from its own seeded stream,
so the global test set depends only on the labels, ``test_fraction`` and the seed: it is the same
for every partition scheme and number of clients, which keeps comparisons fair.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass, field

import numpy as np

from fedfm.config import DataConfig
from fedfm.data.sources import TextDataset
from fedfm.errors import DataError

# Independent random streams per step: default_rng([seed, step]).
_STEP_TEST, _STEP_POOL, _STEP_SIZES, _STEP_CLIENT = 1, 2, 3, 4


@dataclass
class FederatedSplit:
    """Index sets into a TextDataset: one global test set plus train/test indices per client."""

    global_test: np.ndarray
    client_train: list[np.ndarray]
    client_test: list[np.ndarray]
    client_names: list[str]
    server: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # Algorithm 2: server-held data

    def num_clients(self) -> int:
        return len(self.client_train)

    def summary(self, labels: np.ndarray, n_labels: int) -> list[dict]:
        """Per client: ``name``, ``n_train``, ``n_test``, ``label_hist`` (label counts of its train shard)."""
        return [
            {
                "name": name,
                "n_train": len(tr),
                "n_test": len(te),
                "label_hist": np.bincount(labels[tr], minlength=n_labels).astype(int).tolist(),
            }
            for name, tr, te in zip(self.client_names, self.client_train, self.client_test)
        ]


def _stratified_holdout(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Per label, a random ``round(fraction * count)`` of its examples."""
    picked = []
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab)
        k = round(fraction * len(idx))
        picked.append(rng.permutation(idx)[:k])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _quantity_sizes(total: int, num_clients: int, alpha: float, rng: np.random.Generator) -> list[int]:
    """Dirichlet(alpha) shares of ``total``: every client >= 1, summing exactly to ``total``."""
    share = rng.dirichlet(np.full(num_clients, alpha))
    spare = total - num_clients  # one example reserved per client, the rest by share
    raw = share * spare
    sizes = np.floor(raw).astype(np.int64)
    # Largest remainders get the examples lost to flooring, so the sum is exact.
    left = spare - int(sizes.sum())
    sizes[np.argsort(-(raw - sizes), kind="stable")[:left]] += 1
    return [int(s) + 1 for s in sizes]


def _run_partitioner(partitioner, pool_ds) -> list[np.ndarray]:
    """Original-dataset indices of every partition (``num_partitions`` of them)."""
    partitioner.dataset = pool_ds
    # NaturalIdPartitioner prints a tqdm bar to stderr and Dirichlet warns on every resample: keep quiet.
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        n = partitioner.num_partitions
        return [np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64) for i in range(n)]


def split(
    ds: TextDataset, cfg: DataConfig, num_clients: int | None, seed: int, server_fraction: float = 0.0
) -> FederatedSplit:
    """Partition ``ds`` per ``cfg.partition`` over ``num_clients`` clients, deterministically in ``seed``.

    1. global test: stratified random ``cfg.test_fraction``;
    2. remaining pool: a random ``server_fraction`` of it is held by the server (Algorithm 2), the rest
       goes to the clients (iid / dirichlet / natural / quantity / pathological);
    3. each shard -> client train/test by ``cfg.client_test_fraction`` (>= 1 train kept).
    Raises :class:`DataError` when a partitioner fails or a client ends up without training data.
    """
    n = len(ds)
    global_test = _stratified_holdout(ds.labels, cfg.test_fraction, np.random.default_rng([seed, _STEP_TEST]))
    if len(global_test) == 0:
        raise DataError(f"global test set is empty: test_fraction={cfg.test_fraction} of {n} examples rounds to 0")
    pool = np.setdiff1d(np.arange(n, dtype=np.int64), global_test)
    # Shuffle the pool: IidPartitioner and SizePartitioner cut contiguous ranges, and Dirichlet
    # cuts each label's examples in dataset order, so file order (e.g. sorted by label or topic)
    # would otherwise leak into the shards.
    pool = np.random.default_rng([seed, _STEP_POOL]).permutation(pool)
    # the server's share is a uniform random slice of the pool (public or central data, not owner-skewed)
    n_server = round(server_fraction * len(pool))
    server, pool = np.sort(pool[:n_server]), pool[n_server:]
    if server_fraction > 0 and n_server == 0:
        raise DataError(f"server_data.fraction={server_fraction} of {len(pool)} training examples rounds to 0")
    names = _client_names(ds, cfg.partition, num_clients, len(pool))
    shards = _partition(ds, cfg, pool, names, seed)
    client_train, client_test = _train_test(shards, names, cfg, seed, f"({len(pool)} training-pool examples over "
                                            f"{len(names)} clients)")
    return FederatedSplit(
        global_test=global_test, client_train=client_train, client_test=client_test, client_names=names, server=server
    )


def _client_names(ds: TextDataset, method: str, num_clients: int | None, pool_size: int) -> list[str]:
    """One name per client: the natural keys (partition=natural), else client_0 .. client_{k-1}."""
    if method == "natural":
        if ds.keys is None:
            raise DataError(
                f"partition=natural needs owner keys, but dataset {ds.name!r} has none "
                "(set data.key_column, or use partition=iid/dirichlet/quantity)"
            )
        names = sorted({str(k) for k in ds.keys})
        if num_clients is not None and num_clients != len(names):
            raise DataError(
                f"partition=natural found {len(names)} keys but federation.num_clients={num_clients}; "
                f"set federation.num_clients to {len(names)} or null (one client per key)"
            )
        return names
    if num_clients is None:
        raise DataError(f"partition={method} needs federation.num_clients")
    if num_clients > pool_size:
        # Some client must stay empty; IidPartitioner would raise an opaque IndexError here.
        raise DataError(
            f"client client_{num_clients - 1} has no training examples after {method} partitioning "
            f"({pool_size} training-pool examples over {num_clients} clients); {_advice(method)}"
        )
    return [f"client_{i}" for i in range(num_clients)]


def _partition(ds: TextDataset, cfg: DataConfig, pool: np.ndarray, names: list[str], seed: int) -> list[np.ndarray]:
    """Each client's dataset indices, from flwr-datasets' partitioner for ``cfg.partition``."""
    from datasets import Dataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner, IidPartitioner, NaturalIdPartitioner, PathologicalPartitioner, SizePartitioner,
    )

    method, k = cfg.partition, len(names)
    columns = {"label": ds.labels[pool], "idx": pool}
    if ds.keys is not None:
        columns["key"] = [str(x) for x in ds.keys[pool]]
    pool_ds = Dataset.from_dict(columns)
    try:
        if method == "iid":
            return _run_partitioner(IidPartitioner(num_partitions=k), pool_ds)
        if method == "dirichlet":
            part = DirichletPartitioner(num_partitions=k, partition_by="label", alpha=float(cfg.alpha),
                                        min_partition_size=cfg.min_partition_size, self_balancing=False, seed=seed)
            return _run_partitioner(part, pool_ds)
        if method == "natural":
            part = NaturalIdPartitioner(partition_by="key")
            found = _run_partitioner(part, pool_ds)
            # A key whose examples all went to the global test set has no partition: give it an empty shard.
            by_key = {part.partition_id_to_natural_id[i]: idx for i, idx in enumerate(found)}
            return [by_key.get(name, np.empty(0, dtype=np.int64)) for name in names]
        if method == "pathological":  # flwr-datasets' PathologicalPartitioner (McMahan et al. 2017's shards)
            part = PathologicalPartitioner(num_partitions=k, partition_by="label",
                                           num_classes_per_partition=cfg.classes_per_client,
                                           class_assignment_mode="deterministic", seed=seed)
            return _run_partitioner(part, pool_ds)
        if method == "quantity":
            sizes = _quantity_sizes(len(pool), k, cfg.alpha, np.random.default_rng([seed, _STEP_SIZES]))
            # SizePartitioner takes exact sizes (IdToSizeFncPartitioner derives sizes from a function
            # of the client id and dumps the rounding remainder on the last client, so it does not fit).
            # It cuts contiguous ranges, which are random because the pool was shuffled above.
            return _run_partitioner(SizePartitioner(partition_sizes=sizes), pool_ds)
    except ValueError as exc:
        raise DataError(
            f"{method} partitioning of {len(pool)} examples over {k} clients failed ({exc}); {_advice(method)}"
        ) from None
    raise DataError(f"unknown partition {method!r}")  # unreachable through DataConfig validation


def _train_test(shards: list[np.ndarray], names: list[str], cfg: DataConfig, seed: int, where: str):
    """Each shard -> (train, test) by ``cfg.client_test_fraction``; every client keeps at least one train example."""
    rng = np.random.default_rng([seed, _STEP_CLIENT])
    client_train, client_test = [], []
    for name, shard in zip(names, shards):
        shard = rng.permutation(np.sort(shard))  # sort first: independent of partitioner-internal order
        n_test = round(cfg.client_test_fraction * len(shard))
        n_test = min(n_test, max(len(shard) - 1, 0))
        client_test.append(np.sort(shard[:n_test]).astype(np.int64))
        client_train.append(np.sort(shard[n_test:]).astype(np.int64))
        if len(client_train[-1]) == 0:
            raise DataError(f"client {name} has no training examples after {cfg.partition} partitioning {where}; "
                            f"{_advice(cfg.partition)}")
    return client_train, client_test


def _advice(method: str) -> str:
    return {
        "iid": "use fewer clients or more data (raise or unset data.max_examples)",
        "dirichlet": "raise data.alpha, use fewer clients, or lower data.min_partition_size "
        "(keep it >= 1 so that no client is empty)",
        "natural": "that key has too few examples: drop or merge it, or use another partition",
        "quantity": "use fewer clients or more data (raise or unset data.max_examples)",
        "pathological": "use fewer clients or more classes per client (data.classes_per_client), or more data",
    }[method]
