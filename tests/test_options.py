"""The one option system: shared option groups, every verb built from config.py, the README's commands parse.

Every ``finegrain ...`` line in a code block of README.md (and of examples/*/README.md) is parsed by
the real parser and, where it names no ``--config`` file, built into its verb's config, so a renamed
or dropped flag fails here before it fails a reader.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from finegrain import config as fg_config
from finegrain.cli import COMMANDS, build_parser, main
from finegrain.config import build_config, config_from_args, load_yaml
from finegrain.errors import ConfigError, InputError

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "finegrain"
GROUPS = [fg_config.ModelOptions, fg_config.TrainerModelOptions, fg_config.PrecisionOptions,
          fg_config.TrainerPrecisionOptions, fg_config.LoggingOptions]
SHARED = {name for g in GROUPS for name in vars(g)["__annotations__"]}


def verb_configs() -> dict[str, type]:
    """verb (``annotate ACTION`` for annotate's actions) -> its config class."""
    out = {}
    for verb, (module, _) in COMMANDS.items():
        mod = importlib.import_module(module)
        if verb == "annotate":
            out.update({f"annotate {a}": cls for a, (cls, _, _) in mod.ACTIONS.items()})
        else:
            out[verb] = mod.run.config_class
    return out


# ---------------------------------------------------------------- the shared option groups
def test_every_verb_is_built_from_a_config_class():
    configs = verb_configs()
    assert set(configs) >= {"convert", "sft", "train-rm", "eval-rm", "ppo", "show-rewards", "demo", "annotate serve"}
    assert all(dataclasses.is_dataclass(c) for c in configs.values())


def test_shared_options_are_declared_once_in_config_py():
    """No module but config.py declares a field of a shared group (an ``opt(...)`` field of that name)."""
    where = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                            and item.target.id in SHARED and isinstance(item.value, ast.Call)):
                        where.append(f"{path.relative_to(SRC)}:{node.name}.{item.target.id}")
    assert sorted(where) == sorted(f"config.py:{g.__name__}.{n}" for g in GROUPS for n in vars(g)["__annotations__"])


@pytest.mark.parametrize("name", sorted(SHARED))
def test_a_shared_option_has_one_help_text_choices_and_default_in_every_verb(name):
    seen = {}
    for verb, cls in verb_configs().items():
        for f in dataclasses.fields(cls):
            if f.name == name:
                seen[verb] = (f.metadata["help"], repr(f.metadata["choices"]), f.default)
    assert len(seen) >= 2 and len(set(seen.values())) == 1, seen


def test_the_verbs_take_the_groups_they_load_models_with():
    configs = verb_configs()
    for verb in ("sft", "train-rm", "ppo"):
        assert issubclass(configs[verb], (fg_config.TrainerModelOptions)), verb
        assert issubclass(configs[verb], fg_config.TrainerPrecisionOptions), verb
        assert issubclass(configs[verb], fg_config.LoggingOptions), verb
    assert issubclass(configs["eval-rm"], fg_config.ModelOptions) and issubclass(configs["eval-rm"],
                                                                                 fg_config.PrecisionOptions)
    assert issubclass(configs["show-rewards"], fg_config.ModelOptions)


def test_help_lists_the_groups_under_their_headings(capsys):
    with pytest.raises(SystemExit):
        main(["ppo", "--help"])
    out = capsys.readouterr().out
    heads = [out.index(f"\n{t}:\n") for t in ("options", "model loading", "precision", "logging")]
    at = {flag: out.index(f"  {flag}", heads[0]) for flag in ("--policy", "--trust-remote-code", "--dtype", "--log-with")}
    assert heads == sorted(heads)
    assert at["--policy"] < heads[1] < at["--trust-remote-code"] < heads[2] < at["--dtype"] < heads[3] < at["--log-with"]


@pytest.mark.parametrize("value", ["auto", "none", "tensorboard", "tensorboard,wandb", " wandb , tensorboard "])
def test_log_with_takes_auto_none_or_a_list_of_trackers_in_every_trainer(value):
    for cls, required in ((verb_configs()["ppo"], {"policy": "p", "reward_model": "r", "reward_mode": "token",
                                                   "prompts": "q", "output": "o"}),
                          (verb_configs()["sft"], {"data": "d", "output": "o", "from_scratch": True})):
        assert build_config(cls, dict(required, log_with=value)).log_with == value


@pytest.mark.parametrize("value,words", [("tensorbored", "unknown tracker 'tensorbored'"),
                                         ("auto,wandb", "give auto, none, or a comma-separated list"),
                                         ("wandb,", "give auto, none, or a comma-separated list")])
def test_log_with_refuses_unknown_trackers(value, words):
    with pytest.raises(ConfigError, match=words):
        build_config(verb_configs()["sft"], {"data": "d", "output": "o", "from_scratch": True, "log_with": value})


def test_the_dtype_choices_are_one_set():
    for verb, cls in verb_configs().items():
        for f in dataclasses.fields(cls):
            if f.name == "dtype":
                assert f.metadata["choices"] == list(fg_config.DTYPES), verb


