"""Reward-model training on a synthetic edited dataset: learning, checkpoints, resume, refusals."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from finegrain.config import build_config
from finegrain.errors import ConfigError, InputError
from finegrain.io import write_jsonl
from finegrain.models import save_checkpoint
from finegrain.scratch import train_bpe_tokenizer
from finegrain.rm import EvalRMConfig, RewardModel, TrainRMConfig, evaluate_reward_model, train_reward_model

NOUNS = ["cat", "dog", "house", "car", "tree", "book", "river", "garden", "city", "song", "movie", "chair",
         "lamp", "road", "boat", "phone"]
BAD = ["awful", "stupid", "ugly", "boring"]
GOOD = ["lovely", "great", "pretty", "bright"]
TEMPLATES = ["The {n} is {a}.", "I think this {n} looks {a} today.", "My {a} {n} is here, come and see it.",
             "Yesterday we saw a {a} {n} near the old bridge.", "This {n} is really {a} and small."]


def synthetic_pairs(n: int, seed: int, *, prefix: str = "p") -> list[dict]:
    """Edited pairs: the edit swaps one bad adjective of `rejected` for a good one (gold span = that word)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        noun, tmpl = rng.choice(NOUNS), rng.choice(TEMPLATES)
        bad, good = rng.choice(BAD), rng.choice(GOOD)
        rejected, edited = tmpl.format(n=noun, a=bad), tmpl.format(n=noun, a=good)
        start = rejected.index(bad)
        chosen = rng.choice(TEMPLATES).format(n=noun, a=rng.choice(GOOD))
        out.append({"id": f"{prefix}{i}", "prompt": f"Describe the {noun}.", "chosen": chosen, "rejected": rejected,
                    "edited": edited, "gold_spans": [[start, start + len(bad)]]})
    return out


def corpus() -> list[str]:
    words = " ".join(NOUNS + BAD + GOOD)
    return [t.format(n=n, a=a) for t in TEMPLATES for n in NOUNS for a in BAD + GOOD] + [words] * 5


def make_base_model(path: Path, *, pad: bool = True, seed: int = 0) -> Path:
    """A tiny GPT-2 causal LM (as an SFT policy would be) with a BPE tokenizer trained here."""
    from finegrain.scratch import tiny_gpt2_config
    from transformers import GPT2LMHeadModel

    tok = train_bpe_tokenizer(corpus() + [f"Describe the {n}." for n in NOUNS], vocab_size=300,
                              pad="<pad>" if pad else None)
    torch.manual_seed(seed)
    cfg = tiny_gpt2_config(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, n_positions=64)
    save_checkpoint(path, GPT2LMHeadModel(cfg), tok, {"kind": "causal"})
    return path


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("rmdata")
    train = synthetic_pairs(48, seed=1)
    train += [dict(train[0], id="same1", edited=train[0]["rejected"]), dict(train[1], id="same2",
                                                                             edited=train[1]["rejected"])]
    write_jsonl(d / "train.jsonl", train)
    write_jsonl(d / "heldout.jsonl", synthetic_pairs(40, seed=2, prefix="h"))
    return d


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    return make_base_model(tmp_path_factory.mktemp("base") / "policy")


def train_cfg(data_dir: Path, model: Path, out: Path, **kw) -> TrainRMConfig:
    values = dict(data=str(data_dir / "train.jsonl"), model=str(model), output=str(out), loss="token_edit",
                  pairs="edit", eval_fraction=0.0, epochs=6, batch_size=8, lr=3e-3, warmup_ratio=0.0,
                  lr_scheduler="constant", max_length=48, eval_every=0, save_every=0, log_with="none")
    values.update(kw)
    return build_config(TrainRMConfig, values)


def heldout_eval(model_dir: Path, data_dir: Path, tmp: Path, pairs: str = "edit") -> dict:
    return evaluate_reward_model(build_config(EvalRMConfig, dict(
        model=str(model_dir), data=str(data_dir / "heldout.jsonl"), output=str(tmp / "eval.json"), pairs=pairs)))


