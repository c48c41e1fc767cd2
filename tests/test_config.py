"""Tests of fedfm.config (YAML + --set overrides -> validated RunConfig) and of the CLI's error path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from fedfm import config as C
from fedfm.config import RunConfig
from fedfm.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# --- defaults, file, overrides -----------------------------------------------------------------


def test_defaults_load():
    cfg = C.load()
    assert isinstance(cfg, RunConfig)
    assert cfg == RunConfig()
    assert (cfg.name, cfg.seed, cfg.rounds, cfg.task) == ("run", 0, 5, "classification")
    assert cfg.data.source == "tweets" and cfg.data.partition == "dirichlet"
    assert cfg.strategy.name == "fedavg" and cfg.strategy.server_lr == 1.0
    assert cfg.train.max_grad_norm == 1.0 and cfg.train.schedule == "cosine"
    assert cfg.compare.methods == ["federated", "centralized", "local"]


def test_yaml_file_and_overrides(tmp_path):
    p = write(
        tmp_path,
        "name: exp\nrounds: 3\nstrategy:\n  name: fedprox\n  prox_mu: 0.1\ntrain:\n  lr: 0.001\n",
    )
    cfg = C.load(p)
    assert (cfg.name, cfg.rounds, cfg.strategy.name, cfg.strategy.prox_mu, cfg.train.lr) == ("exp", 3, "fedprox", 0.1, 0.001)
    cfg = C.load(
        p,
        [
            "rounds=7",  # int
            "train.lr=0.25",  # float
            "train.max_grad_norm=null",  # null -> None
            "compare.methods=[federated, local]",  # list
            "federation.fraction=0.5",
            "strategy.name=fedadam",  # overrides the file
            "peft.options.r=4",  # creates keys inside a free-form dict
        ],
    )
    assert cfg.rounds == 7 and isinstance(cfg.rounds, int)
    assert cfg.train.lr == 0.25 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_grad_norm is None
    assert cfg.compare.methods == ["federated", "local"]
    assert cfg.federation.fraction == 0.5
    assert cfg.strategy.name == "fedadam"
    assert cfg.strategy.prox_mu == 0.1  # untouched file value kept
    assert cfg.peft.options == {"r": 4}
    assert cfg.name == "exp"


def test_parse_override_types():
    assert C.parse_override("rounds=7") == (["rounds"], 7)
    assert C.parse_override("train.lr=0.5") == (["train", "lr"], 0.5)
    assert C.parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert C.parse_override("a=null") == (["a"], None)
    assert C.parse_override("a=") == (["a"], "")
    assert C.parse_override("name=a=b") == (["name"], "a=b")  # only the first '=' splits


def test_override_scientific_notation_on_typed_field():
    # PyYAML reads '1e-3' as a string; the typed float field still ends up 0.001
    assert C.load(None, ["train.lr=1e-3"]).train.lr == pytest.approx(1e-3)


def test_override_scientific_notation_is_a_float():
    assert C.load(None, ["peft.options.lora_dropout=1e-3"]).peft.options["lora_dropout"] == pytest.approx(1e-3)


def test_malformed_override_without_equals():
    with pytest.raises(ConfigError, match="train.lr"):
        C.load(None, ["train.lr"])


def test_override_into_a_scalar_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="'rounds' is not a section"):
        C.load(write(tmp_path, "rounds: 3\n"), ["rounds.x=1"])


def test_override_invalid_yaml_value():
    with pytest.raises(ConfigError, match="not valid YAML"):
        C.load(None, ["compare.methods=[local,"])


# --- unknown keys and bad values -----------------------------------------------------------------


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError) as exc:
        C.load(write(tmp_path, "rounds: 2\nbogus: 1\n"))
    msg = str(exc.value)
    assert "'bogus'" in msg
    # the valid top-level keys are listed
    for key in ("compare", "data", "engine", "eval", "federation", "model", "name", "peft", "rounds", "seed", "strategy", "train"):
        assert key in msg


def test_unknown_key_in_section(tmp_path):
    with pytest.raises(ConfigError) as exc:
        C.load(write(tmp_path, "train:\n  learning_rate: 0.1\n"))
    msg = str(exc.value)
    assert "train.learning_rate" in msg
    valid = msg.split("valid keys here:")[1]
    names = [k.strip() for k in valid.split(",")]
    assert names == sorted(C.TrainConfig.model_fields)  # exactly the train section's keys


def test_unknown_key_via_override():
    with pytest.raises(ConfigError, match=r"strategy\.mu.*valid keys here:.*prox_mu"):
        C.load(None, ["strategy.mu=0.1"])


def test_invalid_literal_names_key_choices_and_value():
    with pytest.raises(ConfigError) as exc:
        C.load(None, ["strategy.name=fedsgd"])
    msg = str(exc.value)
    assert "strategy.name" in msg
    assert "fedsgd" in msg
    for choice in ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        assert choice in msg


def test_invalid_literal_in_list():
    with pytest.raises(ConfigError) as exc:
        C.load(None, ["compare.methods=[federated, solo]"])
    msg = str(exc.value)
    assert "compare.methods" in msg and "solo" in msg and "centralized" in msg


def test_out_of_range_value():
    with pytest.raises(ConfigError, match=r"federation\.fraction.*1\.5"):
        C.load(None, ["federation.fraction=1.5"])


def test_csv_source_without_path():
    with pytest.raises(ConfigError, match="data.path is required"):
        C.load(None, ["data.source=csv"])
    cfg = C.load(None, ["data.source=csv", "data.path=x.csv"])
    assert cfg.data.path == "x.csv"


def test_num_clients_required_unless_natural():
    with pytest.raises(ConfigError, match="num_clients"):
        C.load(None, ["federation.num_clients=null"])
    assert C.load(None, ["federation.num_clients=null", "data.partition=natural"]).federation.num_clients is None


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        C.load(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml(tmp_path, text):
    with pytest.raises(ConfigError, match="mapping"):
        C.load(write(tmp_path, text))


def test_invalid_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        C.load(write(tmp_path, "rounds: [1, 2\n"))


def test_empty_file_is_defaults(tmp_path):
    assert C.load(write(tmp_path, "")) == RunConfig()


def test_assignment_is_validated():
    cfg = RunConfig()
    with pytest.raises(ValidationError):
        cfg.train.batch_size = 0


# --- save / load ---------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    cfg = C.load(
        None,
        [
            "name=rt",
            "rounds=4",
            "strategy.name=fedyogi",
            "strategy.tau=0.01",
            "train.max_grad_norm=null",
            "train.local_steps=3",
            "peft.method=ia3",
            "peft.options.target_modules=[query, value]",
            "compare.methods=[local]",
            "data.source=jsonl",
            "data.path=/tmp/x.jsonl",
        ],
    )
    p = tmp_path / "saved.yaml"
    C.save(cfg, p)
    back = C.load(p)
    assert back == cfg
    assert back.to_dict() == cfg.to_dict()


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_run_bad_config_exits_2_with_one_error_line(tmp_path):
    from fedfm.cli import app

    p = write(tmp_path, "rounds: 2\ntrain:\n  bogus_key: 1\n")
    result = CliRunner().invoke(app, ["run", str(p), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:")
    assert "train.bogus_key" in lines[0] and "valid keys here" in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()  # nothing was created


def test_cli_run_bad_override_exits_2(tmp_path):
    from fedfm.cli import app

    p = write(tmp_path, "rounds: 2\n")
    result = CliRunner().invoke(app, ["run", str(p), "--set", "strategy.name=nope"])
    assert result.exit_code == 2
    assert result.output.count("error:") == 1
    assert "strategy.name" in result.output


def test_causal_lm_config_errors_name_the_fix():
    from fedfm import config as config_mod
    from fedfm.errors import ConfigError

    with pytest.raises(ConfigError, match="set task=causal_lm"):
        config_mod.load(None, ["data.source=shakespeare"])
    with pytest.raises(ConfigError, match="needs model.tokenizer"):
        config_mod.load(None, ["task=causal_lm", "data.source=austen", "model.source=scratch"])
    with pytest.raises(ConfigError, match="server_data.fraction > 0"):
        config_mod.load(None, ["server_data.steps=3"])
    with pytest.raises(ConfigError, match="server_data.when"):
        config_mod.load(None, ["server_data.when=during"])
    cfg = config_mod.load(None, ["strategy.name=diloco", "server_data.fraction=0.02", "server_data.steps=4"])
    assert cfg.strategy.name == "diloco" and cfg.server_data.active


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("configs/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_passes_validation(path):
    # the README's ready configs must load as they are (a federated RAG config has its own schema)
    from fedfm.rag import config as rag_config

    if "collection" in yaml.safe_load(path.read_text()):
        rag_config.load(path)
    else:
        C.load(path)
