"""The owner worker (``fedfm.apps.worker``) and its supervisor, without a Flower federation: the supervisor here
runs a stand-in for ``flower-supernode`` (a sleeping Python process, since these tests are about the worker), and
messages are forwarded exactly as the node's ClientApp forwards them (``forward``). A real federation with workers
runs in tests/test_flower.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, RecordDict

from fedfm.apps.worker import SOCKET, TOKEN, forward, read_status, worker_dir
from fedfm.errors import FedFMError
from fedfm.owner import export_owners

from test_e2e import tiny

SUPERVISE = """
import sys
from pathlib import Path
from fedfm.apps.worker import Supervisor
standin = [sys.executable, "-c", "import time; time.sleep(3600)"]  # in place of flower-supernode
sys.exit(Supervisor(standin, dict(__import__("os").environ), Path(sys.argv[1]), Path(sys.argv[2])).run())
"""


def wait_for(what, condition, timeout: float = 120.0):
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker")
    cfg = tiny(root / "runs")
    return cfg, export_owners(cfg, root / "owners")[1]


@pytest.fixture
def supervised(owner, tmp_path):
    """A supervisor (and its worker) for owner 1, in its own process group; stopped by PID at the end."""
    cfg, data = owner
    state = tmp_path / "state-of-an-owner-whose-path-is-long-enough-to-need-the-directory-descriptor-route"
    env = {**os.environ, "FEDFM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", SUPERVISE, str(data), str(state)], env=env, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wdir = worker_dir(state)
    try:
        wait_for("the worker to listen", lambda: read_status(wdir).get("state") == "ready")
        yield cfg, wdir, p
    finally:
        try:
            os.killpg(p.pid, signal.SIGTERM)  # the group: the supervisor, its worker and the stand-in
        except ProcessLookupError:  # already stopped by the test
            pass
        p.wait(60)


def hello(cfg, wdir, **kw) -> dict:
    rc = {"fedfm-config": json.dumps(cfg.model_dump(mode="json"))}
    content = RecordDict({"hello": ConfigRecord({"num_clients": cfg.federation.num_clients})})
    return dict(forward(wdir, "query.hello", content, rc, timeout=60, **kw)["owner"])


def test_worker_answers_rejects_bad_tokens_and_comes_back_after_being_killed(supervised, monkeypatch):
    cfg, wdir, _ = supervised
    assert len(os.fsencode(str(wdir / SOCKET))) > 107  # reached through /proc/self/fd (a socket path's limit)
    assert wdir.stat().st_mode & 0o777 == 0o700 and (wdir / TOKEN).stat().st_mode & 0o777 == 0o600
    assert hello(cfg, wdir)["index"] == 1  # the owner exported second

    # a peer without the token learns nothing; the worker goes on serving
    monkeypatch.chdir(wdir)  # a short relative address to the same socket
    with pytest.raises(AuthenticationError):
        Client(SOCKET, "AF_UNIX", authkey=b"not the token")
    token = (wdir / TOKEN).read_bytes()
    (wdir / TOKEN).write_bytes(b"0" * 64)  # a token file replaced behind the worker's back
    with pytest.raises(FedFMError, match="refused this node's token"):
        hello(cfg, wdir)
    (wdir / TOKEN).write_bytes(token)
    assert hello(cfg, wdir)["name"] == "client_1"

    # killed: the supervisor records why and starts another, with a new token; the next message waits for it
    pid = read_status(wdir)["pid"]
    os.kill(pid, signal.SIGKILL)
    assert hello(cfg, wdir)["index"] == 1
    status = read_status(wdir)
    assert status["pid"] != pid and status["restarts"] == 1
    assert status["last_exit"]["reason"] == "killed by signal SIGKILL"
    assert (wdir / TOKEN).read_bytes() != token


def test_worker_killed_mid_message_is_reported_not_waited_for(supervised):
    cfg, wdir, _ = supervised
    rc = {"fedfm-config": json.dumps(cfg.model_dump(mode="json"))}
    # an evaluate message makes the worker build the owner's App (seconds); the worker dies while it does
    pid, out = read_status(wdir)["pid"], {}

    def send():
        try:
            forward(wdir, "evaluate", RecordDict({"fedfm": ConfigRecord({"index": 1})}), rc, timeout=120)
        except FedFMError as exc:
            out["error"] = str(exc)

    t = threading.Thread(target=send)
    t0 = time.monotonic()
    t.start()
    time.sleep(1.0)
    os.kill(pid, signal.SIGKILL)
    t.join(60)
    assert not t.is_alive() and time.monotonic() - t0 < 30  # reported within seconds, never the 120 s timeout
    assert "died while answering this evaluate message (killed by signal SIGKILL)" in out["error"], out


def test_stale_socket_and_missing_worker_are_named(owner, tmp_path):
    cfg, _ = owner
    wdir = tmp_path / "state" / "worker"
    wdir.mkdir(parents=True)
    with pytest.raises(FedFMError, match="no owner worker runs for this node .*fedfm deploy supernode"):
        hello(cfg, wdir)
    # a socket file left by a worker that died with its machine: nobody listens on it
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(wdir / SOCKET))
    s.close()
    (wdir / TOKEN).write_bytes(b"t")
    (wdir / "status.json").write_text(json.dumps({"state": "stopped"}))
    with pytest.raises(FedFMError, match="stale socket .* that no worker listens on"):
        hello(cfg, wdir)
    # a worker started on that folder replaces the stale socket and serves
    from fedfm.apps.worker import Worker

    w = Worker(owner[1], wdir.parent)
    listener = w.bind()
    try:
        threading.Thread(target=lambda: w.serve_one(listener.accept()), daemon=True).start()
        (wdir / "status.json").write_text(json.dumps({"state": "ready"}))
        assert hello(cfg, wdir)["index"] == 1
        # and a second worker on the same folder is refused while the first listens
        with pytest.raises(FedFMError, match="another owner worker is listening"):
            Worker(owner[1], wdir.parent).bind()
    finally:
        listener.close()


def test_supervisor_stops_its_worker_with_it(supervised):
    _, wdir, p = supervised
    pid = read_status(wdir)["pid"]
    p.send_signal(signal.SIGTERM)  # the supervisor alone, not its group: it must stop the worker itself
    assert p.wait(60) == 0
    wait_for("the worker to exit", lambda: not Path(f"/proc/{pid}").exists() or
             Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", timeout=30)
    assert read_status(wdir)["state"] == "stopped" and not (wdir / SOCKET).exists()