@pytest.fixture(scope="module")
def token_rm(data_dir, base_model, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tokrm") / "rm"
    return out, train_reward_model(train_cfg(data_dir, base_model, out, eval_data=str(data_dir / "heldout.jsonl"),
                                             eval_every=10))


def test_token_rm_learns_the_edited_tokens(token_rm, data_dir, base_model, tmp_path):
    out, summary = token_rm
    assert summary["n_train"] == 48 and summary["n_dropped_unchanged"] == 2
    meta = json.loads((out / "finegrain.json").read_text())
    assert meta["kind"] == "token" and meta["loss"] == "token_edit" and meta["base_model"] == str(base_model)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, summary["steps"] + 1))
    assert {"loss", "accuracy", "lr", "margin"} <= set(lines[0]) and "eval_accuracy" in lines[9]
    res = heldout_eval(out, data_dir, tmp_path)
    print(f"token_edit RM held-out: accuracy={res['accuracy']:.3f} token_auroc={res['token_auroc']:.3f}")
    assert res["accuracy"] >= 0.9
    assert res["token_auroc"] >= 0.7 and res["token_auroc_source"] == "gold_spans"
    # the backbone moved away from the causal LM it started from
    rm = RewardModel.load(str(out))
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(base_model)
    assert not torch.equal(rm.model.transformer.h[0].attn.c_attn.weight, lm.transformer.h[0].attn.c_attn.weight)


def test_token_mean_loss_learns(data_dir, base_model, tmp_path):
    out = tmp_path / "rm"
    train_reward_model(train_cfg(data_dir, base_model, out, loss="token_mean", epochs=4))
    res = heldout_eval(out, data_dir, tmp_path)
    print(f"token_mean RM held-out: accuracy={res['accuracy']:.3f} token_auroc={res['token_auroc']:.3f}")
    assert res["accuracy"] >= 0.85 and res["token_auroc"] >= 0.6  # sequence-level signal: weaker token credit


def test_u0_regulariser_pulls_unchanged_rewards_together(token_rm, data_dir, base_model, tmp_path):
    out = tmp_path / "rm"
    train_reward_model(train_cfg(data_dir, base_model, out, u0_weight=5.0, eval_data=str(data_dir / "heldout.jsonl"),
                                 eval_every=10))
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    plain = json.loads((token_rm[0] / "metrics.jsonl").read_text().splitlines()[-1])
    print(f"held-out U0 reward gap: {plain['eval_u0_gap']:.4f} (u0_weight=0) vs {last['eval_u0_gap']:.4f} (5)")
    assert last["eval_u0_gap"] < plain["eval_u0_gap"]
    res = heldout_eval(out, data_dir, tmp_path)
    print(f"token_edit + u0_weight=5 held-out: accuracy={res['accuracy']:.3f} token_auroc={res['token_auroc']:.3f}")
    assert res["accuracy"] >= 0.9 and res["token_auroc"] >= 0.75
    with pytest.raises(ConfigError, match="--u0-weight applies to token losses"):
        train_cfg(data_dir, base_model, out, loss="sequence", u0_weight=1.0)


def test_sequence_rm_with_pad_equal_to_eos_scores_like_plain_transformers(data_dir, tmp_path):
    base = make_base_model(tmp_path / "base", pad=False)   # pad == EOS, the SmolLM2 situation
    out = tmp_path / "rm"
    summary = train_reward_model(train_cfg(data_dir, base, out, loss="sequence", epochs=8))
    assert summary["kind"] == "sequence"
    res = heldout_eval(out, data_dir, tmp_path)
    print(f"sequence RM held-out: accuracy={res['accuracy']:.3f}")
    assert res["accuracy"] >= 0.85 and "token_auroc" not in res
    # plain transformers: tokenizer + AutoModelForSequenceClassification, right-padded batch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert tok.pad_token_id != tok.eos_token_id
    rows = synthetic_pairs(4, seed=3)
    texts = [[*tok(f"{r['prompt']}\n")["input_ids"], *tok(r["rejected"])["input_ids"], tok.eos_token_id] for r in rows]
    batch = tok.pad({"input_ids": texts}, return_tensors="pt", padding_side="right")
    with torch.no_grad():
        plain = model(**batch).logits[:, 0].tolist()
    ours = RewardModel.load(str(out)).score([r["prompt"] for r in rows], [r["rejected"] for r in rows], batch_size=3)
    assert ours == pytest.approx(plain, abs=1e-5)


