"""Config resolution, record reading, atomic writes and the CLI's error contract."""
from __future__ import annotations

import contextlib
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


def test_yaml_numbers_in_exponent_notation_without_a_dot_are_numbers(tmp_path):
    """`lr: 1e-5` is a float in YAML 1.2 (and on the command line); PyYAML alone would read the string '1e-5'."""
    from finegrain.config import _parse_mapping

    y = tmp_path / "c.yaml"
    y.write_text("lr: 1e-5\nepochs: 3\nloss: token_mean\n")
    cfg = build_config(Cfg, yaml_path=str(y), overrides={"data": "1e-5x"})
    assert (cfg.lr, cfg.epochs, cfg.loss, cfg.data) == (1e-5, 3, "token_mean", "1e-5x")
    y.write_text("lr: -2E+4\n")
    assert build_config(Cfg, yaml_path=str(y), overrides={"data": "x"}).lr == -2e4
    y.write_text("lr: '1e-5'\n")  # quoted: a string, refused as such
    with pytest.raises(InputError, match="field 'lr': expected a number, got str '1e-5'"):
        build_config(Cfg, yaml_path=str(y), overrides={"data": "x"})
    assert _parse_mapping("lr=3e-4,name=e5") == {"lr": 3e-4, "name": "e5"}


def test_config_missing_and_choices():
    with pytest.raises(ConfigError, match="--data"):
        build_config(Cfg)
    with pytest.raises(ConfigError, match="--loss"):
        build_config(Cfg, overrides={"data": "x", "loss": "bogus"})


@dataclass
class Bounded:
    lr: float = opt(1e-3, "learning rate", gt=0)
    gamma: float = opt(1.0, "discount", ge=0, le=1)
    clip: float | None = opt(None, "clip", gt=0)
    steps: int = opt(1, "steps", ge=1)


@pytest.mark.parametrize("values,message", [
    ({"lr": float("nan")}, "option --lr must be a finite number, got nan"),
    ({"lr": float("inf")}, "option --lr must be a finite number, got inf"),
    ({"lr": 0.0}, "option --lr must be > 0, got 0.0"),
    ({"gamma": 1.5}, "option --gamma must be >= 0 and <= 1, got 1.5"),
    ({"clip": -1}, "option --clip must be > 0, got -1.0"),
    ({"steps": 0}, "option --steps must be >= 1, got 0"),
])
def test_numbers_are_finite_and_within_their_declared_bounds(values, message):
    with pytest.raises(ConfigError) as e:
        build_config(Bounded, overrides=values)
    assert str(e.value) == message
    assert build_config(Bounded, overrides={"clip": None, "gamma": 0, "lr": 5}).lr == 5.0


def test_yaml_numbers_obey_the_same_rule_and_name_the_file(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: .nan\n")
    with pytest.raises(InputError, match=r"c\.yaml: field 'lr': must be a finite number, got nan"):
        build_config(Bounded, yaml_path=str(y))


def test_a_redeclared_field_keeps_the_bounds_of_the_field_it_overrides():
    from finegrain.config import field_bounds
    from finegrain.sft.config import SFTConfig

    assert field_bounds(SFTConfig, "batch_size") == {"ge": 1} and field_bounds(SFTConfig, "lr") == {"gt": 0}
    with pytest.raises(ConfigError, match="option --batch-size must be >= 1, got 0"):
        build_config(SFTConfig, overrides={"data": "d", "output": "o", "from_scratch": True, "batch_size": 0})


def test_a_seed_of_any_accepted_size_plans_the_data_and_a_larger_one_is_refused_in_one_line(tmp_path, capsys):
    """A 19-digit --seed (``$(date +%s%N)``) was accepted and then overflowed torch's 64-bit seed in the micro-batch
    plan with a traceback; now every accepted seed plans, the plan of a small seed is unchanged, and a seed
    torch cannot take is refused as an option out of bounds."""
    import torch

    from finegrain.training import micro_batch_plan

    big = 1_700_000_000_000_000_000
    assert micro_batch_plan(10, 3, 2.0, big) == micro_batch_plan(10, 3, 2.0, big) != micro_batch_plan(10, 3, 2.0, 1)
    assert micro_batch_plan(10, 3, 2.0, 2 ** 64 - 1)[0]
    first = torch.randperm(10, generator=torch.Generator().manual_seed(7 * 100_003)).tolist()
    assert micro_batch_plan(10, 5, 1.0, 7) == [first[:5], first[5:]]
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [{"prompt": "p", "response": "r"}])
    argv = ["sft", "--data", str(data), "--output", str(tmp_path / "o"), "--from-scratch", "--log-with", "none"]
    assert main([*argv, "--seed", str(2 ** 64)]) == 2
    assert capsys.readouterr().err == ("finegrain sft: error: option --seed must be >= 0 and <= 18446744073709551615, "
                                       "got 18446744073709551616\n")


def test_negative_numbers_are_values_and_usage_errors_are_one_line(tmp_path, capsys):
    from finegrain.cli import build_parser

    args = build_parser("ppo").parse_args(["ppo", "--lr", "-1e-3", "--kl-coef", "-2E+1", "--gamma", "-.5",
                                           "--temperature", "-inf", "--steps", "-3"])
    assert (args.lr, args.kl_coef, args.gamma, args.steps) == (-1e-3, -20.0, -0.5, -3) and args.temperature < 0
    for argv, words in [(["--lr", "-1e-3"], "option --lr must be > 0, got -0.001"),
                        (["--lr", "soon"], "argument --lr: invalid float value: 'soon'"),
                        (["--nope"], "unrecognized arguments: --nope")]:
        with pytest.raises(SystemExit) if "option" not in words else contextlib.nullcontext():
            assert main(["train-rm", "--data", "d", "--model", "m", "--output", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("finegrain train-rm: error: ") and words in err, err


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
