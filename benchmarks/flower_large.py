"""Does a message over 2 GB cross the Flower engine? One update of more than 2 GiB, there and back, on loopback.

gRPC refuses single messages over 2 GB; Flower (since 1.20) sends an ``ArrayRecord`` as content-addressed chunks of
``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE`` (5 MiB) pushed and pulled one by one. fedfm's Flower engine carries tensors
as ArrayRecords (``fedfm.engines.flower_engine.to_record`` / ``from_record``), so this checks that path with
fedfm's own record functions: a ServerApp sends one float32 tensor of ``--gib`` GiB to one SuperNode (TLS and node
authentication on, the SuperLink on loopback, started and stopped by ``fedfm.deploy.LocalFederation``); its
ClientApp decodes it with ``from_record``, adds 1 and returns it with ``to_record``; the ServerApp checks every
element of the reply.

    python benchmarks/flower_large.py               # 2.2 GiB each way (needs ~16 GiB of free memory), ~2-4 min
    python benchmarks/flower_large.py --gib 0.05 --out /tmp/fl   # smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import result_header, write_results  # noqa: E402

PYPROJECT = """[project]
name = "fedfm-large-message"
version = "0.1.0"
description = "one update over 2 GB through fedfm's Flower records"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedfm-bench"

[tool.flwr.app.components]
serverapp = "large_app:server"
clientapp = "large_app:client"

[tool.flwr.app.config]
floats = 1
out = ""
"""

APP = '''"""One big tensor through fedfm's Flower records and back, plus one."""
import json
import time
from pathlib import Path

import torch
from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedfm.engines.flower_engine import from_record, payload_bytes, to_record

server = ServerApp()
client = ClientApp()


@client.train()
def train(msg, context):
    w = from_record(msg.content["arrays"])["w"]
    w += 1.0
    return Message(RecordDict({"arrays": to_record({"w": w})}), reply_to=msg)


@server.main()
def main(grid, context):
    rc = context.run_config
    n = int(rc["floats"])
    w = torch.arange(n, dtype=torch.float32).remainder_(1000.0)  # distinct values, exact in float32
    record = to_record({"w": w})
    sent = payload_bytes(RecordDict({"arrays": record}))
    t = time.perf_counter()
    ids = sorted(grid.get_node_ids())
    got = list(grid.send_and_receive([Message(RecordDict({"arrays": record}), ids[0], "train")], timeout=1800))
    seconds = time.perf_counter() - t
    del record
    out = {"floats": n, "bytes_sent": sent, "seconds": seconds, "error": None, "equal": False}
    if got and not got[0].has_error():
        back = from_record(got[0].content["arrays"])["w"]
        out["bytes_back"] = payload_bytes(got[0].content)
        out["equal"] = bool(back.shape == w.shape and torch.equal(back - 1.0, w))
    else:
        out["error"] = str(got[0].error) if got else "no reply"
    Path(str(rc["out"])).write_text(json.dumps(out))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=2.2, help="size of the tensor sent each way, GiB")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    from fedfm import config
    from fedfm.deploy import LocalFederation, submit_app
    from fedfm.owner import export_owners

    root = Path(tempfile.mkdtemp(prefix="fedfm-flower-large-"))
    try:
        cfg = config.load(None, ["data.source=bbc", "data.max_examples=60", "federation.num_clients=1",
                                 "engine.name=flower"])
        owners = export_owners(cfg, root / "owners")[:1]
        app = root / "app"
        app.mkdir()
        (app / "pyproject.toml").write_text(PYPROJECT)
        (app / "large_app.py").write_text(APP)
        floats = int(args.gib * 2**30 / 4)
        result = root / "result.json"
        t0 = time.perf_counter()
        with LocalFederation(root / "fed", owners) as fed:
            status = submit_app(app, {"floats": floats, "out": str(result)}, fed.home, echo=lambda line: None)
        wall = time.perf_counter() - t0
        res = json.loads(result.read_text()) if result.is_file() else {"error": f"no result: {status}"}
        res.update(status=status.get("status"), wall_s=wall)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    command, info, header = result_header("A message over 2 GB through the Flower engine's records",
                                          "benchmarks/flower_large.py")
    ok = res.get("equal") is True
    md = "\n".join(header + [
        "", f"One float32 tensor of {floats:,} numbers ({floats * 4 / 2**30:.2f} GiB) from a ServerApp to one SuperNode "
        "and back (+1 at the client), encoded and decoded with fedfm's `to_record` / `from_record`, over a "
        "loopback SuperLink with TLS and node authentication (flwr's ArrayRecord chunking).", "",
        "| bytes sent | bytes back | round trip, s | every element back +1 | run status |", "|---|---|---|---|---|",
        f"| {res.get('bytes_sent', 0):,} | {res.get('bytes_back', 0):,} | {res.get('seconds', float('nan')):.1f} | "
        f"{ok} | {res.get('status')} {res.get('error') or ''} |"]) + "\n"
    print(md)
    write_results(args.out, "flower_large", md, {"command": command, "machine": info, **res})
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
