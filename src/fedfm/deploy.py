"""Deploying fedfm across machines on Flower: certificates, node keys, SuperLink/SuperNode processes, job submission.

Everything network-facing is Flower's own (``flower-superlink``, ``flower-supernode``, ``flwr run``); this module
only writes the files those programs need and starts them with fedfm's settings: TLS always on, SuperNode
authentication always on, runtime dependency installation and telemetry off (the machines need no network
beyond the federation's own address).

Hand-written here (no library does it): the small certificate authority. ``cryptography`` does the crypto; the
layout (a CA, one server certificate whose subject alternative names are the SuperLink's host names and IPs)
follows Flower's own ``generate.sh`` example.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import subprocess
import time
from pathlib import Path

from fedfm.errors import FedFMError

# the environment of every Flower process fedfm starts: offline, no telemetry
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def flower_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **FLOWER_ENV, **extra}


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_certificates(out: Path, hosts: list[str], days: int = 365) -> dict[str, Path]:
    """A CA and a SuperLink certificate for ``hosts`` (names or IPs) in ``out``: ca.crt, ca.key, server.pem,
    server.key. The CA certificate is what SuperNodes and `fedfm run` pass as root certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    if (out / "ca.key").exists():
        raise FedFMError(f"{out} already holds a CA (ca.key): refusing to overwrite it")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedfm federation CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    private = dict(encoding=pem, format=serialization.PrivateFormat.PKCS8, encryption_algorithm=serialization.NoEncryption())
    paths = {"ca": out / "ca.crt", "ca_key": out / "ca.key", "cert": out / "server.pem", "key": out / "server.key"}
    _write_private(paths["ca_key"], ca_key.private_bytes(**private))
    _write_private(paths["key"], key.private_bytes(**private))
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["cert"].write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    return paths


def make_node_key(path: Path) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair (ECDSA P-384, OpenSSH format, as Flower expects): ``path`` holds
    the private key (stays on the owner's machine), ``path.pub`` the public key the SuperLink operator registers."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(path)
    if path.exists():
        raise FedFMError(f"{path} already exists: refusing to overwrite a node key")
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
                    + b" fedfm-node\n")
    return path, pub


# --- processes ----------------------------------------------------------------------------------------
def superlink_command(certs: Path, database: Path, host: str = "127.0.0.1", port: int = 9093) -> list[str]:
    """``flower-superlink`` with TLS, SuperNode authentication, a database (so a restarted SuperLink keeps its
    registered nodes and runs) and no runtime dependency installation."""
    certs = Path(certs)
    for name in ("ca.crt", "server.pem", "server.key"):
        if not (certs / name).is_file():
            raise FedFMError(f"{certs / name} is missing: create the certificates with `fedfm deploy certs --out {certs}`")
    certs = certs.resolve()  # the SuperLink hands these paths to its helper processes: absolute
    return ["flower-superlink", "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
            "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--database", str(Path(database).resolve()), "--host", host,
            "--port", str(port)]


def supernode_command(data: Path, superlink: str, root_certificates: Path, key: Path, port: int,
                      state: Path | None = None, worker: bool = False) -> list[str]:
    """``flower-supernode`` for one owner: its private data directory in the node config, its own key, and (with
    ``worker``) the folder of the owner's worker, to which its ClientApps forward every message.

    The owner directory is read first, so a missing or malformed one is reported before the node starts (one
    that disappears later is reported by the node's ClientApp to the server instead)."""
    from fedfm.owner import read_owner

    read_owner(data)
    for path, what in ((root_certificates, "root certificate"), (key, "node key")):
        if not Path(path).is_file():
            raise FedFMError(f"{what} {path} does not exist")
    paths = {"data-dir": Path(data).resolve(), **({"state-dir": Path(state).resolve()} if state else {})}
    if worker:
        from fedfm.apps.worker import worker_dir

        paths["worker-dir"] = worker_dir(Path(state or Path(data) / ".fedfm-state").resolve())
    for path in paths.values():  # Flower parses the node config as TOML: literal strings take any other character
        if "'" in str(path) or "\n" in str(path):
            raise FedFMError(f"{path}: a path with a quote (') or a newline cannot be passed to the SuperNode")
    if "'" in superlink or "\n" in superlink:
        raise FedFMError(f"{superlink!r} is not a HOST:PORT address")
    config = " ".join(f"{k}='{v}'" for k, v in {**paths, "superlink": superlink}.items())
    return ["flower-supernode", "--superlink", superlink, "--root-certificates", str(Path(root_certificates).resolve()),
            "--auth-supernode-private-key", str(Path(key).resolve()), "--node-config", config, "--port", str(port)]


