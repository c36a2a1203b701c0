"""The bad-input corpus through every verb: unreadable files, bad numbers, damaged checkpoints, stale outputs.

Each kind runs the real command line in-process and must give exit code 2, ONE line on stderr
(``finegrain VERB: error: ...``, no traceback) and leave what an earlier run wrote byte for
byte as it was. ``test_bad_input.py`` holds the kinds of bad records; this file the kinds of
bad files, flags and run directories (see ``CORPUS`` below; the two lists together are the
project's bad-input corpus).
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import CORPUS as TEXTS, make_tiny_model
from finegrain.cli import main
from finegrain.models import save_checkpoint

NOT_PARQUET = b"PAR1 this file is not parquet at all PAR1"
DEEP_LINE = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"


def _parquet_bytes() -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["a", "b"], "chosen": ["x", "y"], "rejected": ["z", "w"]}), buf)
    return buf.getvalue()


def _gzip_bytes() -> bytes:
    import gzip

    return gzip.compress(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n' * 200)


class Planted:
    """A pickle whose unpickling would create a file: proves a tampered checkpoint is refused, not run."""

    marker = ""

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# ----------------------------------------------------------------------------- the world the cases run in
@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny policy and token RM (shared tokenizer), good data files, and finished runs with checkpoints."""
    w = tmp_path_factory.mktemp("world")
    tok = tiny_tokenizer
    save_checkpoint(w / "policy", make_tiny_model(tok, "causal", n_positions=64), tok, {"kind": "policy"})
    save_checkpoint(w / "rm", make_tiny_model(tok, "token", seed=1, n_positions=64), tok, {"kind": "token"})
    rows = [{"id": f"p{i}", "prompt": f"Question {i}?", "chosen": TEXTS[i % 8], "rejected": TEXTS[(i + 3) % 8],
             "edited": TEXTS[(i + 3) % 8].replace("the", "a", 1) + " Thanks."} for i in range(16)]
    (w / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (w / "sft.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["chosen"]}) + "\n"
                                         for r in rows))
    (w / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows[:4]))
    for name, argv in RUNS.items():  # finished runs whose checkpoints the resume cases damage
        assert main(fill(argv, w, w / f"run-{name}")) == 0, name
    return w


TRAIN = "--log-with none --max-length 48 --batch-size 8 --save-every 1 --eval-fraction 0"
PPO_RUN = ("ppo --policy {w}/policy --reward-model {w}/rm --reward-mode token --prompts {w}/prompts.jsonl "
           "--output {o} --steps 2 --batch-size 2 --ppo-epochs 1 --max-new-tokens 4 --save-every 1 --log-with none "
           "--lr-schedule constant")  # constant: a resume may extend --steps
RUNS = {
    "rm": f"train-rm --data {{w}}/pairs.jsonl --model {{w}}/policy --output {{o}} --loss token_edit {TRAIN}",
    "sft": f"sft --data {{w}}/sft.jsonl --model {{w}}/policy --output {{o}} {TRAIN}",
    "ppo": PPO_RUN,
}


def fill(argv: str, w: Path, o: Path, t: Path | None = None) -> list[str]:
    """The argument list of a template: {w} the world, {o} the output, {t} the case's own directory."""
    return [a.format(w=w, o=o, t=t) for a in argv.split()]


# ----------------------------------------------------------------------------- the corpus
@dataclass
class Case:
    """One kind of bad input: the command (a template, see :func:`fill`), the files it reads, what the line says.

    ``run``: a finished run (``rm``, ``sft``, ``ppo``) copied to the output directory first, then
    ``damage``d; otherwise the output directory holds files an earlier run wrote. Either way every
    file there must be byte-identical afterwards.
    """

    kind: str
    argv: str
    words: str
    files: dict[str, bytes] = field(default_factory=dict)
    run: str | None = None
    damage: Callable[[Path], None] | None = None


