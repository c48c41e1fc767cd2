"""Keep many sets of trainable tensors (one per client or per group) within a memory budget.

Entries live in memory until the budget is reached; the least recently used ones then spill to
safetensors files on disk and come back on access. Written by hand: no library we use offers a
bounded, disk-backed dict of tensor dicts.
"""

from __future__ import annotations

import shutil
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedfm.rundir import fsync_path
from fedfm.types import ServerState, Weights


def nbytes(w: Weights) -> int:
    return sum(t.numel() * t.element_size() for t in w.values())


class StateStore:
    """A dict-like store of ``Weights`` keyed by str, spilling least-recently-used entries to disk."""

    def __init__(self, memory_bytes: float, spill_dir: Path):
        self.memory_bytes = memory_bytes
        self.spill_dir = Path(spill_dir)
        self._mem: OrderedDict[str, Weights] = OrderedDict()
        self._used = 0
        self._on_disk: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._mem or key in self._on_disk

    def keys(self) -> list[str]:
        return sorted(set(self._mem) | self._on_disk)

    def _path(self, key: str) -> Path:
        return self.spill_dir / f"{key}.safetensors"

    def put(self, key: str, weights: Weights) -> None:
        if key in self._mem:
            self._used -= nbytes(self._mem.pop(key))
        self._mem[key] = weights
        self._used += nbytes(weights)
        self._on_disk.discard(key)
        self._spill()

    def get(self, key: str) -> Weights:
        if key in self._mem:
            self._mem.move_to_end(key)
            return self._mem[key]
        if key not in self._on_disk:
            raise KeyError(key)
        weights = load_file(self._path(key))
        self.put(key, weights)
        return weights

    def _spill(self) -> None:
        # keep the most recent entry in memory even if it alone exceeds the budget
        while self._used > self.memory_bytes and len(self._mem) > 1:
            key, weights = self._mem.popitem(last=False)
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in weights.items()}, str(self._path(key)))
            self._on_disk.add(key)
            self._used -= nbytes(weights)

    @property
    def spilled(self) -> int:
        """How many entries currently live on disk."""
        return len(self._on_disk)


class GroupStates:
    """The server states of a run's groups, held in a ``StateStore``.

    Federated and centralized runs have one group; the local baseline has one per client, whose
    weights (full models, for full fine-tuning) may not all fit in memory: they spill to disk.
    """

    def __init__(self, store: StateStore, count: int, round_: int):
        self.store, self.count, self.round = store, count, round_

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, g: int) -> ServerState:
        flat = self.store.get(f"g{g}")
        weights = {k[2:]: v for k, v in flat.items() if k.startswith("w.")}
        opt = {k[2:]: v for k, v in flat.items() if k.startswith("o.")}
        return ServerState(self.round, weights, opt)

    def __setitem__(self, g: int, state: ServerState) -> None:
        flat = {f"w.{k}": v for k, v in state.weights.items()}
        flat.update({f"o.{k}": v for k, v in state.opt.items()})
        self.store.put(f"g{g}", flat)

    def __iter__(self):
        return (self[g] for g in range(self.count))


