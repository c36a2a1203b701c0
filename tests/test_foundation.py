"""Config resolution, record reading, atomic writes and the CLI's error contract."""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass

import pytest

from finegrain.cli import main
from finegrain.config import build_config, opt
from finegrain.errors import ConfigError, InputError
from finegrain.io import atomic_write, iter_records, write_jsonl


@dataclass
class Cfg:
    data: str = opt(help="data path")
    lr: float = opt(1e-3, "learning rate")
    epochs: int = opt(1, "epochs")
    loss: str = opt("sequence", "loss", choices=["sequence", "token_mean"])
    fp16: bool = opt(False, "half precision")


def test_config_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 5\nepochs: 3\n")
    cfg = build_config(Cfg, yaml_path=str(y), overrides={"data": "x", "epochs": 7})
    assert (cfg.data, cfg.lr, cfg.epochs, cfg.loss) == ("x", 5.0, 7, "sequence")


@pytest.mark.parametrize("text,field", [("lr: abc\n", "lr"), ("nope: 1\n", "nope"), ("epochs: true\n", "epochs")])
def test_config_bad_yaml_names_field(tmp_path, text, field):
    y = tmp_path / "c.yaml"
    y.write_text(text)
    with pytest.raises(InputError) as e:
        build_config(Cfg, yaml_path=str(y), overrides={"data": "x"})
    assert f"field {field!r}" in str(e.value) and "c.yaml" in str(e.value)


def test_config_missing_and_choices():
    with pytest.raises(ConfigError, match="--data"):
        build_config(Cfg)
    with pytest.raises(ConfigError, match="--loss"):
        build_config(Cfg, overrides={"data": "x", "loss": "bogus"})


def test_iter_records_formats(tmp_path):
    rows = [{"a": 1}, {"a": 2}]
    write_jsonl(tmp_path / "r.jsonl", rows)
    write_jsonl(tmp_path / "r.jsonl.gz", rows)
    (tmp_path / "r.json").write_text(json.dumps({"data": rows}))
    for name in ("r.jsonl", "r.jsonl.gz", "r.json"):
        assert [r for _, r in iter_records(tmp_path / name)] == rows
    with gzip.open(tmp_path / "r.jsonl.gz", "rt") as f:
        assert len(f.read().splitlines()) == 2


def test_iter_records_locates_bad_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(InputError, match=r"bad.jsonl: line 2: invalid JSON"):
        list(iter_records(p))
    p.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(InputError, match="UTF-8"):
        list(iter_records(p))


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    p = tmp_path / "out.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(p) as f:
            f.write("new")
            raise RuntimeError("crash")
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["out.txt"]


def test_cli_help_and_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "train-rm" in capsys.readouterr().out
    assert main([]) == 2


def test_public_names_resolve():
    import finegrain

    for name in finegrain.__all__:
        assert getattr(finegrain, name) is not None, name
    assert callable(finegrain.train_reward_model) and callable(finegrain.train_ppo) and callable(finegrain.run_demo)
