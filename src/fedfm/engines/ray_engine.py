"""The Ray engine: clients run in parallel on Ray actors, on this machine or on an existing Ray cluster.

Each actor builds the run's ``App`` once (its own copy of the base model and the data) and then only swaps
trainable state in and out, exactly as the embedded engine does in-process. Client ``i`` always runs on actor
``i mod workers``: per-client protocol state (a secure-aggregation round's secrets) stays where it was created,
and a run's results do not depend on which actor finished first. Replies are gathered in job order, so the
aggregate sums the same floats in the same order as the embedded engine and the same seed gives the same model.

What the actors share with the server is the run directory's ``clients/`` folder (each client's error-feedback
residual or control variate): on a multi-machine cluster it must be on a shared file system.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import replace

import torch

from fedfm.engines.common import Broadcast, check_protocol, received, serialized, train_at_client
from fedfm.errors import ClientDropout, FedFMError
from fedfm.types import ClientTask, ClientUpdate, Weights

log = logging.getLogger("fedfm")

# what every actor process needs: offline model loading, no usage reporting, tokenizers without their own threads
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}


class _Worker:
    """One Ray actor: one App (base model loaded once), running the client functions it is sent."""

    def __init__(self, config: dict, threads: int):
        import torch

        from fedfm.app import App
        from fedfm.config import RunConfig

        torch.set_num_threads(threads)
        cfg = RunConfig.model_validate(config)
        self.app = App(cfg)
        self.context: tuple | None = None

    def ready(self) -> int:
        return os.getpid()

    def _sync(self, context: tuple) -> None:
        """Mirror the server's per-method settings: uplink, the client-state folder, the pooled participant."""
        if context == self.context:
            return
        from fedfm.store import ClientStates

        uplink, states_dir, pooled = context
        self.app.uplink = uplink
        self.app.client_states = ClientStates(states_dir) if states_dir else None
        if pooled is not None and len(self.app.shards) <= pooled:
            if self.app.add_pooled_shard() != pooled:
                raise RuntimeError("the pooled participant's index differs between the server and a Ray actor")
        self.context = context

    def train(self, context: tuple, index: int, task: ClientTask, weights: Weights):
        self._sync(context)
        update = train_at_client(self.app, index, replace(task, weights=weights))
        return serialized(update) if update is not None else None

    def call(self, context: tuple, fn: str, index: int, payload: bytes) -> bytes | None:
        self._sync(context)
        try:
            return bytes(self.app.call(fn, index, payload))
        except ClientDropout:
            return None

    def evaluate(self, context: tuple, index: int, weights: Weights) -> dict[str, float]:
        self._sync(context)
        return self.app.client_evaluate(index, weights)


