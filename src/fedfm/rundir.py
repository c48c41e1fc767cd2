"""The run directory: the unit of truth of a run.

```
<run_dir>/
  config.yaml          resolved config
  status.json          running | complete | incomplete (+ reason, last round, method)
  metrics.jsonl        one record per completed round
  checkpoints/LATEST   name of the newest complete checkpoint (replaced atomically)
  checkpoints/round-NNNN/state-g<group>.safetensors, meta.json
  final/               model or adapter in Hugging Face format (written at the end)
  summary.json, report.html, plots/
```
A checkpoint directory is written under a temporary name and renamed into place, then ``LATEST`` is
replaced atomically: a crash at any moment leaves the previous checkpoint intact and selected.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from safetensors.torch import load_file, save_file

from fedfm import config as config_mod
from fedfm.config import RunConfig
from fedfm.errors import FedFMError
from fedfm.types import ServerState


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to disk (a rename is durable only once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    # --- creation and status ------------------------------------------------------------------
    def create(self, cfg: RunConfig, method: str) -> None:
        """Make a fresh run directory; refuse to touch an existing one (use --resume instead)."""
        if self.path.exists() and any(self.path.iterdir()):
            raise FedFMError(f"run directory {self.path} already exists: pass --resume {self.path} or choose another name")
        self.path.mkdir(parents=True, exist_ok=True)
        config_mod.save(cfg, self.path / "config.yaml")
        (self.path / "metrics.jsonl").touch()
        self.set_status("running", method, 0)

    def load_config(self) -> RunConfig:
        if not (self.path / "config.yaml").is_file():
            raise FedFMError(f"{self.path} is not a fedfm run directory (no config.yaml)")
        return config_mod.load(self.path / "config.yaml")

    def set_status(self, status: str, method: str, round_: int, reason: str | None = None) -> None:
        record = {"status": status, "reason": reason, "round": round_, "method": method}
        atomic_write_text(self.path / "status.json", json.dumps(record))

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "status.json").read_text())
        except (OSError, ValueError):
            raise FedFMError(f"{self.path} has no readable status.json") from None

    # --- metrics ------------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def metrics(self) -> list[dict[str, Any]]:
        lines = (self.path / "metrics.jsonl").read_text().splitlines()
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut short by a crash
                break
        return out

    def truncate_metrics(self, last_round: int) -> list[dict[str, Any]]:
        """Drop records of rounds after the checkpoint being resumed from; return the kept ones."""
        kept = [m for m in self.metrics() if m["round"] <= last_round]
        atomic_write_text(self.path / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in kept))
        return kept

    # --- checkpoints --------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.path / "checkpoints"

    def save_checkpoint(self, states: Sequence[ServerState], meta: dict[str, Any]) -> None:
        """Atomically write the state of every group (one for federated/centralized, one per client for local).

        One safetensors file per group, written one group at a time, so groups that live on disk (see
        ``fedfm.store.GroupStates``) are never all in memory at once. Every file and directory is flushed to
        disk before ``LATEST`` names the new checkpoint and the old one is deleted, so a power loss leaves
        one complete checkpoint, not a ``LATEST`` pointing at empty files.
        """
        round_ = 0  # taken from the states as they are written (GroupStates loads each group lazily)
        self.ckpt_dir.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.ckpt_dir, prefix=".round-"))
        for g, st in enumerate(states):
            round_ = st.round
            tensors = {f"w/{k}": v.contiguous() for k, v in st.weights.items()}
            tensors.update({f"opt/{k}": v.contiguous() for k, v in st.opt.items()})
            save_file(tensors, str(tmp / f"state-g{g}.safetensors"))
            fsync_path(tmp / f"state-g{g}.safetensors")
        (tmp / "meta.json").write_text(json.dumps({**meta, "round": round_, "groups": len(states)}))
        fsync_path(tmp / "meta.json")
        fsync_path(tmp)
        name = f"round-{round_:04d}"
        final = self.ckpt_dir / name
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_path(self.ckpt_dir)
        atomic_write_text(self.ckpt_dir / "LATEST", name)
        for old in self.ckpt_dir.iterdir():  # keep only the newest complete checkpoint
            if old.name not in (name, "LATEST"):
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)

    def load_checkpoint(self) -> tuple["CheckpointStates", dict[str, Any]] | None:
        """The newest complete checkpoint as a lazy sequence of group states (each read on access)."""
        latest = self.ckpt_dir / "LATEST"
        if not latest.is_file():
            return None
        ck = self.ckpt_dir / latest.read_text().strip()
        meta = json.loads((ck / "meta.json").read_text())
        return CheckpointStates(ck, meta["groups"], meta["round"]), meta


class CheckpointStates:
    """Read-only sequence of the group states in one checkpoint directory, loaded one at a time."""

    def __init__(self, path: Path, count: int, round_: int):
        self.path, self.count, self.round = path, count, round_

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, g: int) -> ServerState:
        if not 0 <= g < self.count:
            raise IndexError(g)
        tensors = load_file(str(self.path / f"state-g{g}.safetensors"))
        weights = {k[2:]: v for k, v in tensors.items() if k.startswith("w/")}
        opt = {k[4:]: v for k, v in tensors.items() if k.startswith("opt/")}
        return ServerState(self.round, weights, opt)

    def __iter__(self):
        return (self[g] for g in range(self.count))