def newest(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step-*"))[-1]


def truncate(name: str) -> Callable[[Path], None]:
    def cut(run: Path) -> None:
        f = newest(run) / name
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return cut


def plant_pickle(name: str) -> Callable[[Path], None]:
    def plant(run: Path) -> None:
        Planted.marker = str(run.parent / "PAYLOAD-RAN")
        (newest(run) / name).write_bytes(pickle.dumps(Planted()))
    return plant


def write(name: str, text: str) -> Callable[[Path], None]:
    return lambda run: (newest(run) / name).write_text(text)


def legacy_layout(run: Path) -> None:
    """The newest checkpoint as ppo wrote it before issue 16: ppo_state.json, accelerate's random states."""
    ckpt = newest(run)
    (ckpt / "state.json").rename(ckpt / "ppo_state.json")
    (ckpt / "rng_0.pt").rename(ckpt / "random_states_0.pkl")


def stale_checkpoints(state_file: str, step_dir: str) -> Callable[[Path], None]:
    """Another run's checkpoints and a 286-line metrics.jsonl in the output directory."""
    def plant(out: Path) -> None:
        (out / "checkpoints" / step_dir).mkdir(parents=True)
        (out / "checkpoints" / step_dir / state_file).write_text('{"step": 286}')
        (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in range(1, 287)))
    return plant


RM = "train-rm --data {t}/bad --model {w}/policy --output {o} --log-with none"
BAD = "{t}/bad"
PPO = ("ppo --policy {w}/policy --reward-model {w}/rm --reward-mode token --prompts {w}/prompts.jsonl --output {o} "
       "--steps 1 --max-new-tokens 4 --log-with none")