# --- the flwr command line ----------------------------------------------------------------------------
CONNECTION = "fedfm"
PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedfm-job"
version = "0.1.0"
description = "A fedfm run submitted to a Flower federation"
license = "Apache-2.0"
dependencies = []  # fedfm is installed on every machine; nothing is installed at run time

[tool.flwr.app]
publisher = "fedfm"

[tool.flwr.app.components]
serverapp = "fedfm_job:server_app"
clientapp = "fedfm_job:client_app"

[tool.flwr.app.config]
fedfm-config = ""
fedfm-rag = ""
run-dir = ""
resume = false
"""
JOB = '"""fedfm\'s Flower apps: the round loop (ServerApp) and the client code (ClientApp) of the installed fedfm."""\n' \
      "from fedfm.apps import flower\n\n" \
      "server_app = flower.make_server_app()\n" \
      "client_app = flower.make_client_app()\n"
JOB_RAG = JOB.replace("make_server_app()", "make_rag_server_app()")


def flwr_home(home: Path, address: str, root_certificates: Path) -> Path:
    """A private FLWR_HOME whose config.toml names one SuperLink connection (``fedfm``), over TLS."""
    import tomli_w

    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    ca = Path(root_certificates).resolve()
    if not ca.is_file():
        raise FedFMError(f"root certificate {ca} does not exist")
    (home / "config.toml").write_text(tomli_w.dumps(
        {"superlink": {"default": CONNECTION, CONNECTION: {"address": address, "root-certificates": str(ca)}}}))
    return home


