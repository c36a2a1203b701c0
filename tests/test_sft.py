"""`finegrain sft`: response-only loss mask, exact loss, training lowers the loss, CLI errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from finegrain.cli import main
from finegrain.config import build_config
from finegrain.errors import ConfigError, InputError
from finegrain.tokens import format_prompt
from finegrain.io import write_jsonl
from finegrain.sandbox.domain import make_demonstrations
from finegrain.sft.config import SFTConfig
from finegrain.sft.data import IGNORE_INDEX, build_sft_example, collate_sft, load_sft_records
from finegrain.sft.train import response_loss, train_sft


def test_loss_mask_covers_only_response_and_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = build_sft_example(tok, "Question: how tall?", "about 8,849 metres", max_length=64)
    p_ids = tok(format_prompt(tok, "Question: how tall?"), add_special_tokens=False)["input_ids"]
    r_ids = tok("about 8,849 metres", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == p_ids + r_ids + [tok.eos_token_id]
    assert ex.labels == [IGNORE_INDEX] * len(p_ids) + r_ids + [tok.eos_token_id]
    # truncation cuts the prompt from the left and keeps the whole response labelled
    short = build_sft_example(tok, "Question: how tall?", "about 8,849 metres", max_length=len(r_ids) + 3)
    assert short.truncated and short.input_ids[-len(r_ids) - 1:] == r_ids + [tok.eos_token_id]
    assert short.labels[:2] == [IGNORE_INDEX] * 2
    batch = collate_sft([ex, short], tok.pad_token_id)
    assert batch.labels.shape == batch.input_ids.shape
    assert batch.labels[1, len(short.labels):].eq(IGNORE_INDEX).all()
    assert batch.n_target_tokens == 2 * (len(r_ids) + 1)


def test_response_loss_exact():
    # two positions predict labels[1] and labels[2]; labels[2] is ignored -> loss = CE(logits[0,0], 1)
    logits = torch.tensor([[[0.0, 1.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX]])
    expected = -(1.0 - torch.logsumexp(torch.tensor([0.0, 1.0, 0.0]), 0))
    assert response_loss(logits, labels).item() == pytest.approx(expected.item(), abs=1e-6)


def _demos(tmp_path, n=48, field="response"):
    rows = [{"prompt": d["prompt"], field: d["response"]} for d in make_demonstrations(n, seed=0)]
    path = tmp_path / "sft.jsonl"
    write_jsonl(path, rows)
    return path


def test_sft_from_scratch_lowers_loss(tmp_path):
    data = _demos(tmp_path)
    cfg = build_config(SFTConfig, {"data": str(data), "output": str(tmp_path / "policy"), "from_scratch": True,
                                   "vocab_size": 400, "n_embd": 32, "epochs": 3.0, "batch_size": 8, "lr": 3e-3,
                                   "lr_scheduler": "constant", "warmup_ratio": 0.0,
                                   "log_with": "none", "eval_fraction": 0.0, "dtype": "auto"})
    out = train_sft(cfg)  # --dtype auto builds a model from scratch in float32
    assert out["steps"] == 18 and out["final_loss"] < out["first_loss"] - 0.8
    lines = [json.loads(x) for x in (tmp_path / "policy" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 19))
    assert all(r["tokens_per_s"] > 0 for r in lines)
    meta = json.loads((tmp_path / "policy" / "finegrain.json").read_text())
    assert meta["stage"] == "sft" and meta["n_train"] == 48
    # the checkpoint loads with transformers alone and continues training from --model
    cfg2 = build_config(SFTConfig, {"data": str(data), "output": str(tmp_path / "policy2"),
                                    "model": str(tmp_path / "policy"), "epochs": 1.0, "lr": 1e-3, "log_with": "none",
                                    "dtype": "auto"})
    out2 = train_sft(cfg2)
    assert out2["first_loss"] < out["first_loss"] - 0.8
    for d in ("policy", "policy2"):  # and loads a float32 checkpoint as float32
        assert json.loads((tmp_path / d / "config.json").read_text())["dtype"] == "float32"


def test_sft_resume_matches_uninterrupted(tmp_path):
    data = _demos(tmp_path, n=32, field="chosen")
    base = {"data": str(data), "from_scratch": True, "vocab_size": 300, "n_embd": 16, "epochs": 2.0,
            "batch_size": 8, "lr": 1e-3, "log_with": "none", "save_every": 4}
    full = train_sft(build_config(SFTConfig, dict(base, output=str(tmp_path / "a"))))
    # a run killed after its step-4 checkpoint: only checkpoints/step-00000004 survives
    shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / "c" / "checkpoints")
    assert [p.name for p in (tmp_path / "c" / "checkpoints").iterdir()] == ["step-00000004"]
    resumed = train_sft(build_config(SFTConfig, dict(base, output=str(tmp_path / "c"), resume=True)))
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], abs=1e-5)
    steps = [json.loads(x)["step"] for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 6, 7, 8]
    # a resume whose metrics.jsonl holds the interrupted run's first steps reports that run's first loss
    shutil.rmtree(tmp_path / "c")
    shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / "c" / "checkpoints")
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "c" / "metrics.jsonl").write_text("\n".join(lines[:5]) + "\n")  # killed during step 6
    resumed = train_sft(build_config(SFTConfig, dict(base, output=str(tmp_path / "c"), resume=True)))
    assert resumed["first_loss"] == full["first_loss"]
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], abs=1e-5)
    assert json.loads((tmp_path / "c" / "finegrain.json").read_text())["first_loss"] == full["first_loss"]


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 8}, "--batch-size is 8 here but was 4 in that run"),
    ({"seed": 7}, "--seed is 7 here but was 0 in that run"),  # without held-out data the split cannot tell
    ({"grad_accum": 2}, "--grad-accum is 2 here but was 1"),
    ({"epochs": 1.0}, "--epochs is 1.0 here but was 2.0"),
    ({"lr": 5e-3}, "--lr is 0.005 here but was 0.001"),
    ({"dtype": "bfloat16"}, "--dtype is 'bfloat16' here but was 'float32'"),
])
def test_sft_resume_refuses_options_that_change_the_plan_or_the_updates(tmp_path, change, message):
    """Step N of another batch size, seed, accumulation, length or rate is not the saving run's step N: the resume
    would silently take other micro-batches (or none: a checkpoint beyond the new last step) or another rate."""
    data = _demos(tmp_path, n=16)
    base = {"data": str(data), "from_scratch": True, "vocab_size": 300, "n_embd": 16, "epochs": 2.0,
            "batch_size": 4, "lr": 1e-3, "log_with": "none", "save_every": 6, "eval_fraction": 0.0}
    train_sft(build_config(SFTConfig, dict(base, output=str(tmp_path / "a"))))
    with pytest.raises(ConfigError, match=r"cannot resume from .*step-00000006: " + message.replace(".", r"\.")):
        train_sft(build_config(SFTConfig, dict(base, output=str(tmp_path / "a"), resume=True, **change)))


def test_records_validation(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"prompt": "a", "answer": "b"}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl: line 2: field 'response'"):
        load_sft_records(str(p))
    recs, skipped = load_sft_records(str(p), skip_invalid=True)
    assert len(recs) == 1 and skipped == 1
    with pytest.raises(ConfigError, match="exactly one"):
        build_config(SFTConfig, {"data": "x", "output": "y"})


@pytest.mark.parametrize("flag, value", [("n_layer", 4), ("vocab_size", 2000), ("n_positions", 1024)])
def test_a_from_scratch_size_given_with_a_model_is_refused_not_ignored(flag, value):
    """--n-layer 4 --model runs/base used to train the loaded model at its own size without a word."""
    with pytest.raises(ConfigError, match=f"--{flag.replace('_', '-')} applies with --from-scratch; --model m keeps"):
        build_config(SFTConfig, {"data": "x", "output": "y", "model": "m", flag: value})
    assert build_config(SFTConfig, {"data": "x", "output": "y", "from_scratch": True, flag: value})


def test_cli_errors_are_one_line(tmp_path, capsys):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"prompt": "", "response": "b"}) + "\n")
    assert main(["sft", "--data", str(p), "--output", str(tmp_path / "o"), "--from-scratch"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "line 1" in err and "'prompt'" in err
    assert main(["sft", "--data", str(p), "--output", str(tmp_path / "o"), "--from-scratch", "--model", "m"]) == 2


def test_skip_invalid_skips_unreadable_records_and_lists_them_in_rejects_jsonl(tmp_path):
    data = _demos(tmp_path, n=16)
    lines = data.read_text().splitlines()
    lines[2:2] = ['{"prompt": "cut by a kill', json.dumps(["not", "an", "object"]), json.dumps({"prompt": "p"})]
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"sft.jsonl: line 3: invalid JSON"):
        load_sft_records(str(data))
    recs, skipped = load_sft_records(str(data), skip_invalid=True, rejects_path=tmp_path / "r.jsonl")
    assert len(recs) == 16 and skipped == 3
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["location"], r["field"]) for r in rows] == [("line 3", None), ("line 4", None), ("line 5", "response")]
    assert rows[2]["record"] == {"prompt": "p"} and "line 5" in rows[2]["error"]
    out = tmp_path / "policy"
    assert main(["sft", "--data", str(data), "--output", str(out), "--from-scratch", "--vocab-size", "300",
                 "--n-embd", "16", "--epochs", "0.5", "--log-with", "none", "--skip-invalid"]) == 0
    assert json.loads((out / "finegrain.json").read_text())["n_skipped"] == 3
    assert len((out / "rejects.jsonl").read_text().splitlines()) == 3


def test_a_template_without_the_prompt_placeholder_is_refused(tmp_path, capsys):
    """`--template 'Q: '` would give every record the same prompt (the records' prompts dropped)."""
    base = {"data": "d", "output": "o", "from_scratch": True}
    with pytest.raises(ConfigError, match=r"--template 'Q: ' has no \{prompt\}"):
        build_config(SFTConfig, dict(base, template="Q: "))
    assert build_config(SFTConfig, dict(base, template="Q: {prompt}\nA:")).template == "Q: {prompt}\nA:"
    data = _demos(tmp_path, n=4)
    assert main(["sft", "--data", str(data), "--output", str(tmp_path / "o"), "--from-scratch", "--template",
                 "Question:"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "{prompt}" in err and not (tmp_path / "o").exists()


def test_an_output_that_cannot_be_a_directory_is_refused_before_training(tmp_path, capsys):
    data = _demos(tmp_path, n=4)
    (tmp_path / "afile").write_text("keep me")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        assert main(["sft", "--data", str(data), "--output", str(out), "--from-scratch", "--log-with", "none"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--output cannot be written" in err and "afile" in err
    assert (tmp_path / "afile").read_text() == "keep me"


def test_a_forced_progress_bar_in_a_log_is_not_a_line_per_step(tmp_path, monkeypatch, capsys):
    """FINEGRAIN_PROGRESS=1 with stderr in a file (a batch job's log): the bar redraws at most once a second, as
    tqdm's mininterval says, not at every step's postfix."""
    import time

    monkeypatch.setenv("FINEGRAIN_PROGRESS", "1")
    data = _demos(tmp_path, n=20)
    start = time.monotonic()
    out = train_sft(build_config(SFTConfig, {"data": str(data), "output": str(tmp_path / "p"), "from_scratch": True,
                                             "vocab_size": 300, "n_embd": 16, "epochs": 2.0, "batch_size": 1,
                                             "log_with": "none", "eval_fraction": 0.0}))
    assert out["steps"] == 40
    draws = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("sft:")]
    seconds = time.monotonic() - start
    # the first draw, one a second at most, the last (a draw per step would be 42 unless 40 steps took 40 s)
    assert 2 <= len(draws) <= seconds + 3 and "40/40" in draws[-1] and "loss=" in draws[-1], (len(draws), seconds)


def test_sft_resume_refuses_records_changed_under_the_same_ids_and_resumes_on_the_same(tmp_path, tiny_tokenizer,
                                                                                       capsys):
    """The data fingerprint covers what training reads (ids, templated prompts, responses), not the ids only: a
    response fixed under its id, or another --template, is other data, and resuming over it would mix two runs."""
    from conftest import make_tiny_model

    from finegrain.models import save_checkpoint

    save_checkpoint(tmp_path / "base", make_tiny_model(tiny_tokenizer, "causal", n_positions=64), tiny_tokenizer, {})
    rows = [{"id": f"r{i}", "prompt": d["prompt"], "response": d["response"]}
            for i, d in enumerate(make_demonstrations(16, seed=0))]
    write_jsonl(tmp_path / "sft.jsonl", rows)
    rows[5] = dict(rows[5], response=rows[5]["response"] + " Fixed.")
    write_jsonl(tmp_path / "fixed.jsonl", rows)
    argv = lambda data, out, *more: ["sft", "--data", str(tmp_path / data), "--model", str(tmp_path / "base"),  # noqa: E731
                                     "--output", str(tmp_path / out), "--epochs", "1", "--batch-size", "4",
                                     "--save-every", "2", "--eval-fraction", "0", "--log-with", "none", *more]
    assert main(argv("sft.jsonl", "a")) == 0  # 4 steps, a checkpoint after step 2
    for data, more in (("fixed.jsonl", ()), ("sft.jsonl", ("--template", "Q: {prompt}\nA: "))):
        shutil.rmtree(tmp_path / "b", ignore_errors=True)
        shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints")
        capsys.readouterr()
        assert main(argv(data, "b", "--resume", *more)) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "step-00000002: the training records (ids or texts), the --template or " \
                                          "the tokenizer differ from that run's" in err, err
    assert main(argv("sft.jsonl", "b", "--resume")) == 0  # the same data resumes after step 2
    assert [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()] == [3, 4]


def test_resume_without_a_checkpoint_says_so_and_trains_from_step_0(tmp_path, caplog):
    """--resume on an output with no checkpoint trained from step 0 without a word (a mistyped --output went
    unnoticed): one warning line (stderr) says it, and the run goes on."""
    import logging

    data = _demos(tmp_path, n=8)
    out = tmp_path / "fresh"
    with caplog.at_level(logging.WARNING, logger="finegrain.training"):
        assert main(["sft", "--data", str(data), "--output", str(out), "--from-scratch", "--vocab-size", "300",
                     "--n-embd", "16", "--batch-size", "4", "--log-with", "none", "--resume"]) == 0
    said = [r.getMessage() for r in caplog.records if r.name == "finegrain.training"]
    assert said == [f"--resume: no checkpoint in {out / 'checkpoints'}; starting from step 0"]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_the_default_max_length_is_cut_to_the_models_positions_without_a_warning(tmp_path, tiny_tokenizer, caplog):
    """Every sft of a model with fewer than 512 positions warned "--max-length 512 is above ..." though the user
    never gave it; a --max-length the user gives above them still warns."""
    import logging

    from conftest import make_tiny_model

    from finegrain.models import save_checkpoint

    save_checkpoint(tmp_path / "base", make_tiny_model(tiny_tokenizer, "causal", n_positions=64), tiny_tokenizer, {})
    rows = [{"prompt": d["prompt"], "response": d["response"]} for d in make_demonstrations(4, seed=0)]
    write_jsonl(tmp_path / "sft.jsonl", rows)
    values = {"data": str(tmp_path / "sft.jsonl"), "model": str(tmp_path / "base"), "batch_size": 4,
              "log_with": "none"}
    for name, more, warned in (("default", {}, []), ("given", {"max_length": 100},
                                                     [f"--max-length 100 is above the 64 positions of "
                                                      f"{tmp_path / 'base'}; using 64"])):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="finegrain.models"):
            out = train_sft(build_config(SFTConfig, dict(values, output=str(tmp_path / name), **more)))
        assert out["max_length"] == 64
        assert [r.getMessage() for r in caplog.records if r.name == "finegrain.models"] == warned, name