GOOD_RM = "train-rm --data {w}/pairs.jsonl --model {w}/policy --output {o} --log-with none"
GOOD_SFT = "sft --data {w}/sft.jsonl --model {w}/policy --output {o} --log-with none"
CORPUS: list[Case] = [
    # 1. files that cannot be read, in every verb that reads data
    Case("convert: .parquet that is not parquet", "convert --from hh {t}/bad.parquet --output {o}",
         "bad.parquet: not a readable parquet file", {"bad.parquet": NOT_PARQUET}),
    Case("train-rm: .parquet that is not parquet", RM.replace(BAD, "{t}/bad.parquet"),
         "bad.parquet: not a readable parquet file", {"bad.parquet": NOT_PARQUET}),
    Case("eval-rm: .parquet that is not parquet",
         "eval-rm --model {w}/rm --data {t}/bad.parquet --output {o}/eval.json",
         "bad.parquet: not a readable parquet file", {"bad.parquet": NOT_PARQUET}),
    Case("edit: .parquet that is not parquet",
         "edit --backend sandbox --model oracle --data {t}/bad.parquet --output {o}/edited.jsonl",
         "bad.parquet: not a readable parquet file", {"bad.parquet": NOT_PARQUET}),
    Case("ppo: .parquet prompts that are not parquet", PPO.replace("{w}/prompts.jsonl", "{t}/bad.parquet"),
         "bad.parquet: not a readable parquet file", {"bad.parquet": NOT_PARQUET}),
    Case("sft: .parquet that is not parquet", "sft --data {t}/bad.parquet --model {w}/policy --output {o}",
         "bad.parquet: not a readable parquet file", {"bad.parquet": NOT_PARQUET}),
    Case("generate: .parquet that is not parquet",
         "generate --model {w}/policy --prompts {t}/bad.parquet --output {o}/outputs.json",
         "bad.parquet: not a readable parquet file", {"bad.parquet": NOT_PARQUET}),
    Case("parquet cut in half", RM.replace(BAD, "{t}/cut.parquet"), "cut.parquet: not a readable parquet file",
         {"cut.parquet": _parquet_bytes()[:200]}),
    Case("JSON line nested too deeply", "convert --from hh {t}/deep.jsonl --output {o}",
         "deep.jsonl: line 1: JSON nested too deeply", {"deep.jsonl": DEEP_LINE}),
    Case(".json file nested too deeply", RM.replace(BAD, "{t}/deep.json"), "deep.json: JSON nested too deeply",
         {"deep.json": b"[" + DEEP_LINE.strip() + b"]"}),
    Case("truncated .jsonl.gz", "eval-rm --model {w}/rm --data {t}/cut.jsonl.gz --output {o}/eval.json",
         "cut.jsonl.gz: a corrupt or truncated gzip file", {"cut.jsonl.gz": _gzip_bytes()[:40]}),
    Case("corrupt .jsonl.gz", "sft --data {t}/bad.jsonl.gz --model {w}/policy --output {o}",
         "bad.jsonl.gz: a corrupt or truncated gzip file", {"bad.jsonl.gz": _gzip_bytes()[:12] + b"\x00junk" * 30}),
    Case("a directory named .jsonl", RM.replace(BAD, "{t}/dir.jsonl"), "dir.jsonl: cannot read file",
         {"dir.jsonl/x": b""}),
    # 4. values JSON does not have, which could not be written back
    Case("NaN in a kept extra field",
         "edit --backend sandbox --model oracle --data {t}/nan.jsonl --output {o}/edited.jsonl",
         "nan.jsonl: line 2: field 'meta': holds NaN, which is not JSON",
         {"nan.jsonl": b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
                       b'{"prompt": "q", "chosen": "a", "rejected": "b", "meta": {"score": NaN}}\n'}),
    Case("Infinity in a .json record", "convert --from alpacafarm {t}/af.json --output {o}",
         "af.json: index 0: field 'preference': holds Infinity",
         {"af.json": b'[{"instruction": "i", "input": "", "output_1": "a", "output_2": "b", "preference": Infinity}]'}),
    Case("number too large for a float", PPO.replace("{w}/prompts.jsonl", "{t}/big.jsonl"),
         "big.jsonl: line 1: field 'weight': holds Infinity", {"big.jsonl": b'{"prompt": "p", "weight": 1e999}\n'}),
    # 2. numeric flags: one rule for finite numbers, declared bounds per option
    Case("--lr nan", GOOD_RM + " --lr nan", "option --lr must be a finite number, got nan"),
    Case("--lr inf", GOOD_SFT + " --lr inf", "option --lr must be a finite number, got inf"),
    Case("--lr -1e-3 (a negative number as a value)", GOOD_RM + " --lr -1e-3", "option --lr must be > 0, got -0.001"),
    Case("ppo --lr nan", PPO + " --lr nan", "option --lr must be a finite number, got nan"),
    Case("ppo --param-dtype bf16 without bf16 autocast", PPO + " --param-dtype bf16",
         "--param-dtype bf16 runs under bf16 autocast: add --mixed-precision bf16"),
    Case("--max-length 1", GOOD_RM + " --max-length 1", "option --max-length must be >= 2, got 1"),
    Case("eval-rm --max-length 1",
         "eval-rm --model {w}/rm --data {w}/pairs.jsonl --output {o}/eval.json --max-length 1",
         "--max-length must be >= 2"),
    Case("--kl-coef -1", PPO + " --kl-coef -1", "option --kl-coef must be >= 0, got -1.0"),
    Case("--kl-coef nan", PPO + " --kl-coef nan", "option --kl-coef must be a finite number, got nan"),
    Case("--gamma 1.5", PPO + " --gamma 1.5", "option --gamma must be >= 0 and <= 1, got 1.5"),
    Case("--lam -0.5", PPO + " --lam -0.5", "option --lam must be >= 0 and <= 1, got -0.5"),
    Case("--save-every -5", GOOD_SFT + " --save-every -5", "option --save-every must be >= 0, got -5"),
    Case("--temperature -inf", PPO + " --temperature -inf", "option --temperature must be a finite number, got -inf"),
    Case("edit --timeout nan", "edit --backend sandbox --model oracle --data {w}/pairs.jsonl --output {o}/edited.jsonl "
         "--timeout nan", "option --timeout must be a finite number, got nan"),
    Case("YAML option .inf", "train-rm --config {t}/c.yaml --output {o}", "c.yaml: field 'lr': must be a finite number",
         {"c.yaml": b"data: x.jsonl\nmodel: m\nlr: .inf\n"}),
    Case("YAML option out of bounds", "ppo --config {t}/c.yaml", "c.yaml: field 'gamma': must be >= 0 and <= 1",
         {"c.yaml": b"policy: p\nreward_model: r\nreward_mode: token\nprompts: x\noutput: o\ngamma: 2\n"}),
    Case("a number flag given text", GOOD_RM + " --lr fast", "argument --lr: invalid float value: 'fast'"),
    Case("an unknown flag", GOOD_RM + " --learning-rate 3", "unrecognized arguments: --learning-rate 3"),
    # 4. human edits that would be lost silently
    Case("a human edit whose id matches no pair", "edit --backend file --model {t}/human.jsonl --data {w}/pairs.jsonl "
         "--output {o}/edited.jsonl", "human.jsonl: line 2: field 'id': no pair with id 'p99' in",
         {"human.jsonl": b'{"id": "p0", "edited": "An edit."}\n{"id": "p99", "edited": "Lost work."}\n'}),
    Case("an empty human-edits file", "edit --backend file --model {t}/human.jsonl --data {w}/pairs.jsonl "
         "--output {o}/edited.jsonl", "human.jsonl: no human edits (the file is empty)", {"human.jsonl": b"\n"}),
    Case("edit --cache that is not SQLite", "edit --backend hf --model {w}/policy --data {w}/pairs.jsonl "
         "--output {t}/new/edited.jsonl --cache {t}/answers.jsonl", "answers.jsonl: cannot use it as the answer cache "
         "(file is not a database)", {"answers.jsonl": b'{"id": "p0", "text": "an answer, not a SQLite file"}\n'}),
    # 4. an output directory holding another run's checkpoints, without --resume
    Case("train-rm over another run's checkpoints", GOOD_RM, "already holds checkpoints",
         damage=stale_checkpoints("state.json", "step-00000286")),
    Case("sft over another run's checkpoints", GOOD_SFT, "already holds checkpoints",
         damage=stale_checkpoints("state.json", "step-00000286")),
    Case("ppo over another run's checkpoints", PPO, "already holds checkpoints",
         damage=stale_checkpoints("ppo_state.json", "step-000286")),
    # 1. damaged or tampered checkpoints on --resume
    Case("train-rm --resume: truncated weights", RUNS["rm"] + " --resume", "model.safetensors: cannot resume",
         run="rm", damage=truncate("model.safetensors")),
    Case("train-rm --resume: pickle planted in the optimizer state", RUNS["rm"] + " --resume",
         "optimizer.bin: cannot resume: the checkpoint is damaged or was altered (it holds pickled objects",
         run="rm", damage=plant_pickle("optimizer.bin")),
    Case("sft --resume: state file not JSON", RUNS["sft"] + " --resume", "state.json: cannot resume", run="sft",
         damage=write("state.json", "{not json")),
    Case("sft --resume: truncated optimizer state", RUNS["sft"] + " --resume", "optimizer.bin: cannot resume",
         run="sft", damage=truncate("optimizer.bin")),
    Case("ppo --resume: truncated weights", PPO_RUN + " --resume --steps 3", "model.safetensors: cannot resume",
         run="ppo", damage=truncate("model.safetensors")),
    Case("ppo --resume: pickle planted in the optimizer state", PPO_RUN + " --resume --steps 3",
         "optimizer.bin: cannot resume: the checkpoint is damaged or was altered (it holds pickled objects",
         run="ppo", damage=plant_pickle("optimizer.bin")),
    Case("ppo --resume: step that is not a number", PPO_RUN + " --resume --steps 3",
         "/state.json: cannot resume: the checkpoint is damaged or was altered (holds no step number)",
         run="ppo", damage=write("state.json", '{"step": "two", "kl_controller": {}}')),
    Case("ppo --resume: KL controller state altered", PPO_RUN + " --resume --steps 3",
         "/state.json: cannot resume: the checkpoint is damaged or was altered (holds no valid KL-controller",
         run="ppo", damage=write("state.json", '{"step": 2, "kl_controller": "beta=0.05"}')),
    Case("ppo --resume: pickle planted in a process's RNG state", PPO_RUN + " --resume --steps 3",
         "rng_0.pt: cannot resume: the checkpoint is damaged or was altered (it holds pickled objects",
         run="ppo", damage=plant_pickle("rng_0.pt")),
    Case("ppo --resume: truncated RNG state", PPO_RUN + " --resume --steps 3", "rng_0.pt: cannot resume",
         run="ppo", damage=truncate("rng_0.pt")),
    Case("ppo --resume: a pickle added beside the state files", PPO_RUN + " --resume --steps 3",
         "random_states_0.pkl: cannot resume: the checkpoint is damaged or was altered (it holds pickled objects",
         run="ppo", damage=plant_pickle("random_states_0.pkl")),
    Case("ppo --resume: optimizer state missing", PPO_RUN + " --resume --steps 3",
         "optimizer.bin: cannot resume: the checkpoint is damaged or was altered (missing)",
         run="ppo", damage=lambda run: (newest(run) / "optimizer.bin").unlink()),
    Case("train-rm --resume: pickle planted in the schedule", RUNS["rm"] + " --resume",
         "scheduler.pt: cannot resume: the checkpoint is damaged or was altered (it holds pickled objects",
         run="rm", damage=plant_pickle("scheduler.pt")),
    Case("sft --resume: truncated RNG state", RUNS["sft"] + " --resume", "rng_0.pt: cannot resume", run="sft",
         damage=truncate("rng_0.pt")),
    Case("eval-rm: a plain checkpoint (no finegrain.json) whose config.json is cut short", "eval-rm --model {o} "
         "--data {w}/pairs.jsonl --output {t}/eval.json", "config.json: invalid JSON", run="rm",
         damage=lambda run: ((run / "finegrain.json").unlink(),
                             (run / "config.json").write_text('{"architectures": ["GPT2ForTok'))),
    Case("eval-rm: a reward model whose finegrain.json is not an object", "eval-rm --model {o} --data "
         "{w}/pairs.jsonl --output {t}/eval.json", "finegrain.json: not a JSON object", run="rm",
         damage=lambda run: (run / "finegrain.json").write_text('["token"]')),
    Case("ppo --resume with options the checkpoint was not saved with", PPO_RUN + " --resume --steps 3 --use-lora",
         "cannot resume: the checkpoint does not fit this run's model or options", run="ppo"),
    Case("ppo --resume: a checkpoint of the layout before issue 16", PPO_RUN + " --resume --steps 3",
         "in the checkpoint layout of an earlier finegrain", run="ppo", damage=legacy_layout),
]
EARLIER = {"metrics.jsonl": b'{"step": 1, "loss": 0.7}\n', "model.safetensors": b"weights of an earlier run",
           "pairs.jsonl": b'{"earlier": true}\n', "edited.jsonl": b'{"earlier": true}\n', "eval.json": b"{}\n",
           "outputs.json": b"[]\n"}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of the command line (argparse's own errors exit through SystemExit)."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, verb: str, words: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"finegrain {verb}: error: ") and "Traceback" not in err, err
    assert words in err, err


@pytest.mark.parametrize("case", CORPUS, ids=[c.kind for c in CORPUS])
def test_bad_input_is_one_line_and_leaves_earlier_outputs(world, tmp_path, capsys, case):
    for name, content in case.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    out = tmp_path / "out"
    if case.run:
        shutil.copytree(world / f"run-{case.run}", out)
    else:
        out.mkdir()
        for name, content in EARLIER.items():
            (out / name).write_bytes(content)
    if case.damage:
        case.damage(out)
    before = snapshot(out)
    argv = fill(case.argv, world, out, tmp_path)
    code, err = run_cli(argv, capsys)
    assert_one_line(code, err, argv[0], case.words)
    assert snapshot(out) == before, "an earlier output was changed"
    assert not (tmp_path / "PAYLOAD-RAN").exists(), "the planted pickle ran"


def test_the_corpus_has_at_least_40_kinds():
    from test_bad_input import CORPUS as RECORDS, LOADER_CORPUS

    kinds = [c.kind for c in CORPUS] + [c[0] for c in RECORDS] + [c[0] for c in LOADER_CORPUS]
    assert len(kinds) >= 40 and len(CORPUS) >= 30


# ----------------------------------------------------------------------------- a loss that becomes NaN
def nan_copy(src: Path, dst: Path) -> Path:
    """A copy of checkpoint ``src`` whose final layer norm is NaN: every output (loss, reward) is NaN."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    for name in weights:
        if "ln_f" in name:
            weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("verb", ["sft", "train-rm"])
def test_a_nan_loss_stops_the_run_naming_the_step_before_anything_is_saved(world, tmp_path, capsys, verb):
    model = nan_copy(world / "policy", tmp_path / "nan-policy")
    template = {"sft": GOOD_SFT, "train-rm": GOOD_RM}[verb].replace("{w}/policy", str(model))
    code, err = run_cli(fill(template + " --save-every 1", world, tmp_path / "out"), capsys)
    assert_one_line(code, err, verb, "the loss became nan at step 1; stopped before saving")
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / "model.safetensors").exists()


def test_a_nan_reward_stops_ppo_before_it_saves_over_a_good_checkpoint(world, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(world / "run-ppo", out)
    kept = {k: v for k, v in snapshot(out).items() if k != "config.json"}  # config.json records each invocation
    rm = nan_copy(world / "rm", tmp_path / "nan-rm")
    argv = fill(PPO_RUN.replace("{w}/rm", str(rm)) + " --resume --steps 4", world, out)
    code, err = run_cli(argv, capsys)
    assert_one_line(code, err, "ppo", "the reward became nan at step 3; stopped before saving")
    assert {k: v for k, v in snapshot(out).items() if k != "config.json"} == kept