# ---------------------------------------------------------------- the layers
def _imports(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    parts = ("finegrain",) + path.relative_to(SRC).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def test_no_stage_imports_the_cli():
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                 if p.relative_to(SRC).as_posix() not in ("cli.py", "__main__.py") and "finegrain.cli" in _imports(p)]
    assert offenders == []


def test_parsing_any_verb_imports_no_torch():
    code = ("import sys\nfrom finegrain.cli import COMMANDS, build_parser\n"
            "for verb in COMMANDS:\n    build_parser(verb)\n"
            "import finegrain.rm.losses\n"
            "heavy = [m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- loss names
def test_loss_names_come_from_rm_losses():
    from finegrain.rm.config import TrainRMConfig
    from finegrain.rm.losses import LOSSES

    (loss,) = [f for f in dataclasses.fields(TrainRMConfig) if f.name == "loss"]
    assert loss.metadata["choices"] == list(LOSSES) and loss.default in LOSSES
    assert all(f"{name}: {spec.help}" in loss.metadata["help"] for name, spec in LOSSES.items())
    base = {"data": "d", "model": "m", "output": "o"}
    assert {n: build_config(TrainRMConfig, dict(base, loss=n)).kind for n in LOSSES} == {
        n: spec.kind for n, spec in LOSSES.items()}
    with pytest.raises(ConfigError, match="--label-weight adds the label term to token_mean or token_edit"):
        build_config(TrainRMConfig, dict(base, loss="token_label", label_weight=1.0))


def test_every_loss_trains_through_its_table_entry():
    import torch

    from finegrain.rm.losses import LOSSES, sequence_loss, token_edit_loss, token_mean_loss

    g = torch.Generator().manual_seed(0)
    out, resp = torch.randn(4, 5, generator=g), torch.tensor([[0, 1, 1, 1, 0]] * 4)
    u1 = torch.tensor([[0, 1, 0, 0, 0], [0, 0, 1, 1, 0]] * 2)
    assert torch.equal(LOSSES["sequence"].pair_term(out[:, 0], resp, u1, 2), sequence_loss(out[:2, 0], out[2:, 0]))
    assert torch.equal(LOSSES["token_mean"].pair_term(out, resp, u1, 2),
                       token_mean_loss(out[:2], resp[:2], out[2:], resp[2:]))
    assert torch.equal(LOSSES["token_edit"].pair_term(out, resp, u1, 2),
                       token_edit_loss(out[:2], resp[:2], u1[:2], out[2:], resp[2:], u1[2:]))
    assert LOSSES["token_label"].pair_term is None and LOSSES["token_label"].labels


# ---------------------------------------------------------------- convert, from the same system
def _convert_cfg(argv: list[str]):
    args = build_parser("convert").parse_args(["convert", *argv])
    return config_from_args(verb_configs()["convert"], args)


def test_convert_flags_positional_and_yaml_keys(tmp_path):
    cfg = _convert_cfg(["--from", "qa-feedback", "in.json", "--output", "out", "--skip-invalid"])
    assert (cfg.source, cfg.input, cfg.output, cfg.skip_invalid, cfg.qa_prompt) == (
        "qa-feedback", "in.json", "out", True, "question+passages")
    assert cfg.source_options() == {"qa_prompt_style": "question+passages"}
    y = tmp_path / "c.yaml"
    y.write_text("from: hh\ninput: a.jsonl\noutput: o\nskip-invalid: true\nqa_prompt: question\n")
    cfg = _convert_cfg(["--config", str(y), "--output", "o2"])
    assert (cfg.source, cfg.input, cfg.output, cfg.skip_invalid, cfg.qa_prompt) == ("hh", "a.jsonl", "o2", True,
                                                                                   "question")
    assert cfg.source_options() == {}
    y.write_text("source: hh\n")
    with pytest.raises(InputError, match=r"field 'source': unknown option \(known: from, input, output, qa_prompt"):
        _convert_cfg(["--config", str(y)])


@pytest.mark.parametrize("argv,message", [
    (["x.jsonl", "--output", "o"], "missing required option --from"),
    (["--from", "hh", "--output", "o"], "missing required option INPUT"),
    (["--from", "hh", "x.jsonl"], "missing required option --output"),
    (["--from", "hh", "", "--output", "o"], "missing required option INPUT"),
])
def test_convert_names_what_is_missing(argv, message, capsys):
    assert main(["convert", *argv]) == 2
    assert capsys.readouterr().err == f"finegrain convert: error: {message}\n"


def test_annotate_add_annotator_takes_its_name_as_argument_or_flag():
    cls = verb_configs()["annotate add-annotator"]
    for argv in (["ann-1", "--db", "a.sqlite"], ["--name", "ann-1", "--db", "a.sqlite"]):
        args = build_parser("annotate").parse_args(["annotate", "add-annotator", *argv])
        assert config_from_args(cls, args).name == "ann-1"


# ---------------------------------------------------------------- the README's commands
def _command_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, arguments) of each ``finegrain ...`` command in the code blocks of a markdown file.

    Continuation lines (a trailing backslash) are joined; commands with ``...`` or shell variables are left out.
    """
    out, block, start, pending = [], False, 0, ""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            block, pending = not block, ""
            continue
        if not block:
            continue
        start = start if pending else number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text, pending = pending + line, ""
        try:
            words = shlex.split(text, comments=True)
        except ValueError:
            continue
        if "finegrain" not in words or "..." in words or any("$" in w for w in words):
            continue
        i = words.index("finegrain")
        if i == 0 or words[i - 1] == "-m":
            out.append((start, shlex.join(words[i + 1:])))
    return out


DOCS = [ROOT / "README.md", *sorted((ROOT / "examples").glob("*/README.md"))]
COMMAND_LINES = [pytest.param(c, id=f"{p.relative_to(ROOT).as_posix()}:{n}") for p in DOCS for n, c in _command_lines(p)]


def test_the_readme_has_commands_of_every_verb():
    verbs = {shlex.split(c)[0] for n, c in _command_lines(ROOT / "README.md")}
    assert verbs >= set(COMMANDS) and len(COMMAND_LINES) >= 40


@pytest.mark.parametrize("command", COMMAND_LINES)
def test_a_documented_command_parses_and_builds_its_config(command):
    argv = shlex.split(command)
    parser = build_parser(argv[0])
    args, unknown = parser.parse_known_args(argv)
    assert not unknown, f"unknown arguments {unknown}"
    if getattr(args, "config", None):
        if not (ROOT / args.config).is_file():
            return  # a YAML file of the reader's: the flags parsed
        args.config = str(ROOT / args.config)
    cls = verb_configs()[argv[0] if argv[0] != "annotate" else f"annotate {argv[1]}"]
    config_from_args(cls, args)


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "examples").glob("*/*.yaml")
                                        if p.parent.name != "accelerate"))
def test_an_example_config_file_builds(path):
    verb = "ppo" if Path(path).name.startswith("ppo") else "train-rm"
    cls = verb_configs()[verb]
    keys = {k.replace("-", "_") for k in load_yaml(str(ROOT / path))}
    required = {f.name: "x" for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in keys}
    if "reward_mode" in required:
        required["reward_mode"] = "token"
    build_config(cls, yaml_path=str(ROOT / path), overrides=required)


# ---------------------------------------------------------------- numbers out of range
# options where any real number means something (a reward threshold on the model's own scale)
ANY_REAL = {"flaw_threshold"}
# the fewest values that make each verb's config valid, beside its required fields
VALID_BASE = {"convert": {"source": "hh"}, "edit": {"backend": "sandbox"}, "generate": {"output": "o.jsonl"},
              "ppo": {"reward_mode": "token"}, "sft": {"model": "m"}, "winrate": {"judge": "sandbox"}}


def _valid_values(verb: str, cls: type) -> dict:
    hints = __import__("typing").get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            tp, _ = fg_config._base_type(hints[f.name])
            values[f.name] = {int: 1, float: 1.0, bool: False}.get(tp, "x.jsonl")
    return values | VALID_BASE.get(verb, {})


@pytest.mark.parametrize("verb", sorted(verb_configs()))
def test_every_numeric_option_refuses_a_negative_value(verb):
    """A count, size, rate, seed or duration below zero is refused with a ConfigError naming the option,
    whether by the field's declared bounds or by the verb's own checks (never a traceback mid-run)."""
    cls = verb_configs()[verb]
    hints = __import__("typing").get_type_hints(cls)
    base = _valid_values(verb, cls)
    build_config(cls, dict(base))  # the base itself is valid
    accepted = []
    for f in dataclasses.fields(cls):
        tp, _ = fg_config._base_type(hints[f.name])
        if tp not in (int, float) or f.metadata.get("choices") or f.name in ANY_REAL:
            continue
        try:
            build_config(cls, {**base, f.name: tp(-1)})
        except ConfigError:
            continue
        accepted.append(f.name)
    assert not accepted, f"{verb} accepts -1 for {accepted}"


def test_every_prompt_template_option_needs_the_prompt_placeholder():
    """A template without ``{prompt}`` would give every record the same prompt: each verb with one refuses it."""
    with_template = []
    for verb, cls in sorted(verb_configs().items()):
        base = _valid_values(verb, cls)
        for name in ("template", "prompt_template"):
            if name not in {f.name for f in dataclasses.fields(cls)}:
                continue
            with_template.append(verb)
            flag = "--" + name.replace("_", "-")
            with pytest.raises(ConfigError, match=rf"{flag} 'Q: ' has no \{{prompt\}}"):
                build_config(cls, {**base, name: "Q: "})
            assert getattr(build_config(cls, {**base, name: "Q: {prompt}\nA:"}), name) == "Q: {prompt}\nA:"
    assert {"generate", "ppo", "sft", "train-rm"} <= set(with_template)