def flwr(args: list[str], home: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(["flwr", *args], env=flower_env(FLWR_HOME=str(home)),
                       capture_output=True, text=True, **kw)
    if check and p.returncode:
        raise FedFMError(f"`flwr {' '.join(args)}` failed: {(p.stdout + p.stderr).strip()[-2000:]}")
    return p


def register_node(public_key: Path, home: Path, name: str | None = None) -> str:
    """Add a SuperNode's public key to the SuperLink's allowed nodes (``flwr supernode register``)."""
    if not Path(public_key).is_file():
        raise FedFMError(f"public key {public_key} does not exist")
    args = ["supernode", "register", str(public_key), CONNECTION] + (["--name", name] if name else [])
    p = flwr(args, home, check=False)
    if p.returncode and "already in use" not in p.stdout + p.stderr:
        raise FedFMError(f"registering {public_key} failed: {(p.stdout + p.stderr).strip()[-1000:]}")
    return (p.stdout + p.stderr).strip()


def online_nodes(home: Path) -> int:
    p = flwr(["supernode", "list", CONNECTION, "--format", "json"], home, check=False)
    try:
        return sum(n.get("status") == "online" for n in json.loads(p.stdout)["nodes"])
    except (ValueError, KeyError, TypeError):
        return 0


def submit_app(app_dir: Path, run_config: dict, home: Path, echo=print) -> dict:
    """Submit the Flower app in ``app_dir`` with ``run_config`` overrides; stream its log until the run ends.

    ``flwr run --stream`` exits 0 even when the ServerApp fails, so the run's final status is read back with
    ``flwr list``. Returns the run id, status ('finished:completed' on success) and the status details."""
    import tempfile

    import tomli_w

    with tempfile.TemporaryDirectory(prefix="fedfm-runcfg-") as tmp:
        overrides = Path(tmp) / "run-config.toml"
        overrides.write_text(tomli_w.dumps(run_config))
        p = flwr(["run", str(app_dir), CONNECTION, "--format", "json", "--run-config", str(overrides)], home)
    try:
        run_id = json.loads(p.stdout)["run-id"]
    except (ValueError, KeyError):
        raise FedFMError(f"the SuperLink did not start the run: {p.stdout.strip()[-1000:]}") from None
    echo(f"flower run {run_id} started")
    import threading

    try:
        with subprocess.Popen(["flwr", "log", str(run_id), CONNECTION, "--stream"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=flower_env(FLWR_HOME=str(home))) as logs:
            def pump() -> None:
                for line in logs.stdout:
                    echo(line.rstrip("\n"))

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            while reader.is_alive():  # the stream may outlive its SuperLink (it keeps reconnecting): watch the run
                reader.join(10.0)
                if reader.is_alive():
                    status = run_status(run_id, home)["status"]
                    if str(status).startswith("finished") or status == "unknown":
                        reader.join(5.0)  # the last lines
                        logs.terminate()
                        break
        # the log stream can end before the run does (a dropped connection): wait for the run's final status
        for _ in range(30):
            run = run_status(run_id, home)
            if str(run["status"]).startswith("finished") or run["status"] == "unknown":  # done, or no SuperLink
                return run
            time.sleep(2.0)
        return run
    except KeyboardInterrupt:  # the user stops waiting: stop the run too, so no ServerApp is left writing
        flwr(["stop", str(run_id), CONNECTION], home, check=False)
        raise


def run_status(run_id: str, home: Path) -> dict:
    """A Flower run's status ('running', 'finished:completed', 'finished:failed', ...) and details."""
    try:
        p = flwr(["list", CONNECTION, "--run-id", str(run_id), "--format", "json"], home, check=False, timeout=60)
    except subprocess.TimeoutExpired:
        return {"run_id": run_id, "status": "unknown", "details": "the SuperLink did not answer"}
    try:
        run = json.loads(p.stdout)["runs"][0]
    except (ValueError, KeyError, IndexError):
        return {"run_id": run_id, "status": "unknown", "details": (p.stdout + p.stderr).strip()[-500:]}
    return {"run_id": run_id, "status": run.get("status"), "details": run.get("status-details", "")}


def submit(config: dict, run_dir: Path, home: Path, resume: bool = False, echo=print, rag: dict | None = None) -> dict:
    """Submit a fedfm run (``config``: the resolved RunConfig as JSON data) to ``home``'s SuperLink, or with ``rag``
    a federated-RAG job (``fedfm.rag.remote.rag_job``). The ServerApp writes ``run_dir`` on the SuperLink's
    machine."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fedfm-job-") as tmp:
        app_dir = Path(tmp) / "app"
        app_dir.mkdir()
        (app_dir / "pyproject.toml").write_text(PYPROJECT)
        (app_dir / "fedfm_job.py").write_text(JOB_RAG if rag else JOB)
        run_config = {"fedfm-config": json.dumps(config or {}), "fedfm-rag": json.dumps(rag or {}),
                      "run-dir": str(Path(run_dir).resolve()), "resume": resume}
        return submit_app(app_dir, run_config, home, echo)


# --- a whole federation on this machine (tests, benchmarks, trying it out) -------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalFederation:
    """A SuperLink and one SuperNode per owner directory (each with its owner worker, unless ``worker=False``), all
    on loopback with TLS and node authentication.

    The processes are started through fedfm's own commands (``fedfm deploy superlink|register|supernode``),
    each in its own process group, and stopped here by PID with that group (a Flower program's helpers —
    SuperExec, ServerApp, ClientApp — are in it). Logs go to ``root/logs``."""

    def __init__(self, root: Path, owners: list[Path], threads: int | None = 1, worker: bool = True):
        self.root, self.owners, self.threads, self.worker = Path(root), [Path(o) for o in owners], threads, worker
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    # files
    def prepare(self) -> None:
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        if not (self.root / "certs" / "ca.crt").is_file():
            make_certificates(self.root / "certs", ["127.0.0.1", "localhost"])
        self.ca = self.root / "certs" / "ca.crt"
        for i in range(len(self.owners)):
            if not self.key(i).is_file():
                make_node_key(self.key(i))
        self.home = flwr_home(self.root / "cli", self.address, self.ca)

    def key(self, i: int) -> Path:
        return self.root / "keys" / f"node{i}"

    # processes
    def _start(self, name: str, cmd: list[str], **env: str) -> subprocess.Popen:
        log = open(self.root / "logs" / f"{name}.log", "a")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=flower_env(**env),
                                            start_new_session=True)
        log.close()
        return self.procs[name]

    def start_superlink(self, timeout: float = 60.0) -> None:
        """``fedfm deploy superlink`` (which becomes ``flower-superlink``), waiting until it listens."""
        import time

        cmd = ["fedfm", "deploy", "superlink", "--certs", str(self.root / "certs"), "--database",
               str(self.root / "superlink.db"), "--host", "127.0.0.1", "--port", str(self.port)]
        self._start("superlink", cmd, FLWR_HOME=str(self.root / "superlink-home"))
        t0, log = time.monotonic(), self.root / "logs" / "superlink.log"
        while time.monotonic() - t0 < timeout:
            if self.procs["superlink"].poll() is not None:
                raise FedFMError(f"the SuperLink exited: {log.read_text()[-2000:]}")
            if f"running on https://127.0.0.1:{self.port}" in log.read_text():
                return
            time.sleep(0.3)
        raise FedFMError(f"the SuperLink did not start within {timeout:.0f} s: {log.read_text()[-2000:]}")

    def start_node(self, i: int, key: Path | None = None, name: str | None = None):
        """``fedfm deploy supernode`` for owner ``i`` (which becomes ``flower-supernode``)."""
        state = self.root / "state" / (name or f"node{i}")
        cmd = ["fedfm", "deploy", "supernode", "--data", str(self.owners[i]), "--superlink", self.address,
               "--root-certificates", str(self.ca), "--key", str(key or self.key(i)), "--port", str(free_port()),
               "--state", str(state)] + ([] if self.worker else ["--no-worker"])
        env = {}
        if self.threads:
            cmd += ["--threads", str(self.threads)]
            env["OMP_NUM_THREADS"] = str(self.threads)
        return self._start(name or f"node{i}", cmd, **env)

    def register(self) -> None:
        """``fedfm deploy register`` of every owner's public key."""
        keys = [str(self.key(i).with_name(self.key(i).name + ".pub")) for i in range(len(self.owners))]
        p = subprocess.run(["fedfm", "deploy", "register", *keys, "--federation", self.address,
                            "--root-certificates", str(self.ca)], capture_output=True, text=True, env=flower_env())
        if p.returncode:
            raise FedFMError(f"registering the nodes failed: {(p.stdout + p.stderr)[-2000:]}")

    def wait_online(self, n: int, timeout: float = 90.0) -> None:
        import time

        t0 = time.monotonic()
        while online_nodes(self.home) < n:
            if time.monotonic() - t0 > timeout:
                raise FedFMError(f"fewer than {n} SuperNodes came online within {timeout:.0f} s")
            time.sleep(1.0)

    def start(self) -> "LocalFederation":
        """Everything up, or nothing left running."""
        try:
            self.prepare()
            self.start_superlink()
            self.register()
            for i in range(len(self.owners)):
                self.start_node(i)
            self.wait_online(len(self.owners))
        except BaseException:
            self.close()
            raise
        return self

    def stop(self, name: str, sig: int | None = None, timeout: float = 30.0) -> None:
        """Stop one process (SIGTERM, or ``sig``) and the helpers it started (its process group)."""
        import signal

        p = self.procs.pop(name, None)
        if p is None:
            return
        try:  # the group even if its leader already exited: its helpers (ClientApp, ...) may not have
            os.killpg(p.pid, sig or signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:  # a process that ignores SIGTERM is killed
            self._reap_group(p.pid)
            p.wait(10)
        self._reap_group(p.pid)

    @staticmethod
    def _reap_group(pgid: int) -> None:
        """Kill what is left of a stopped process's group (a ClientApp mid-message, say), and any Flower helper
        that names a dead member as its parent (``--parent-pid``) but left the group."""
        import signal

        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        parents, found = {str(pgid)}, True
        while found:
            found = False
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    args = (proc / "cmdline").read_bytes().split(b"\0")
                    if os.getpgid(int(proc.name)) == pgid or (
                            b"--parent-pid" in args and args[args.index(b"--parent-pid") + 1].decode() in parents):
                        os.kill(int(proc.name), signal.SIGKILL)
                        if proc.name not in parents:
                            parents.add(proc.name)
                            found = True
                except (OSError, IndexError, ValueError):
                    continue

    def close(self) -> None:
        for name in [n for n in self.procs if n != "superlink"] + ["superlink"]:
            self.stop(name)

    def submit(self, config: dict, run_dir: Path, resume: bool = False, echo=print) -> dict:
        return submit(config, run_dir, self.home, resume, echo)

    def __enter__(self) -> "LocalFederation":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
