"""Where clients run: in this process, on Ray actors, or on the owners' Flower SuperNodes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedfm.config.base import Section
from fedfm.config.rules import Cap, Part


class EngineConfig(Section):
    name: Literal["embedded", "ray", "flower"] = Field(
        "embedded",
        description="Execution engine: embedded (in-process, one client after another), ray (clients in parallel "
        "on Ray actors, one machine or a cluster), flower (owners' SuperNodes behind a Flower SuperLink).",
    )
    state_memory_mb: float = Field(
        1024.0, ge=0, description="Per-client state kept in memory up to this size; the rest spills to disk."
    )
    update_memory_mb: float = Field(
        1024.0, ge=0, description="Updates a round must keep whole (robust aggregators, LoRA products, norm "
        "screening, secure aggregation's masked vectors) stay in memory up to this size; the rest go to disk and are "
        "read back memory-mapped, one tensor at a time. Mean-family aggregation keeps running sums and needs none."
    )
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (None = torch default; ray: per actor).")
    workers: int = Field(2, ge=1, description="ray: actors (each keeps one base model loaded).")
    gpus_per_worker: float = Field(
        0.0, ge=0, description="ray: GPUs each actor reserves (fractional shares one GPU among several actors, e.g. "
        "0.25 = four actors per GPU); 0 = none. Set train.device=auto or cuda with it.",
    )
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
    server_test: str | None = Field(
        None, description="flower: the coordinator's own test file (JSONL in the owner format: {\"text\", \"label\"} "
        "lines), on the SuperLink's machine. The coordinator holds no owner data: without this file, evaluation is "
        "the owners' (the mean over their own test splits, weighted by their sizes).",
    )


def parts(cfg) -> list[Part]:
    return [Part("engine 'flower'", {Cap.DEPLOYED: ""})] if cfg.engine.name == "flower" else []
