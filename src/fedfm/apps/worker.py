"""The owner worker: one long-lived process per owner machine that keeps the owner's App warm across messages.

Flower (1.41) starts a fresh ``flwr-clientapp`` process for every message, so a ClientApp that builds the owner's
App itself reloads the model for each of them (four times per round under secure aggregation). With a worker,
``fedfm deploy supernode`` starts two processes under one supervisor: Flower's SuperNode, which stays the network
(TLS, node authentication, the SuperLink's messages), and this worker, which holds the owner's App for the run —
the base model on the owner's device, the data, the private state. The per-message ClientApp only forwards the
message's content to the worker and relays the reply.

The channel is owner-local: a Unix socket in ``STATE/worker/`` (mode 0700, so no other account can reach it),
authenticated by a token the supervisor draws afresh for each worker it starts (``STATE/worker/token``, 0600). The
framing and the challenge-response on the token are the standard library's ``multiprocessing.connection``
(HMAC; no pickle: every frame is bytes, a JSON header then a Flower ``RecordDict`` in Flower's own protobuf).

Failure handling (never a hang): the supervisor restarts a worker that dies (with a back-off; after five quick
deaths in a row it stops and records the reason), and records each exit in ``STATE/worker/status.json``. A
ClientApp that finds no worker, a stale socket, a worker that refuses its token or one that dies mid-message
fails that message with the reason, which reaches the server as the owner's error for the round. The worker's
private state is the same files as without it (the run's folder under the state directory), so a resumed run and a
secure-aggregation round in progress survive a worker restart.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener, answer_challenge, deliver_challenge
from pathlib import Path

from fedfm.errors import FedFMError

log = logging.getLogger("fedfm")

SOCKET, TOKEN, STATUS, LOG = "worker.sock", "token", "status.json", "worker.log"
QUICK_DEATH_S, MAX_QUICK_DEATHS = 30.0, 5


def worker_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "worker"


def _open_address(path: Path) -> tuple[str, int | None]:
    """``path`` as a Unix socket address, and the descriptor it needs open (None for a short path): a Linux socket
    path has at most 107 bytes, so a longer one is reached through its directory's descriptor (/proc/self/fd/N/name)."""
    if len(os.fsencode(str(path))) < 100:
        return str(path), None
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/{path.name}", fd


@contextmanager
def _address(path: Path):
    addr, fd = _open_address(path)
    try:
        yield addr
    finally:
        if fd is not None:
            os.close(fd)


def _send(conn, header: dict, body: bytes = b"") -> None:
    conn.send_bytes(json.dumps(header).encode())
    conn.send_bytes(body)


def _recv(conn) -> tuple[dict, bytes]:
    header = json.loads(conn.recv_bytes())
    if not isinstance(header, dict):
        raise ValueError("malformed header")
    return header, conn.recv_bytes()


def to_bytes(content) -> bytes:
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).SerializeToString()


def from_bytes(data: bytes):
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    return recorddict_from_proto(ProtoRecordDict.FromString(data))


def read_status(wdir: Path) -> dict:
    try:
        return json.loads((wdir / STATUS).read_text())
    except (OSError, ValueError):
        return {}


def _write_status(wdir: Path, status: dict) -> None:
    from fedfm.rundir import atomic_write_text

    atomic_write_text(wdir / STATUS, json.dumps(status, indent=1))


