"""Seeded runs before and after a refactor: do they end with the same weights, bit for bit?

Runs a fixed set of seeded cases through the public API only (``fedfm.config.load``, ``fedfm.server``,
``fedfm.rundir.RunDir``), so the same script runs on any version of fedfm, and keeps the final checkpoint of
every case (every group: the local baseline has one per owner):

    python benchmarks/equivalence.py --save DIR          # on the old code: keep its final states in DIR
    python benchmarks/equivalence.py --against DIR       # on the new code: compare with them, write the table

The ``resume`` case is interrupted by a real process exit right after the checkpoint of round 1, then resumed in
this process. ``--quick`` runs the smoke-sized cases only (what the test suite runs, against nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
SMOKE = str(ROOT / "configs" / "smoke.yaml")
DEMO = str(ROOT / "configs" / "demo_tweets_lora.yaml")

# name -> (config, overrides, how): how = compare | run | resume
CASES: dict[str, tuple[str, list[str], str]] = {
    "smoke_compare": (SMOKE, ["compare.methods=[federated,centralized,local]"], "compare"),
    "resume": (SMOKE, ["rounds=3"], "resume"),
    "dp_secagg": (SMOKE, ["dp.mode=distributed", "secagg.enabled=true", "dp.seeded_noise=true", "dp.clip_norm=0.5",
                          "dp.noise_multiplier=0.3", "federation.min_clients=2", "compare.methods=[federated]"], "run"),
    "dp_central": (SMOKE, ["dp.mode=central", "dp.seeded_noise=true", "dp.adaptive_clip=true", "dp.clip_count_stddev=1.0",
                           "compare.methods=[federated]"], "run"),
    "compressed": (SMOKE, ["compression.up=[topk,int8]", "compression.topk_fraction=0.1"], "run"),
    "fedadam": (SMOKE, ["strategy.name=fedadam", "strategy.server_lr=0.01"], "run"),
    "median": (SMOKE, ["strategy.name=median"], "run"),
    "scaffold": (SMOKE, ["strategy.name=scaffold"], "run"),
    "algorithm2": (SMOKE, ["server_data.fraction=0.1", "server_data.steps=2"], "run"),
    "hetlora": (SMOKE, ["federation.lora_ranks=[2,8]", "strategy.lora_aggregation=hetlora"], "run"),
    "demo_compare": (DEMO, [], "compare"),
}
QUICK = ["dp_secagg", "compressed"]  # the smoke-sized cases that run fastest (the suite runs them)


def final_states(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every group's final weights and server state, flattened into one dict (``g<i>/w/...``, ``g<i>/opt/...``)."""
    from fedfm.rundir import RunDir

    checkpoint, _ = RunDir(run_dir).load_checkpoint()
    out = {}
    for g, st in enumerate(checkpoint):
        out.update({f"g{g}/w/{k}": v for k, v in st.weights.items()})
        # secrets drawn from the OS differ between any two runs: not part of the comparison
        out.update({f"g{g}/opt/{k}": v for k, v in st.opt.items() if "noise_secret" not in k})
    return out


_CRASH = """
import os, sys
from fedfm import config, server
from fedfm.rundir import RunDir
save = RunDir.save_checkpoint
def save_then_exit(self, states, meta):
    save(self, states, meta)
    if states[0].round == 1:
        os._exit(3)  # a power cut right after the checkpoint of round 1
RunDir.save_checkpoint = save_then_exit
server.run(config.load(sys.argv[1], sys.argv[3:]), run_dir=sys.argv[2])
"""


def run_case(name: str, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Run one case; its final states, one entry per method."""
    from fedfm import config, server
    from fedfm.app import App

    path, sets, how = CASES[name]
    cfg = config.load(path, [*sets, f"output_dir={out}", f"name={name}"])
    if how == "compare":
        server.compare(cfg)
        return {m: final_states(out / name / m) for m in cfg.compare.methods}
    run_dir = out / name
    if how == "resume":
        args = [sys.executable, "-c", _CRASH, path, str(run_dir), *sets, f"output_dir={out}", f"name={name}"]
        code = subprocess.run(args, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, check=False).returncode
        if code != 3:
            raise RuntimeError(f"the interrupted run exited with {code}, not the simulated power cut")
        server.resume(App(cfg), run_dir)
    else:
        server.run(cfg, run_dir=run_dir)
    return {"federated": final_states(run_dir)}


def compare_states(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict:
    """Bitwise equality, or the largest absolute and relative differences."""
    if old.keys() != new.keys():
        return {"bitwise": False, "note": f"tensor names differ: {sorted(old.keys() ^ new.keys())[:4]}"}
    diff = max((float((old[k].double() - new[k].double()).abs().max()) for k in old if old[k].numel()), default=0.0)
    scale = max((float(old[k].double().abs().max()) for k in old if old[k].numel()), default=0.0)
    return {"bitwise": all(torch.equal(old[k], new[k]) for k in old), "max_abs_diff": diff,
            "max_abs_value": scale}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--save", type=Path, help="keep the final states here (run on the old code)")
    ap.add_argument("--against", type=Path, help="compare with the final states kept here (run on the new code)")
    ap.add_argument("--cases", nargs="*", default=None, help=f"subset of: {', '.join(CASES)}")
    ap.add_argument("--quick", action="store_true", help=f"smoke-sized cases only ({', '.join(QUICK)})")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "equivalence.md")
    args = ap.parse_args()
    names = args.cases or (QUICK if args.quick else list(CASES))
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedfm-equiv-") as tmp:
        for name in names:
            t0 = time.perf_counter()
            states = run_case(name, Path(tmp))
            took = time.perf_counter() - t0
            for method, st in states.items():
                if args.save:
                    args.save.mkdir(parents=True, exist_ok=True)
                    save_file({k: v.contiguous() for k, v in st.items()}, str(args.save / f"{name}.{method}.safetensors"))
                row = {"case": name, "method": method, "seconds": round(took, 1), "tensors": len(st)}
                if args.against:
                    row.update(compare_states(load_file(str(args.against / f"{name}.{method}.safetensors")), st))
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.against:
        write_table(rows, args)


def write_table(rows: list[dict], args) -> None:
    from machine import result_header  # benchmarks/machine.py

    _, _, lines = result_header("Seeded runs before and after the round-pipeline refactor", "benchmarks/equivalence.py")
    lines += ["", "The saved states came from `--save DIR` on the code before the refactor.", "",
              "| case | method | bit for bit | max abs difference | max abs value |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['method']} | {'yes' if r.get('bitwise') else 'no'} | "
                     f"{r.get('max_abs_diff', float('nan')):.3g} | {r.get('max_abs_value', float('nan')):.3g} |")
    args.out.write_text("\n".join(lines) + "\n")
    (args.out.with_suffix(".json")).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