def test_resume_reproduces_the_uninterrupted_run(data_dir, base_model, tmp_path):
    kw = dict(epochs=2, batch_size=8, grad_accum=2, save_every=2, keep_checkpoints=3, lr_scheduler="linear",
              warmup_ratio=0.2, eval_fraction=0.2, eval_every=2)
    full = tmp_path / "full"
    train_reward_model(train_cfg(data_dir, base_model, full, **kw))
    ckpts = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000004"]
    # simulate a crash after step 3: keep checkpoint 2 and the metrics written so far
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(full / "checkpoints" / "step-00000002", crashed / "checkpoints" / "step-00000002")
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    train_reward_model(train_cfg(data_dir, base_model, crashed, resume=True, **kw))
    assert (crashed / "metrics.jsonl").read_text().splitlines() == lines
    from safetensors.torch import load_file

    a, b = load_file(full / "model.safetensors"), load_file(crashed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_data(data_dir, base_model, tmp_path):
    out = tmp_path / "rm"
    train_reward_model(train_cfg(data_dir, base_model, out, epochs=0.4, save_every=1))
    with pytest.raises(ConfigError, match="cannot resume"):
        train_reward_model(train_cfg(data_dir, base_model, out, epochs=0.4, save_every=1, resume=True, seed=5,
                                     eval_fraction=0.3))


def test_resume_refuses_pairs_fixed_under_the_same_ids(data_dir, base_model, tmp_path):
    """The fingerprint covers what training reads, not the ids only: an edit fixed under its id is other data."""
    rows = [json.loads(x) for x in (data_dir / "train.jsonl").read_text().splitlines()]
    rows[3] = dict(rows[3], edited=rows[3]["edited"] + " Fixed.")
    write_jsonl(tmp_path / "fixed.jsonl", rows)
    out = tmp_path / "rm"
    train_reward_model(train_cfg(data_dir, base_model, out, epochs=0.4, save_every=1))
    fixed = dict(epochs=0.4, save_every=1, resume=True, data=str(tmp_path / "fixed.jsonl"))
    with pytest.raises(ConfigError, match=r"the training pairs \(ids or texts\) differ from that run's"):
        train_reward_model(train_cfg(data_dir, base_model, out, **fixed))


def test_bert_backbone_token_and_sequence(tmp_path, data_dir):
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    from tokenizers import processors

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(corpus() + [f"Describe the {n}." for n in NOUNS], vocab_size=200)
    cls_id, sep_id = wp.token_to_id("[CLS]"), wp.token_to_id("[SEP]")
    wp.post_processor = processors.BertProcessing(("[SEP]", sep_id), ("[CLS]", cls_id))
    tok = PreTrainedTokenizerFast(tokenizer_object=wp._tokenizer, unk_token="[UNK]", sep_token="[SEP]",
                                  pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "bert", BertForMaskedLM(cfg), tok, {})
    for loss in ("token_edit", "sequence"):
        out = tmp_path / loss
        train_reward_model(train_cfg(data_dir, tmp_path / "bert", out, loss=loss, epochs=3))
        res = heldout_eval(out, data_dir, tmp_path)
        print(f"BERT {loss} RM held-out: accuracy={res['accuracy']:.3f} token_auroc={res.get('token_auroc')}")
        assert res["accuracy"] >= 0.75
        rm = RewardModel.load(str(out))
        rows = synthetic_pairs(3, seed=4)
        ex = rm.encode(rows[0]["prompt"], rows[0]["edited"])
        assert rm.tokenizer.convert_ids_to_tokens(ex.input_ids[ex.response_end - 1]) == "[SEP]"
        again = RewardModel.load(str(out)).score([r["prompt"] for r in rows], [r["edited"] for r in rows])
        assert again == pytest.approx(rm.score([r["prompt"] for r in rows], [r["edited"] for r in rows], batch_size=1),
                                      abs=1e-5)


def test_refusals(data_dir, base_model, token_rm, tmp_path):
    with pytest.raises(ConfigError, match="needs a sequence reward model"):
        train_reward_model(train_cfg(data_dir, token_rm[0], tmp_path / "x", loss="sequence"))
    with pytest.raises(InputError, match="no such file"):
        train_reward_model(train_cfg(tmp_path, base_model, tmp_path / "y"))
    write_jsonl(tmp_path / "train.jsonl", [dict(r, edited=r["rejected"]) for r in synthetic_pairs(3, seed=0)])
    with pytest.raises(InputError, match="no usable pairs .3 edits identical"):
        train_reward_model(train_cfg(tmp_path, base_model, tmp_path / "z"))
    with pytest.raises(ConfigError, match="--batch-size"):
        train_cfg(data_dir, base_model, tmp_path / "w", batch_size=0)


def test_micro_batch_plan_is_deterministic_and_covers_each_epoch():
    from finegrain.training import micro_batch_plan

    plan = micro_batch_plan(10, 4, 2.0, seed=3)
    assert plan == micro_batch_plan(10, 4, 2.0, seed=3) and len(plan) == 6
    assert sorted(i for mb in plan[:3] for i in mb) == list(range(10))
    assert sorted(i for mb in plan[3:] for i in mb) == list(range(10)) and plan[:3] != plan[3:]
    assert len(micro_batch_plan(10, 4, 0.5, seed=3)) == 2


@pytest.mark.slow
def test_two_processes_train_and_resume_exactly(data_dir, base_model, tmp_path):
    """Data-parallel on CPU (torchrun, gloo): 2 processes split each batch; resume gives the same metrics."""
    import os
    import subprocess
    import sys

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this Python")
    # TMPDIR: torchrun's torchelastic_* directories land under tmp_path, not in the machine's $TMPDIR
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", FINEGRAIN_PROGRESS="0", TMPDIR=str(tmp_path))
    out = tmp_path / "ddp"
    argv = [str(torchrun), "--nproc_per_node", "2", "-m", "finegrain", "train-rm", "--data",
            str(data_dir / "train.jsonl"), "--model", str(base_model), "--output", str(out), "--epochs", "1",
            "--batch-size", "4", "--lr", "3e-3", "--save-every", "2", "--eval-fraction", "0", "--log-with", "none",
            "--max-length", "48"]
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    full = (out / "metrics.jsonl").read_text().splitlines()
    assert len(full) == 6  # 48 pairs / (4 per process x 2 processes)
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    run = subprocess.run(argv + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (out / "metrics.jsonl").read_text().splitlines() == full


def test_edits_cut_off_by_truncation_are_counted_apart(tiny_tokenizer):
    from finegrain.data.schema import Comparison
    from finegrain.rm.data import featurize

    head = "Paris is a large city with many museums. " * 3
    items = [Comparison("cut", "Describe Paris.", head + "It is lovely.", head + "It is awful.", None),
             Comparison("kept", "Describe Paris.", "It is lovely.", "It is awful.", None)]
    feats, dropped, cut = featurize(tiny_tokenizer, items, max_length=24)
    assert [f.id for f in feats] == ["kept"] and (dropped, cut) == (1, 1)
    feats, dropped, cut = featurize(tiny_tokenizer, items, max_length=256)
    assert len(feats) == 2 and (dropped, cut) == (0, 0)


def _plain_token_rewards(out: Path, ids: list[int], start: int, end: int) -> list[float]:
    """Per-token rewards with transformers alone: AutoModelForTokenClassification on the given ids."""
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(out).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, start:end, 0].tolist()


def test_label_loss_with_an_encoder_from_scratch_saves_a_plain_checkpoint(data_dir, base_model, tmp_path):
    out = tmp_path / "enc"
    summary = train_reward_model(train_cfg(data_dir, base_model, out, loss="token_label", from_scratch="encoder",
                                           epochs=8, eval_fraction=0.2, eval_every=5))
    meta = json.loads((out / "finegrain.json").read_text())
    assert meta["architecture"] == "encoder from scratch" and meta["token_view"] == "causal"
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
    # sizes default to --model's config (the tiny GPT-2: 2 layers, hidden 32, 2 heads)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]) == (2, 32, 2)
    assert summary["flaw_threshold"] is not None and meta["eval_curve"]
    res = heldout_eval(out, data_dir, tmp_path)
    print(f"encoder token_label: accuracy={res['accuracy']:.3f} response_auroc={res['response_auroc']:.3f}")
    assert res["accuracy"] >= 0.9 and res["response_auroc"] >= 0.9
    # the reward of a token depends on the tokens after it (bidirectional), and plain transformers agrees
    rm = RewardModel.load(str(out))
    row = synthetic_pairs(1, seed=7)[0]
    ex = rm.encode(row["prompt"], row["rejected"])
    ours = rm.token_rewards([row["prompt"]], [row["rejected"]])[0].rewards
    assert ours == pytest.approx(_plain_token_rewards(out, ex.input_ids, ex.response_start, ex.response_end), abs=1e-5)
    changed = list(ex.input_ids)
    changed[ex.response_end - 2] = changed[ex.response_start]   # change the last response token only
    before = _plain_token_rewards(out, changed, ex.response_start, ex.response_start + 1)
    assert before != pytest.approx(ours[:1], abs=1e-6)


def test_echo_view_reads_the_response_twice_and_loads_alone(data_dir, base_model, tmp_path):
    out = tmp_path / "echo"
    train_reward_model(train_cfg(data_dir, base_model, out, loss="token_mean", label_weight=1.0, token_view="echo",
                                 epochs=3, max_length=64))
    assert json.loads((out / "finegrain.json").read_text())["token_view"] == "echo"
    rm = RewardModel.load(str(out))
    row = synthetic_pairs(1, seed=8)[0]
    tok = rm.tokenizer
    p, r = tok(f"{row['prompt']}\n")["input_ids"], tok(row["rejected"])["input_ids"]
    ex = rm.encode(row["prompt"], row["rejected"])
    # prompt + response + EOS + response + EOS, scored on the second copy
    assert ex.input_ids == p + r + [tok.eos_token_id] + r + [tok.eos_token_id]
    assert (ex.response_start, ex.response_end) == (len(p) + len(r) + 1, len(ex.input_ids))
    ours = rm.token_rewards([row["prompt"]], [row["rejected"]])[0].rewards
    assert ours == pytest.approx(_plain_token_rewards(out, ex.input_ids, ex.response_start, ex.response_end),
                                 abs=1e-5)
    res = heldout_eval(out, data_dir, tmp_path)
    assert res["accuracy"] >= 0.85
    with pytest.raises(ConfigError, match="echo applies to token RMs"):
        train_cfg(data_dir, base_model, out, loss="sequence", token_view="echo")


def test_best_evaluation_is_kept_and_the_curve_recorded(data_dir, base_model, tmp_path):
    out = tmp_path / "best"
    kw = dict(loss="token_label", epochs=6, eval_data=str(data_dir / "heldout.jsonl"), eval_every=3, lr=1e-2)
    summary = train_reward_model(train_cfg(data_dir, base_model, out, **kw))
    meta = json.loads((out / "finegrain.json").read_text())
    curve = meta["eval_curve"]
    assert [c["step"] for c in curve] == list(range(3, summary["steps"] + 1, 3))
    best = min(curve, key=lambda c: (c["eval_loss"], c["step"]))
    assert meta["kept_step"] == best["step"] and meta["kept_by"] == "eval_loss"
    assert meta["eval_loss"] == best["eval_loss"] and not (out / "best").exists()
    # the saved weights are those of that evaluation: re-evaluating them gives its loss
    from finegrain.rm.data import featurize, load_comparisons
    from finegrain.rm.train import Objective, evaluate_pairs

    rm = RewardModel.load(str(out))
    feats, _, _ = featurize(rm.tokenizer, load_comparisons(str(data_dir / "heldout.jsonl"), "edit"), max_length=48)
    again = evaluate_pairs(rm.model, Objective("token_label"), feats, rm.tokenizer.pad_token_id, 16, "cpu")
    assert again["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-4)
    last = train_reward_model(train_cfg(data_dir, base_model, tmp_path / "last", keep="last", **kw))
    assert last["kept_step"] == last["steps"] and last["kept_by"] == "last"


def test_max_length_above_the_position_limit_is_clamped_with_one_warning(data_dir, base_model, tmp_path, caplog):
    import logging

    from finegrain.cli import main

    with caplog.at_level(logging.WARNING):
        summary = train_reward_model(train_cfg(data_dir, base_model, tmp_path / "rm", max_length=4096, epochs=1))
    assert summary["max_length"] == 64       # the tiny GPT-2 has 64 positions
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"--max-length 4096 is above the 64 positions of {base_model}; using 64"]
    res = evaluate_reward_model(build_config(EvalRMConfig, dict(model=str(tmp_path / "rm"), max_length=999,
                                data=str(data_dir / "heldout.jsonl"), output=str(tmp_path / "e.json"))))
    assert res["n_pairs"] == 40
    assert main(["eval-rm", "--model", str(tmp_path / "rm"), "--data", str(data_dir / "heldout.jsonl"),
                 "--output", str(tmp_path / "e2.json"), "--max-length", "5000"]) == 0


def test_defaults_not_given_are_recorded_as_used_and_cut_to_the_model_without_a_warning(data_dir, base_model,
                                                                                         tmp_path, caplog):
    """Without --lr and --max-length the summary and finegrain.json said "lr": null, and every run warned that
    "--max-length 1024 is above the 64 positions" though the user never gave it."""
    import logging

    cfg = build_config(TrainRMConfig, dict(data=str(data_dir / "train.jsonl"), model=str(base_model),
                                           output=str(tmp_path / "rm"), eval_fraction=0.0, epochs=0.25,
                                           save_every=0, log_with="none"))  # neither --lr nor --max-length
    with caplog.at_level(logging.WARNING):
        summary = train_reward_model(cfg)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    saved = json.loads((tmp_path / "rm" / "finegrain.json").read_text())
    assert summary["lr"] == saved["lr"] == saved["config"]["lr"] == 1e-5  # the default of a pretrained start
    assert summary["max_length"] == saved["config"]["max_length"] == 64  # the tiny GPT-2's positions


def test_a_from_scratch_size_given_with_pretrained_weights_is_refused_not_ignored(data_dir, base_model, tmp_path):
    from finegrain.errors import ConfigError

    with pytest.raises(ConfigError, match="--n-layer applies with --from-scratch"):
        train_cfg(data_dir, base_model, tmp_path, n_layer=4)
    assert train_cfg(data_dir, base_model, tmp_path, n_layer=4, from_scratch="decoder").n_layer == 4


def test_learning_rate_default_depends_on_the_start_and_underfitting_is_said(data_dir, base_model, tmp_path, caplog):
    import logging

    from finegrain.rm.train import warn_if_still_improving

    assert train_cfg(data_dir, base_model, tmp_path, lr=None).learning_rate == 1e-5
    assert train_cfg(data_dir, base_model, tmp_path, lr=None, from_scratch="encoder").learning_rate == 1e-3
    assert train_cfg(data_dir, base_model, tmp_path, lr=0.5, from_scratch="encoder").learning_rate == 0.5
    cfg = train_cfg(data_dir, base_model, tmp_path, lr=None)
    with caplog.at_level(logging.WARNING):
        assert warn_if_still_improving([{"eval_loss": 0.7}, {"eval_loss": 0.6}, {"eval_loss": 0.5}], cfg)
        assert not warn_if_still_improving([{"eval_loss": 0.7}, {"eval_loss": 0.5}, {"eval_loss": 0.6}], cfg)
        assert not warn_if_still_improving([{"eval_loss": 0.7}, {"eval_loss": 0.6}], cfg)
    assert [r.getMessage() for r in caplog.records] == [
        "the held-out loss was still falling at the last evaluation (0.7000 -> 0.6000 -> 0.5000): the reward model "
        "may be undertrained; raise --epochs or --lr (now 1e-05)"]


def test_truncation_never_marks_unchanged_tokens_as_changed(tiny_tokenizer):
    """Issue: the edit shifts where each side is cut, so aligning the CUT responses marks the unchanged tokens
    near the cut as U1. The alignment is made on the whole responses and then cut."""
    from finegrain.data.schema import Comparison
    from finegrain.rm.data import featurize

    tail = " Paris is a large city with many museums and old bridges over the river."
    worse, better = "It is awful." + tail, "It is lovely and very nice." + tail
    (f,), dropped, _ = featurize(tiny_tokenizer, [Comparison("p", "Describe Paris.", better, worse, None)],
                                 max_length=20, with_offsets=True)
    assert f.better.truncated and f.worse.truncated and dropped == 0
    # every U1 token of either side lies inside the edited words, none in the common tail
    for ex, marks, text, edited in ((f.worse, f.u1_worse, worse, "awful"), (f.better, f.u1_better, better,
                                                                              "lovely and very nice")):
        start, end = text.index(edited), text.index(edited) + len(edited)
        marked = [ex.response_offsets[k] for k, m in enumerate(marks) if m]
        assert marked and all(s < end and e > start for s, e in marked), (marked, text)
        assert not marks[-1]   # the closing token stands for the cut text, not for a change
    # the aligned unchanged pairs are the same tokens on both sides
    for j, i in f.u0_pairs:
        assert f.better.response_ids[j] == f.worse.response_ids[i]
    # the old way (aligning the cut ids) would have marked tail tokens: the regression this guards against
    from finegrain.rm.align import align_tokens

    old = align_tokens(f.worse.response_ids, f.better.response_ids).changed_original
    assert sum(old) > sum(f.u1_worse)


def test_best_keeper_ignores_nan_and_keeps_the_previous_best_through_a_crash(tmp_path):
    """--keep best: a NaN evaluation is never the best; a crash between offer()'s renames loses nothing."""
    import types

    from safetensors.torch import load_file

    from finegrain.rm.train import BestKeeper

    acc = types.SimpleNamespace(wait_for_everyone=lambda: None, unwrap_model=lambda m: m)
    model = torch.nn.Linear(2, 1)
    keeper = BestKeeper(tmp_path, "loss", resume=False, main_process=True)
    for step, loss in ((1, 0.3), (2, float("nan")), (3, 0.5), (4, 0.2)):
        with torch.no_grad():
            model.weight.fill_(step)
        keeper.offer(step, {"eval_loss": loss}, acc, model)
        kept = {1: 1, 2: 1, 3: 1, 4: 4}[step]  # 0.3 stays best through the NaN and the worse 0.5; 0.2 beats it
        assert keeper.record["step"] == kept and json.loads((tmp_path / "best" / "best.json").read_text())["step"] == kept
        assert load_file(str(tmp_path / "best" / "model.safetensors"))["weight"].unique().tolist() == [float(kept)]
    assert not (tmp_path / ".best.old").exists() and not (tmp_path / ".best.tmp").exists()
    # a crash after the old best was moved aside and before the new one took its place
    (tmp_path / "best").rename(tmp_path / ".best.old")
    resumed = BestKeeper(tmp_path, "loss", resume=True, main_process=True)
    assert resumed.record == {"step": 4, "metric": "eval_loss", "value": 0.2}
    assert (tmp_path / "best" / "model.safetensors").exists() and not (tmp_path / ".best.old").exists()


def test_skip_invalid_rejects_bad_held_out_records_into_their_own_file(data_dir, base_model, tmp_path):
    """--eval-data with --skip-invalid: its bad records are counted and kept in rejects_eval.jsonl, as --data's are."""
    from finegrain.models import load_tokenizer
    from finegrain.rm.train import prepare_data

    ev = tmp_path / "ev.jsonl"
    write_jsonl(ev, synthetic_pairs(4, seed=3, prefix="e"))
    with open(ev, "a", encoding="utf-8") as f:
        f.write('{"id": "no-responses", "prompt": "Describe the lamp."}\n')
    out = tmp_path / "out"
    out.mkdir()
    data = prepare_data(train_cfg(data_dir, base_model, out, eval_data=str(ev), skip_invalid=True),
                        load_tokenizer(str(base_model)))
    assert data.n_rejected == 1 and len(data.eval) == 4
    kept = (out / "rejects_eval.jsonl").read_text().splitlines()
    assert len(kept) == 1 and "no-responses" in kept[0]
    assert not (out / "rejects.jsonl").exists() or not (out / "rejects.jsonl").read_text().strip()