# --- the worker process -----------------------------------------------------------------------------------
class Worker:
    """Serves one owner: answers forwarded messages with :func:`fedfm.apps.owner_node.answer` on a kept App."""

    def __init__(self, data_dir: Path, state_dir: Path):
        from fedfm.apps.owner_node import Node, OwnerApps

        self.node = Node(Path(data_dir), Path(state_dir))
        self.wdir = worker_dir(state_dir)
        self.apps = OwnerApps()
        self.token = (self.wdir / TOKEN).read_bytes()

    def bind(self) -> Listener:
        """Listen on the socket; a socket file nobody listens on (left by a worker that died) is replaced, one a live
        worker listens on is not."""
        path = self.wdir / SOCKET
        # the descriptor stays open while the listener lives: it unlinks its address when closed
        addr, self._dirfd = _open_address(path)
        if path.exists():
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(addr)
                raise FedFMError(f"another owner worker is listening on {path}: stop it first")
            except (ConnectionRefusedError, FileNotFoundError):
                path.unlink(missing_ok=True)  # stale: its worker is gone
            finally:
                probe.close()
        old = os.umask(0o177)  # the socket file itself: owner only (its folder is 0700 too)
        try:
            return Listener(addr, "AF_UNIX", backlog=16)
        finally:
            os.umask(old)

    def serve(self) -> None:
        listener = self.bind()
        log.info("owner worker %d listening on %s", os.getpid(), self.wdir / SOCKET)
        while True:
            conn = listener.accept()
            threading.Thread(target=self.serve_one, args=(conn,), daemon=True).start()

    def serve_one(self, conn) -> None:
        """One forwarded message: the token first (an unauthenticated peer gets nothing), then the exchange."""
        from fedfm.apps.owner_node import answer, run_config

        try:
            try:
                deliver_challenge(conn, self.token)
                answer_challenge(conn, self.token)
            except (AuthenticationError, EOFError, OSError) as exc:
                log.warning("refused a connection: %s", exc)
                return
            header, body = _recv(conn)
            kind = str(header["kind"])
            try:
                reply = answer(kind, from_bytes(body), header["rc"], self.node, self.apps, header.get("origin"))
                _send(conn, {"ok": True}, to_bytes(reply))
            except Exception as exc:  # noqa: BLE001 - the owner's error goes back to the server as its reply
                log.exception("%s failed", kind)
                _send(conn, {"ok": False, "error": f"{type(exc).__name__}: {exc}" if not isinstance(exc, FedFMError)
                             else str(exc)})
                return
            if kind == "query.hello":  # a run is starting: load its App now, while the server gathers the owners
                threading.Thread(target=self.warm, args=(run_config(header["rc"]),), daemon=True).start()
        except (EOFError, OSError, ValueError, KeyError) as exc:  # the ClientApp went away (Flower gave up on it)
            log.warning("a forwarded message was cut short: %r", exc)
        finally:
            conn.close()

    def warm(self, config: dict) -> None:
        try:
            self.apps.get(config, self.node)
        except Exception:  # noqa: BLE001 - the first training message builds it again and reports the error
            log.exception("could not load the owner's App ahead of the first message")


def worker_main(argv: list[str] | None = None) -> None:
    """``python -m fedfm.apps.worker DATA STATE``: what the supervisor starts."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("state")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = os.environ.get("FEDFM_THREADS")
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    import fedfm.app  # noqa: F401 - the training stack's imports are paid here, before the first message

    Worker(Path(args.data), Path(args.state)).serve()


# --- the ClientApp side -----------------------------------------------------------------------------------
def _connect(wdir: Path, wait_s: float):
    """An authenticated connection to the owner's worker, waiting up to ``wait_s`` for one that is (re)starting."""
    path, deadline, grace = wdir / SOCKET, time.monotonic() + wait_s, 0.0
    while True:
        status = read_status(wdir)
        state = status.get("state")
        if state == "failed":
            raise FedFMError(f"the owner worker is down for good: {status.get('last_exit', {}).get('reason')} "
                             f"(log: {wdir / LOG}); restart the node")
        why = None
        if path.exists():
            try:
                token = (wdir / TOKEN).read_bytes()
                with _address(path) as addr:
                    return Client(addr, "AF_UNIX", authkey=token)
            except AuthenticationError:
                raise FedFMError(f"the owner worker at {path} refused this node's token ({wdir / TOKEN}): it was "
                                 "started by another supervisor, or the token file was replaced") from None
            except (ConnectionRefusedError, FileNotFoundError):
                why = f"a stale socket {path} that no worker listens on"
            except (EOFError, ConnectionResetError):  # it died as this connection reached it
                why = f"the worker at {path} closed the connection"
        else:
            why = f"no worker socket {path}"
        if not status:
            raise FedFMError(f"no owner worker runs for this node ({why}): start the node with "
                             "`fedfm deploy supernode`, which starts its worker")
        if state == "ready":  # the worker just died and its supervisor has not noticed yet: a moment's grace
            grace = grace or time.monotonic() + 3.0
        if state not in ("starting", "restarting", "ready") or time.monotonic() > (
                min(deadline, grace) if state == "ready" else deadline):
            last = status.get("last_exit", {}).get("reason")
            raise FedFMError(f"the owner worker is not answering ({why}; state {state}"
                             + (f", last exit: {last}" if last else "") + ")")
        time.sleep(0.2)