class ClientStates:
    """Each simulated client's private state (error-feedback residual, SCAFFOLD control variate), on disk.

    Only sampled clients' states are read, so memory does not grow with the number of clients. Every write
    is a new file tagged with its round (``<client>.<round>.safetensors``, written atomically); a read at
    round r takes the newest version from an earlier round. A run resumed from its checkpoint of round r-1
    therefore reads exactly what the uninterrupted run read, even if the crashed attempt at round r had
    already written newer versions. Older versions than the one read are deleted, so at most two remain.
    """

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self._versions: dict[str, list[int]] | None = None  # client -> rounds on disk (scanned once, then kept)

    def _index(self) -> dict[str, list[int]]:
        if self._versions is None:
            self._versions = {}
            if self.dir.is_dir():
                for p in self.dir.glob("*.safetensors"):
                    client, _, r = p.name[: -len(".safetensors")].rpartition(".")
                    if client and r.isdigit():
                        self._versions.setdefault(client, []).append(int(r))
        return self._versions

    def _path(self, client: str, r: int) -> Path:
        return self.dir / f"{client}.{r}.safetensors"

    def get(self, client: str, round_: int) -> Weights | None:
        """The state client ``client`` saved in the latest round before ``round_`` (None: it has none yet)."""
        earlier = [r for r in self._index().get(client, []) if r < round_]
        return load_file(self._path(client, max(earlier))) if earlier else None

    def put(self, client: str, round_: int, state: Weights) -> None:
        """Save the client's state after round ``round_``, dropping versions older than the one it read."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._path(client, round_)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        fsync_path(tmp)  # durable before the older version it replaces is deleted below
        tmp.replace(path)
        fsync_path(self.dir)
        rounds = self._index().setdefault(client, [])
        if round_ not in rounds:
            rounds.append(round_)
        earlier = [r for r in rounds if r < round_]
        keep = max(earlier) if earlier else None
        for r in [r for r in rounds if r < round_ and r != keep]:
            self._path(client, r).unlink(missing_ok=True)
            rounds.remove(r)

    def discard(self, client: str, round_: int) -> None:
        """Forget what ``client`` saved in round ``round_`` (a round the server skipped): the version it read, which
        ``put`` kept, is again the latest."""
        self._path(client, round_).unlink(missing_ok=True)
        rounds = self._index().get(client, [])
        if round_ in rounds:
            rounds.remove(round_)

    def clients(self) -> int:
        """How many clients have a saved state."""
        return len(self._index())

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob("*.safetensors")) if self.dir.is_dir() else 0


class UpdateSpool:
    """The updates of one round that an aggregator must keep whole (coordinate-wise median, Krum, norm screening,
    LoRA products, secure aggregation's masked vectors), within a memory budget.

    Entries stay in memory until ``memory_bytes`` is reached; later ones go to safetensors files and are read back
    memory-mapped, one tensor at a time (``delta(key)`` is a lazy mapping), so an aggregator that works tensor by
    tensor holds one tensor of each update at once, not whole updates. Nothing comes back into the budget: the spool
    lives for one round, and ``close`` deletes its files. Written by hand: no library we use offers a bounded,
    disk-backed list of tensor dicts readable per tensor (StateStore above reloads whole entries).
    """

    def __init__(self, memory_bytes: float, directory: Path):
        self.memory_bytes, self.dir = memory_bytes, Path(directory)
        self._mem: dict[str, Weights] = {}
        self._disk: dict[str, list[str]] = {}  # key -> tensor names in its file
        self.used = 0  # bytes held in memory
        self.peak = 0

    def __contains__(self, key: str) -> bool:
        return key in self._mem or key in self._disk

    def __len__(self) -> int:
        return len(self._mem) + len(self._disk)

    def _path(self, key: str) -> Path:
        return self.dir / f"{len(self._disk):06d}.safetensors"

    def put(self, key: str, tensors: Weights) -> None:
        """Keep ``tensors`` under ``key`` (a new key: an update is kept once)."""
        if key in self:
            raise KeyError(f"{key!r} is already in the spool")
        size = nbytes(tensors)
        if self.used + size <= self.memory_bytes:
            self._mem[key] = tensors
            self.used += size
            self.peak = max(self.peak, self.used)
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        self._disk[key] = [str(path), *tensors]

    def tensor(self, key: str, name: str) -> torch.Tensor:
        """One tensor of one entry (read-only: a spilled one is a fresh copy, the file mapping closed at once)."""
        if key in self._mem:
            return self._mem[key][name]
        path, *names = self._disk[key]
        if name not in names:
            raise KeyError(name)
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(name).clone()  # the mapped pages are released when the file closes

    def names(self, key: str) -> list[str]:
        return list(self._mem[key]) if key in self._mem else self._disk[key][1:]

    def delta(self, key: str) -> Mapping[str, torch.Tensor]:
        """The entry as a read-only mapping whose tensors are read on access."""
        return _LazyTensors(self, key)

    @property
    def spilled(self) -> int:
        return len(self._disk)

    def close(self) -> None:
        """Forget every entry and delete the spill files."""
        self._mem.clear()
        self._disk.clear()
        self.used = 0
        shutil.rmtree(self.dir, ignore_errors=True)


class _LazyTensors(Mapping):
    """A spool entry seen as a dict of tensors (what aggregators read as ``ClientUpdate.delta``)."""

    def __init__(self, spool: UpdateSpool, key: str):
        self.spool, self.key = spool, key

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.spool.tensor(self.key, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.spool.names(self.key))

    def __len__(self) -> int:
        return len(self.spool.names(self.key))