class RayEngine:
    """Clients in parallel on ``engine.workers`` Ray actors (``engine.address``: an existing cluster)."""

    name = "ray"

    def __init__(self, app):
        cfg = app.cfg.engine
        if not cfg.address:
            # a private local cluster listens on loopback only: Ray turns a 127.0.0.1 node address into the machine's
            # external one unless it runs in its single-machine mode (read from the environment at import, and
            # inherited by the GCS and raylet processes it starts)
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        try:
            import ray
            from ray._private import ray_constants
        except ImportError:  # pragma: no cover - ray is a dependency
            raise FedFMError("engine 'ray' needs the ray package: pip install 'ray==2.60.0'") from None
        if not cfg.address:
            ray_constants.ENABLE_RAY_CLUSTER = False  # in case ray was imported before this engine
        self.app, self.ray = app, ray
        self.workers = cfg.workers
        self.threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.workers)
        os.environ.update({k: v for k, v in WORKER_ENV.items() if k not in os.environ})
        if cfg.gpus_per_worker and not cfg.address:
            if torch.cuda.device_count() == 0:
                raise FedFMError(f"engine.gpus_per_worker={cfg.gpus_per_worker:g}: this machine has no CUDA GPU for "
                                 "a local Ray cluster; set it to 0 or give engine.address of a cluster with GPUs")
        self.started = not ray.is_initialized()
        if self.started:
            options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if cfg.address:
                try:
                    ray.init(address=cfg.address, **options)
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise FedFMError(f"cannot reach the Ray cluster at engine.address={cfg.address}: {exc}") from None
            else:  # a private local cluster, listening on loopback only (Ray counts this machine's GPUs itself)
                ray.init(num_cpus=self.workers * self.threads, object_store_memory=2 * 2**30, **options)
        config = app.cfg.model_dump(mode="json")
        config["engine"] = {**config["engine"], "name": "embedded", "threads": self.threads}
        # the actors' environment is set per actor, so it also holds on a cluster this engine did not start
        env = {"env_vars": {**WORKER_ENV, "OMP_NUM_THREADS": str(self.threads)}}
        # engine.gpus_per_worker: Ray reserves that share of a GPU per actor and sets the actor's CUDA_VISIBLE_DEVICES,
        # so train.device=auto / cuda inside it is the GPU Ray gave it (a fraction lets several actors share one)
        remote = ray.remote(num_cpus=self.threads, num_gpus=cfg.gpus_per_worker, max_concurrency=1)(_Worker)
        self.actors = [remote.options(runtime_env=env).remote(config, self.threads) for _ in range(self.workers)]
        self.timeout, self.result_timeout = cfg.timeout_s, cfg.ray_result_timeout_s
        try:
            self.pids = ray.get([a.ready.remote() for a in self.actors], timeout=self.timeout)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise FedFMError(f"{self.workers} Ray actors of {self.threads} CPUs each did not start within "
                             f"engine.timeout_s={self.timeout:g} s: does the cluster have that many free CPUs? "
                             "(lower engine.workers or engine.threads)") from None
        except Exception as exc:
            self.close()
            raise FedFMError(f"a Ray actor failed to build the run's App: {exc}") from exc

    def close(self) -> None:
        for a in getattr(self, "actors", []):
            self.ray.kill(a)
        self.actors = []
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
            self.started = False

    def _context(self) -> tuple:
        app = self.app
        pooled = next((i for i, s in enumerate(app.shards) if s.name == "pooled"), None)
        states = str(app.client_states.dir.resolve()) if app.client_states is not None else None  # actors' cwd differs
        return (getattr(app, "uplink", True), states, pooled)

    def _actor(self, index: int):
        return self.actors[index % self.workers]

    def _arrivals(self, refs: list) -> Iterator[tuple[int, object]]:
        """(position in ``refs``, result) as each result arrives."""
        ray, pending = self.ray, list(refs)
        where = {r: i for i, r in enumerate(refs)}
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=self.result_timeout)
            if not done:  # a hung actor would otherwise block the run forever, silently (log_to_driver is off)
                raise FedFMError(f"no Ray result for engine.ray_result_timeout_s={self.result_timeout:g} s "
                                 f"({len(pending)} of {len(refs)} jobs outstanding)")
            for r in done:
                try:
                    result = ray.get(r)
                except ray.exceptions.RayTaskError:
                    raise  # the client code's own exception (a data error, ...), re-raised as its type
                except ray.exceptions.RayError as exc:  # an actor died, ran out of memory, lost the object
                    raise FedFMError(f"Ray lost a client's result: {type(exc).__name__}: {exc}") from exc
                yield where[r], result

    def _gather(self, refs: list) -> list:
        """Every result, in job order."""
        out = dict(self._arrivals(refs))
        return [out[i] for i in range(len(refs))]

    def train(self, jobs: list[tuple[int, ClientTask]], downlink: Broadcast) -> Iterator[tuple[int, ClientUpdate | None]]:
        """Every job submitted at once (each actor runs its clients in order); (index, update or None) yielded as
        each result arrives, so the round folds them in while the others still train."""
        context, shared = self._context(), {}
        refs = []
        for index, task in jobs:
            task = downlink.task(task)
            key = id(task.weights)  # the decoded broadcast is put in the object store once, not once per client
            if key not in shared:
                shared[key] = self.ray.put(task.weights)
            refs.append(self._actor(index).train.remote(context, index, replace(task, weights={}), shared[key]))
        for at, result in self._arrivals(refs):
            yield jobs[at][0], received(*result) if result is not None else None

    def call(self, fn: str, jobs: list[tuple[int, bytes]]) -> tuple[dict[int, bytes], int, int]:
        check_protocol(fn)
        context = self._context()
        refs = [self._actor(i).call.remote(context, fn, i, bytes(p)) for i, p in jobs]
        replies = {i: r for (i, _), r in zip(jobs, self._gather(refs)) if r is not None}
        return replies, sum(len(p) for _, p in jobs), sum(len(r) for r in replies.values())

    def evaluate(self, jobs: list[tuple[int, Weights]]) -> list[dict[str, float]]:
        context, shared = self._context(), {}
        refs = []
        for index, weights in jobs:
            if id(weights) not in shared:
                shared[id(weights)] = self.ray.put(weights)
            refs.append(self._actor(index).evaluate.remote(context, index, shared[id(weights)]))
        return self._gather(refs)