def forward(wdir: Path, kind: str, content, rc: dict, timeout: float, wait_s: float = 120.0,
            origin: dict | None = None):
    """Send one message's content to the owner's worker and return its reply's content (the ClientApp's whole job)."""
    wdir = Path(wdir)
    conn = _connect(wdir, wait_s)
    try:
        _send(conn, {"kind": kind, "rc": dict(rc), "origin": origin or {}}, to_bytes(content))
        deadline = time.monotonic() + timeout
        while not conn.poll(1.0):
            if time.monotonic() > deadline:
                raise FedFMError(f"the owner worker did not answer this {kind} message within {timeout:.0f} s")
        header, body = _recv(conn)
    except (EOFError, ConnectionResetError, BrokenPipeError):
        pid = read_status(wdir).get("pid")
        for _ in range(25):  # the supervisor records the exit within a moment
            status = read_status(wdir)
            if status.get("pid") != pid or status.get("state") != "ready":
                break
            time.sleep(0.2)
        reason = status.get("last_exit", {}).get("reason", "no exit recorded")
        raise FedFMError(f"the owner worker died while answering this {kind} message ({reason}); "
                         f"it is {status.get('state', 'not supervised')}") from None
    finally:
        conn.close()
    if not header.get("ok"):
        raise FedFMError(str(header.get("error", "the owner worker failed")))
    return from_bytes(body)


# --- the supervisor (``fedfm deploy supernode``) --------------------------------------------------------------
def _exit_reason(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with status {rc}"


def _tail(path: Path, lines: int = 8) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4000))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Supervisor:
    """Runs Flower's SuperNode and the owner's worker; restarts the worker when it dies; ends both together."""

    def __init__(self, supernode: list[str], env: dict[str, str], data_dir: Path, state_dir: Path):
        self.supernode_cmd, self.env = supernode, env
        self.data_dir, self.wdir = Path(data_dir), worker_dir(state_dir)
        self.state_dir = Path(state_dir)
        self.worker: subprocess.Popen | None = None
        self.status: dict = {"state": "starting", "restarts": 0}
        self.quick_deaths, self.stopping = 0, False

    def start_worker(self) -> None:
        self.wdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.wdir.chmod(0o700)
        fd = os.open(self.wdir / TOKEN, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:  # a new token for each worker, readable by the owner's account only
            f.write(secrets.token_hex(32).encode())
        logf = open(self.wdir / LOG, "ab")
        self.worker = subprocess.Popen([sys.executable, "-m", "fedfm.apps.worker", str(self.data_dir),
                                        str(self.state_dir)], stdout=logf, stderr=subprocess.STDOUT, env=self.env)
        logf.close()
        self.started = time.monotonic()
        self.status.update(pid=self.worker.pid, started=time.time())
        _write_status(self.wdir, self.status)

    def check_worker(self) -> None:
        """Notice a worker that died: record why, and start another (or give up after repeated quick deaths)."""
        if self.status["state"] == "starting" and (self.wdir / SOCKET).exists():
            self.status["state"] = "ready"
            _write_status(self.wdir, self.status)
        rc = self.worker.poll() if self.worker else None
        if rc is None:
            return
        quick = time.monotonic() - self.started < QUICK_DEATH_S
        self.quick_deaths = self.quick_deaths + 1 if quick else 0
        reason = _exit_reason(rc)
        tail = _tail(self.wdir / LOG)
        self.status["last_exit"] = {"reason": reason, "at": time.time(), "log_tail": tail}
        print(f"owner worker {self.worker.pid} {reason}", file=sys.stderr, flush=True)
        self.worker = None
        (self.wdir / SOCKET).unlink(missing_ok=True)  # its socket, which nobody listens on now
        if self.quick_deaths >= MAX_QUICK_DEATHS:
            self.status.update(state="failed", pid=None)
            self.status["last_exit"]["reason"] = f"{reason}, {self.quick_deaths} times in a row within " \
                                                 f"{QUICK_DEATH_S:.0f} s of starting; last output: {tail[-500:]}"
            _write_status(self.wdir, self.status)
            print(f"owner worker gave up: {self.status['last_exit']['reason']}", file=sys.stderr, flush=True)
            return
        self.status.update(state="restarting", restarts=self.status["restarts"] + 1)
        _write_status(self.wdir, self.status)
        time.sleep(min(30.0, 2.0 ** self.quick_deaths - 1))  # 0 s after a worker that ran a while, then 1, 3, 7, 15 s
        self.status["state"] = "starting"
        self.start_worker()

    def _stop(self, *_: object) -> None:
        self.stopping = True

    def run(self) -> int:
        """Until the SuperNode exits or this process is told to stop; returns the SuperNode's exit status."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self.start_worker()
        node = subprocess.Popen(self.supernode_cmd, env=self.env)
        try:
            while not self.stopping and node.poll() is None:
                self.check_worker()
                time.sleep(0.2)
        finally:
            for p in (node, self.worker):
                if p is not None and p.poll() is None:
                    p.terminate()
            for p in (node, self.worker):
                if p is not None:
                    try:
                        p.wait(20)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
            self.status.update(state="stopped", pid=None)
            _write_status(self.wdir, self.status)
            (self.wdir / SOCKET).unlink(missing_ok=True)
        return 0 if self.stopping else node.returncode


if __name__ == "__main__":
    worker_main()
