"""End-to-end PPO on tiny models: the toy task learns in both reward modes, bad input is refused,
LoRA works without a second model copy, a SIGKILLed run resumes without losing or repeating steps.

The toy task: a word-level vocabulary of a few words; a hand-built token RM gives r_t = 1 to
the word "x" and 0 to every other token, so the best policy says "x" as often as it can.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finegrain.config import build_config
from finegrain.errors import ConfigError, InputError
from finegrain.models import save_checkpoint
from finegrain.scratch import tiny_gpt2_config
from finegrain.ppo.config import PPOConfig

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "x", "say", "many", "please"]
TARGET = "x"
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fixtures (also used by the
# multiprocess test's worker script, which imports this module)
def word_tokenizer(words=WORDS):
    """A word-level tokenizer (whitespace split) with EOS, pad and unk; offsets included."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<pad>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=128)


def tiny(tok, head: str, seed: int = 0, n_embd: int = 32):
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_gpt2_config(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, n_embd=n_embd,
                           n_positions=64)
    cls = {"causal": transformers.GPT2LMHeadModel, "token": transformers.GPT2ForTokenClassification,
           "sequence": transformers.GPT2ForSequenceClassification}[head]
    return cls(cfg).eval()  # dropout off, as PPO runs every model


def hand_token_rm(tok, target: str = TARGET, seed: int = 0):
    """A GPT-2 token RM whose r_t is 1 on ``target`` and 0 on every other token, set by hand.

    Attention and MLP output projections are zero, so the final hidden state is LN(wte[id]).
    wte[target] = u (alternating +-1: mean 0, std 1, so LN(u) = u); every other row is made
    orthogonal to u and to the all-ones vector (zero mean, so LN keeps it orthogonal to u).
    The head w = u / |u|^2 then gives w . LN(wte[id]) = 1 for the target and 0 otherwise
    (up to LN's eps: 1 / sqrt(1 + 1e-5)).
    """
    rm = tiny(tok, "token", seed)
    d = rm.config.n_embd
    with torch.no_grad():
        for block in rm.transformer.h:
            for lin in (block.attn.c_proj, block.mlp.c_proj):
                lin.weight.zero_()
                lin.bias.zero_()
        rm.transformer.wpe.weight.zero_()
        u = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(d)])
        ones = torch.ones(d) / d ** 0.5
        w = rm.transformer.wte.weight
        w -= (w @ ones).unsqueeze(1) * ones          # zero mean
        w -= (w @ u / (u @ u)).unsqueeze(1) * u     # orthogonal to u
        w /= w.std(dim=1, keepdim=True)
        w[tok.convert_tokens_to_ids(target)] = u
        rm.transformer.ln_f.weight.fill_(1.0)
        rm.transformer.ln_f.bias.zero_()
        rm.classifier.weight.copy_(u / (u @ u))
        rm.classifier.bias.zero_()
    return rm


def make_workspace(tmp: Path, *, rm_kind: str = "token", n_prompts: int = 16, policy_seed: int = 1) -> dict:
    """Policy, hand-set token RM (or a random sequence RM) and a prompt file under ``tmp``."""
    tok = word_tokenizer()
    save_checkpoint(tmp / "policy", tiny(tok, "causal", policy_seed), tok, {"kind": "policy"})
    rm = hand_token_rm(tok) if rm_kind == "token" else tiny(tok, "sequence", 3)
    save_checkpoint(tmp / "rm", rm, tok, {"kind": rm_kind})
    rows = [{"prompt": f"say many x please {WORDS[i % 8]}"} for i in range(n_prompts)]
    (tmp / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"policy": str(tmp / "policy"), "reward_model": str(tmp / "rm"), "prompts": str(tmp / "prompts.jsonl")}


def toy_config(ws: dict, out: Path, **over) -> PPOConfig:
    values = dict(ws, output=str(out), reward_mode="token", steps=4, batch_size=8, num_minibatches=2, ppo_epochs=2,
                  max_new_tokens=6, max_prompt_length=16, temperature=1.0, lr=3e-3, kl_coef=0.01,
                  missing_eos_penalty=None, value_init="policy", save_every=2, sample_every=2, log_with="none",
                  lr_schedule="constant", prompt_template="{prompt} :")
    values.update(over)
    return build_config(PPOConfig, values)


# ----------------------------------------------------------------------------- tests
def test_hand_built_rm_rewards_exactly_the_target(tmp_path):
    from finegrain.rm.scorer import rm_forward
    from finegrain.rm.inputs import build_rm_example

    tok = word_tokenizer()
    rm = hand_token_rm(tok)
    ex = build_rm_example(tok, "say x", "a x b x x", max_length=32)
    (r,) = rm_forward(rm, tok, [ex], "token", 4)
    expected = torch.tensor([0, 1, 0, 1, 1, 0.0])  # a x b x x <eos>
    assert torch.allclose(r, expected, atol=1e-4)


def _mean(rows, key, sl):
    vals = [m[key] for m in rows[sl]]
    return sum(vals) / len(vals)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_ppo_raises_toy_reward(tmp_path, mode):
    """Mean number of target tokens per response (max 6) rises clearly within 12 steps (both modes)."""
    from finegrain.ppo.train import train_ppo

    ws = make_workspace(tmp_path)
    def count_target(step, prompts, responses):  # the known truth, logged through the on_rollout hook
        return {"target_count": sum(r.split().count(TARGET) for r in responses) / len(responses)}

    cfg = toy_config(ws, tmp_path / "out", reward_mode=mode, steps=12, save_every=12, sample_every=6,
                     token_reward_scale="raw")
    summary = train_ppo(cfg, on_rollout=count_target)
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == list(range(1, 13)) and summary["steps"] == 12
    before, after = _mean(rows, "target_count", slice(0, 3)), _mean(rows, "target_count", slice(-3, None))
    print(f"RESULT toy_{mode}_target_count before={before:.3f} after={after:.3f} "
          f"tokens_per_s={_mean(rows, 'tokens_per_s', slice(None)):.1f}")
    assert after > before + 1.0, (before, after)
    assert _mean(rows, "reward", slice(-3, None)) > _mean(rows, "reward", slice(0, 3))
    for key in ("kl", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl", "explained_variance",
                "response_length", "eos_rate", "tokens_per_s", "time_generate", "time_score", "time_update",
                "kl_coef"):
        assert key in rows[-1], key
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    assert final.num_parameters() > 0
    samples = (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    assert {json.loads(s)["step"] for s in samples} == {6, 12}


def test_short_run_writes_everything_and_changes_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    from finegrain.ppo.train import train_ppo

    ws = make_workspace(tmp_path)
    cfg = toy_config(ws, tmp_path / "out", steps=2, grad_accum=2, kl_estimator="k3", adaptive_kl=True,
                     reward_norm=True, reward_clip=5.0, token_reward_scale="mean", missing_eos_penalty=0.5,
                     log_with="tensorboard")
    train_ppo(cfg)
    out = tmp_path / "out"
    assert list(out.rglob("events.out.tfevents.*")), "no TensorBoard event file"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2]
    assert rows[0]["kl_coef"] == pytest.approx(0.01) and rows[1]["kl_coef"] != rows[0]["kl_coef"]  # adaptive
    assert json.loads((out / "config.json").read_text())["kl_estimator"] == "k3"
    before = AutoModelForCausalLM.from_pretrained(ws["policy"]).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (out / "value" / "finegrain.json").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]  # keep 2, saved at 2 only


def test_lora_policy_uses_adapter_disabled_reference(tmp_path):
    from transformers import AutoModelForCausalLM

    from finegrain.ppo.train import train_ppo

    ws = make_workspace(tmp_path)
    cfg = toy_config(ws, tmp_path / "out", steps=2, use_lora=True, lora_r=4, lora_alpha=8,
                     lora_target_modules=["c_attn"], lr=1e-2)
    from finegrain.ppo.setup import load_models, preflight

    models = load_models(cfg, preflight(cfg))
    assert models.ref_policy is None  # no second copy of the policy: the reference is the adapter-disabled base
    train_ppo(cfg, models=models)
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # adapters start at zero: policy == reference
    assert abs(rows[1]["kl"]) > 1e-4  # ... and once they have moved the reference stays the base: KL is not 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")  # plain transformers
    base = AutoModelForCausalLM.from_pretrained(ws["policy"])
    w0, w1 = base.transformer.h[0].attn.c_attn.weight, merged.transformer.h[0].attn.c_attn.weight
    assert not torch.allclose(w0, w1)
    assert (tmp_path / "out" / "final_adapter" / "adapter_config.json").exists()


# ----------------------------------------------------------------------------- bad input
def _expect(tmp_path, exc, match, ws_kw=None, **over):
    from finegrain.ppo.train import train_ppo

    ws = make_workspace(tmp_path, **(ws_kw or {}))
    with pytest.raises(exc, match=match):
        train_ppo(toy_config(ws, tmp_path / "out", **over))


def test_refuses_empty_prompt_set(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _expect(tmp_path, InputError, "prompt set is empty", prompts=str(empty))


def test_refuses_missing_prompt_field(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a b"}\n{"text": "c"}\n')
    _expect(tmp_path, InputError, r"bad.jsonl: line 2: field 'prompt': is missing", prompts=str(p))


def test_refuses_prompt_without_room_for_response(tmp_path):
    p = tmp_path / "long.jsonl"
    p.write_text(json.dumps({"prompt": " ".join(["a"] * 70)}) + "\n")
    _expect(tmp_path, InputError, r"long.jsonl: prompt 1: field 'prompt': prompt is 71 tokens", prompts=str(p),
            max_prompt_length=200)


def test_refuses_sequence_rm_for_token_rewards(tmp_path):
    _expect(tmp_path, ConfigError, "needs a token-level reward model", ws_kw={"rm_kind": "sequence"},
            reward_mode="token")


def test_refuses_vocab_mismatch_without_cross_tokenizer(tmp_path):
    ws = make_workspace(tmp_path)
    other = word_tokenizer(WORDS + ["extra"])
    save_checkpoint(tmp_path / "rm2", hand_token_rm(other), other, {"kind": "token"})
    from finegrain.ppo.train import train_ppo

    with pytest.raises(ConfigError, match="--cross-tokenizer"):
        train_ppo(toy_config(ws, tmp_path / "out", reward_model=str(tmp_path / "rm2")))
    with pytest.raises(ConfigError, match="--value-init policy"):
        train_ppo(toy_config(ws, tmp_path / "out", reward_model=str(tmp_path / "rm2"), cross_tokenizer=True,
                             value_init="reward"))
    # the second RM is checked the same way, named by its flag
    with pytest.raises(ConfigError, match="tokenizer of --sequence-reward-model .*rm2 differs"):
        train_ppo(toy_config(ws, tmp_path / "out", sequence_reward_model=str(tmp_path / "rm2")))


def test_refuses_a_slow_tokenizer_for_a_cross_tokenizer_token_rm_in_either_mode(tmp_path, monkeypatch):
    """A token RM's r_t are mapped onto policy tokens by character offsets, which only fast tokenizers give:
    refused before any weight loads, as --reward-model (also in sequence mode) and as --sequence-reward-model."""
    import finegrain.ppo.setup as setup
    from finegrain.ppo.train import train_ppo

    class Slow:  # the RM's tokenizer, reporting no offsets
        is_fast = False

        def __init__(self, tok):
            self._tok = tok

        def __getattr__(self, name):
            return getattr(self._tok, name)

    ws = make_workspace(tmp_path)
    other = word_tokenizer(WORDS + ["extra"])
    save_checkpoint(tmp_path / "rm2", hand_token_rm(other), other, {"kind": "token"})
    real = setup.load_tokenizer
    monkeypatch.setattr(setup, "load_tokenizer", lambda path, **kw: Slow(real(path, **kw)) if "rm2" in str(path)
                        else real(path, **kw))
    kw = dict(cross_tokenizer=True, value_init="policy")
    for over in ({"reward_model": str(tmp_path / "rm2")},
                 {"reward_model": str(tmp_path / "rm2"), "reward_mode": "sequence"},
                 {"sequence_reward_model": str(tmp_path / "rm2")}):
        flag = "--sequence-reward-model" if "sequence_reward_model" in over else "--reward-model"
        with pytest.raises(ConfigError, match=f"a token RM \\({flag} .*rm2\\) needs a fast"):
            train_ppo(toy_config(ws, tmp_path / "out", **kw, **over))


def test_refuses_policy_without_eos(tmp_path):
    ws = make_workspace(tmp_path)
    tok = word_tokenizer()
    tok.eos_token = None
    tok.pad_token = "<pad>"
    save_checkpoint(tmp_path / "noeos", tiny(tok, "causal"), tok, {"kind": "policy"})
    from finegrain.ppo.train import train_ppo

    with pytest.raises(ConfigError, match="no EOS token"):
        train_ppo(toy_config(ws, tmp_path / "out", policy=str(tmp_path / "noeos"), cross_tokenizer=True))


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    ws = make_workspace(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = subprocess.run([sys.executable, "-m", "finegrain", "ppo", "--policy", ws["policy"], "--reward-model",
                           ws["reward_model"], "--reward-mode", "token", "--prompts", str(empty), "--output",
                           str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "prompt set is empty" in proc.stderr


# ----------------------------------------------------------------------------- resume after SIGKILL
def _cli(ws, out: Path, steps: int, resume: bool = False) -> list[str]:
    args = [sys.executable, "-m", "finegrain", "ppo", "--policy", ws["policy"], "--reward-model", ws["reward_model"],
            "--reward-mode", "token", "--prompts", ws["prompts"], "--output", str(out), "--steps", str(steps),
            "--batch-size", "4", "--num-minibatches", "2", "--ppo-epochs", "1", "--max-new-tokens", "4",
            "--max-prompt-length", "16", "--temperature", "1.0", "--lr", "1e-3", "--save-every", "2",
            "--sample-every", "1", "--log-with", "none", "--value-init", "policy", "--prompt-template", "{prompt} :",
            "--lr-schedule", "constant"]
    return args + (["--resume"] if resume else [])


@pytest.mark.slow
def test_sigkill_then_resume_gives_same_steps_and_metrics(tmp_path):
    """Kill after the step-2 (or later) checkpoint, resume: 8 steps, 8 lines, none duplicated,
    and the same numbers as an uninterrupted run (sampling and minibatch order depend only on the step)."""
    ws = make_workspace(tmp_path)
    steps = 8
    env = dict(os.environ, FINEGRAIN_PROGRESS="0", PYTHONPATH=str(ROOT / "src"))
    ref = subprocess.run(_cli(ws, tmp_path / "ref", steps), env=env, cwd=ROOT, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    assert "Removed shared tensor" not in ref.stderr  # accelerate's note on the tied LM head at every checkpoint
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(ws, out, steps), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    metrics = out / "metrics.jsonl"
    while time.time() < deadline:  # a checkpoint exists and a later step has started writing
        ck = out / "checkpoints"
        done = ck.is_dir() and any(p.name.startswith("step-") for p in ck.iterdir())
        if done and metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines_at_kill = len(metrics.read_text().splitlines())
    assert lines_at_kill < steps, "the run finished before it could be killed"
    res = subprocess.run(_cli(ws, out, steps, resume=True), env=env, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert 2 <= json.loads(res.stdout)["resumed_from"] <= lines_at_kill  # from the last checkpoint, not step 0
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == list(range(1, steps + 1))
    for a, b in zip(rows, ref_rows):
        for key in ("reward", "kl", "policy_loss", "value_loss", "response_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    samples = [json.loads(x)["step"] for x in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted(set(samples)) == list(range(1, steps + 1)) and len(samples) == len(set(samples)) * 4


def test_resume_restores_the_kl_controller_reward_statistics_and_optimizer(tmp_path):
    """Resumed from its step-1 checkpoint (the format every trainer writes), a run's steps 2 and 3 are the
    uninterrupted run's: the adaptive KL coefficient, the running moments of both reward models (--reward-norm's
    and --sequence-reward-model's), the optimizer state, the
    accumulation phase and the RNG come back. A resume over other prompts is refused."""
    import shutil

    from finegrain.ppo.train import train_ppo

    ws = make_workspace(tmp_path)
    save_checkpoint(tmp_path / "seq_rm", tiny(word_tokenizer(), "sequence", 3), word_tokenizer(), {"kind": "sequence"})
    kw = dict(steps=3, batch_size=4, grad_accum=2, adaptive_kl=True, reward_norm=True, save_every=1,
              keep_checkpoints=3, lr_schedule="linear", sequence_reward_model=str(tmp_path / "seq_rm"))
    full = tmp_path / "full"
    train_ppo(toy_config(ws, full, **kw))
    ckpt = full / "checkpoints" / "step-00000001"
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "optimizer.bin", "rng_0.pt", "state.json"]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 1 and state["reward_moments"]["count"] > 0 and state["kl_controller"]["value"] > 0
    assert state["sequence_moments"]["count"] == 4  # --sequence-reward-model's: one step of 4 scores
    crashed = tmp_path / "crashed"
    shutil.copytree(ckpt, crashed / "checkpoints" / ckpt.name)
    ref = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    (crashed / "metrics.jsonl").write_text(json.dumps(ref[0]) + "\n")
    assert train_ppo(toy_config(ws, crashed, resume=True, **kw))["resumed_from"] == 1
    rows = [json.loads(x) for x in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2, 3] and rows[1]["kl_coef"] != rows[0]["kl_coef"]
    for a, b in zip(rows[1:], ref[1:]):
        for key in ("kl_coef", "reward", "sequence_score", "total_reward", "kl", "policy_loss", "value_loss",
                    "response_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"prompt": f"say few x {i}"}) + "\n" for i in range(16)))
    with pytest.raises(ConfigError, match="cannot resume from .*the prompts differ"):
        train_ppo(toy_config(dict(ws, prompts=str(other)), crashed, resume=True, **dict(kw, steps=4)))
    # the second RM may move, not go: its statistics are part of the run
    with pytest.raises(ConfigError, match="--sequence-reward-model is False here but was True"):
        train_ppo(toy_config(ws, crashed, resume=True, **dict(kw, sequence_reward_model=None)))


@pytest.mark.parametrize("scale", ["mean", "prefix"])
def test_cross_tokenizer_run_keeps_each_responses_eq1_reward(tmp_path, tiny_tokenizer, scale):
    """Policy (word-level) and RM (byte-level BPE) tokenise differently: with --token-reward-scale mean
    or prefix the per-token rewards of every sampled response sum to the RM's Eq. 1 score of that response."""
    from conftest import make_tiny_model

    from finegrain.ppo.train import train_ppo

    ws = make_workspace(tmp_path)
    save_checkpoint(tmp_path / "bpe_rm", make_tiny_model(tiny_tokenizer, "token", seed=9), tiny_tokenizer,
                    {"kind": "token"})
    cfg = toy_config(ws, tmp_path / "out", reward_model=str(tmp_path / "bpe_rm"), cross_tokenizer=True, steps=2,
                     sample_every=1, num_samples=8, token_reward_scale=scale, kl_coef=0.0)
    train_ppo(cfg)
    samples = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16
    for s in samples:
        assert len(s["token_rewards"]) == s["length"]
        assert sum(s["token_rewards"]) == pytest.approx(s["score"], abs=2e-3)


def test_a_cross_tokenizer_sequence_reward_model_scores_the_decoded_response(tmp_path, tiny_tokenizer):
    """--sequence-reward-model with another tokenizer (--cross-tokenizer; the token RM shares the policy's): each
    sample's sequence_score is what the RM's own scoring API gives its prompt and decoded response."""
    from conftest import make_tiny_model

    from finegrain.ppo.train import train_ppo
    from finegrain.rm.model import RewardModel

    ws = make_workspace(tmp_path)
    seq_rm = make_tiny_model(tiny_tokenizer, "sequence", seed=5)
    save_checkpoint(tmp_path / "bpe_seq", seq_rm, tiny_tokenizer, {"kind": "sequence"})
    cfg = toy_config(ws, tmp_path / "out", sequence_reward_model=str(tmp_path / "bpe_seq"), cross_tokenizer=True,
                     steps=1, sample_every=1, num_samples=8)
    train_ppo(cfg)
    samples = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    rm = RewardModel(seq_rm.eval(), tiny_tokenizer, "sequence", template=cfg.prompt_template,
                     max_length=cfg.max_prompt_length + cfg.max_new_tokens + 1)
    expected = rm.score([x["prompt"] for x in samples], [x["response"] for x in samples])
    assert len(samples) == 8 and len(set(expected)) > 1
    assert [x["sequence_score"] for x in samples] == pytest.approx(expected, abs=1e-4)


def test_sequence_rm_run_with_value_model_from_the_rm(tmp_path):
    """A sequence RM in sequence mode; the value model takes the RM's backbone (its head is new)."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    from finegrain.ppo.train import train_ppo

    ws = make_workspace(tmp_path, rm_kind="sequence")
    train_ppo(toy_config(ws, tmp_path / "out", reward_mode="sequence", value_init="reward", steps=1, lr=1e-3))
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and "token_reward_sum" not in rows[0]
    rm = AutoModelForSequenceClassification.from_pretrained(ws["reward_model"])
    value = AutoModelForTokenClassification.from_pretrained(tmp_path / "out" / "value")
    # initialised from the RM's backbone, then trained one step with lr 1e-3: still close to it
    w_rm, w_v = rm.transformer.wte.weight, value.transformer.wte.weight
    assert (w_rm - w_v).abs().max() < 0.05 and not torch.equal(w_rm, w_v)


def test_a_sequence_reward_model_adds_its_standardised_score_at_the_last_token(tmp_path, monkeypatch):
    """--sequence-reward-model beside a token RM: each step adds coef x (s - mean) / std of the second RM's
    scores s, with the running mean and std of every score so far (step 2's over both steps' 16), to the
    token rewards; the scores reach metrics.jsonl and samples.jsonl. A coef without the model is refused."""
    import finegrain.ppo.train as train

    tok = word_tokenizer()
    ws = make_workspace(tmp_path)
    save_checkpoint(tmp_path / "seq_rm", tiny(tok, "sequence", 3), tok, {"kind": "sequence"})
    seen = []
    real = train.process_rewards

    def spy(r, rm, kl_coef, s, moments=None, whole=None):
        seen.append((r.sequence_scores.clone(), whole.clone()))
        return real(r, rm, kl_coef, s, moments, whole)

    monkeypatch.setattr(train, "process_rewards", spy)
    cfg = toy_config(ws, tmp_path / "out", steps=2, sample_every=1, num_samples=8,
                     sequence_reward_model=str(tmp_path / "seq_rm"), sequence_reward_coef=0.5)
    train.train_ppo(cfg)
    assert len(seen) == 2
    so_far = torch.cat([seen[0][0], seen[1][0]]).double()
    for step, (scores, whole) in enumerate(seen):
        pool = so_far[: 8 * (step + 1)]
        mean, std = pool.mean(), pool.var(unbiased=False).sqrt()
        assert scores.std() > 0  # a random RM: the scores differ, so the term is not a constant
        torch.testing.assert_close(whole.double(), 0.5 * (scores.double() - mean) / std, atol=1e-5, rtol=1e-5)
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [round(m["sequence_score"], 5) for m in rows] == [round(float(sc.mean()), 5) for sc, _ in seen]
    samples = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [x["sequence_score"] for x in samples[:8]] == pytest.approx(seen[0][0].tolist(), abs=1e-6)
    with pytest.raises(ConfigError, match="--sequence-reward-coef 2.0 weighs --sequence-reward-model's score"):
        toy_config(ws, tmp_path / "other", sequence_reward_coef=2.0)


def test_bf16_autocast_matches_fp32_first_step(tmp_path):
    """Mixed precision changes speed, not the algorithm: same seed, same first rollout within bf16 error."""
    import yaml

    ws = make_workspace(tmp_path)
    rows = {}
    for mp in ("no", "bf16"):  # accelerate fixes the precision once per process: one subprocess each
        out = tmp_path / f"out-{mp}"
        cfg = toy_config(ws, out, steps=1, mixed_precision=mp, ppo_epochs=1, num_minibatches=1)
        (tmp_path / f"{mp}.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
        subprocess.run([sys.executable, "-m", "finegrain", "ppo", "--config", str(tmp_path / f"{mp}.yaml")],
                       check=True, capture_output=True, cwd=tmp_path)
        rows[mp] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    a, b = rows["no"], rows["bf16"]
    assert b["reward"] == pytest.approx(a["reward"], abs=0.3)  # same prompts and seed; sampling may flip a token
    assert abs(b["kl"] - a["kl"]) < 0.05 and abs(b["entropy"] - a["entropy"]) < 0.1
    # one epoch on fresh rollouts: the policy ratio starts at 1 under bf16 too
    assert b["approx_kl"] < 1e-2 and b["clipfrac"] < 0.2


def test_reuses_rollout_forward_only_with_one_minibatch_of_the_whole_batch(tmp_path):
    from finegrain import speed
    from finegrain.speed import reuses_rollout_forward

    ws = make_workspace(tmp_path)
    assert reuses_rollout_forward(toy_config(ws, tmp_path, num_minibatches=1))
    assert reuses_rollout_forward(toy_config(ws, tmp_path, mini_batch_size=8))
    assert not reuses_rollout_forward(toy_config(ws, tmp_path, num_minibatches=2))
    assert not reuses_rollout_forward(toy_config(ws, tmp_path, num_minibatches=1, grad_accum=2))
    with speed.overrides(reuse_rollout_forward=False):  # the switch turns it off everywhere
        assert not reuses_rollout_forward(toy_config(ws, tmp_path, num_minibatches=1))


@pytest.mark.parametrize("use_lora", [False, True])
def test_first_epoch_through_the_rollouts_forward_is_the_same_run(tmp_path, monkeypatch, use_lora):
    """One minibatch per epoch: backpropagating through the rollout's forward saves one policy+value pass per
    step and changes nothing else (same metrics, same weights as running the first epoch's forward again)."""
    from transformers import AutoModelForCausalLM

    from finegrain import speed
    from finegrain.ppo import train
    from finegrain.ppo.rollout import PolicyAndValue

    ws = make_workspace(tmp_path)
    calls = []
    forward = PolicyAndValue.forward
    monkeypatch.setattr(PolicyAndValue, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    over = dict(steps=2, num_minibatches=1, ppo_epochs=2, save_every=10, sample_every=10)
    if use_lora:
        over.update(use_lora=True, lora_r=4, lora_alpha=8, lora_target_modules=["c_attn"], lr=1e-2)
    runs = {}
    for reuse in (True, False):
        calls.clear()
        out = tmp_path / f"out-{reuse}"
        with speed.overrides(reuse_rollout_forward=reuse):
            train.train_ppo(toy_config(ws, out, **over))
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[reuse] = (len(calls), rows, AutoModelForCausalLM.from_pretrained(out / "final").state_dict())
    (n_reuse, rows_reuse, w_reuse), (n_plain, rows_plain, w_plain) = runs[True], runs[False]
    assert (n_reuse, n_plain) == (2 * 2, 2 * (2 + 1))  # steps x epochs, plus one rollout pass per step without
    for a, b in zip(rows_reuse, rows_plain):
        for key in ("reward", "kl", "entropy", "value_mean", "advantage_mean", "policy_loss", "value_loss",
                    "approx_kl", "clipfrac"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert max((w_reuse[k] - w_plain[k]).abs().max().item() for k in w_reuse) < 1e-5
    base = AutoModelForCausalLM.from_pretrained(ws["policy"]).state_dict()
    assert any(not torch.equal(base[k], w_reuse[k]) for k in base)  # and the run did train


def test_attached_forward_takes_ids_made_in_inference_mode_and_reaches_both_models():
    from finegrain.ppo.rollout import PolicyAndValue, attached_forward

    tok = word_tokenizer()
    model = PolicyAndValue(tiny(tok, "causal", 1), tiny(tok, "token", 2))
    with torch.inference_mode():  # e.g. a sampler that runs under inference_mode
        q = torch.tensor([[1, 3, 4], [5, 6, 7]])
        q_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
        r, r_mask = torch.tensor([[8, 0], [9, 10]]), torch.tensor([[1, 1], [1, 1]])
    attached, detached = attached_forward(model, q, q_mask, r, r_mask, 1.0, "cpu")
    assert torch.equal(detached["logprobs"], attached.logprobs.detach())
    assert not detached["logprobs"].requires_grad and detached["entropy"].shape == (2, 2)
    (attached.logprobs.sum() + attached.values.sum()).backward()
    for part in (model.policy, model.value_model):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_rollouts_are_plain_data_and_the_update_spends_the_rollouts_forward(tmp_path):
    """The rollout's forward kept for the first minibatch travels beside the Rollout, never on it, and the
    update lets go of it; with the switch off there is none."""
    from finegrain import speed
    from finegrain.ppo.rollout import Rollout
    from finegrain.ppo.setup import load_models, preflight
    from finegrain.ppo.train import build_engine, make_accelerator, ppo_update, rollout_step

    assert "attached" not in {f.name for f in dataclasses.fields(Rollout)}
    ws = make_workspace(tmp_path)
    cfg = toy_config(ws, tmp_path / "out", num_minibatches=1)
    run = preflight(cfg)
    acc = make_accelerator(cfg)
    e = build_engine(cfg, run, load_models(cfg, run, acc.device.type), acc)
    r, _, attached = rollout_step(e, 0)
    tensors = [v for v in vars(r).values() if isinstance(v, torch.Tensor)]
    assert len(tensors) >= 12 and not any(t.requires_grad or t.is_inference() for t in tensors)
    assert attached.logprobs.requires_grad and torch.equal(attached.logprobs.detach(), r.logprobs)
    ppo_update(acc, e.model, e.optimizer, r, cfg, 0, attached)
    assert attached.logprobs is None and attached.values is None  # spent: nothing holds its graph
    with pytest.raises(ValueError, match="spent"):
        ppo_update(acc, e.model, e.optimizer, r, cfg, 0, attached)
    with speed.overrides(reuse_rollout_forward=False):
        assert rollout_step(e, 1)[2] is None


def test_an_encoder_reward_model_scores_ppo_but_cannot_initialise_the_value_model(tmp_path):
    """A BERT token RM on the policy's tokenizer: its rewards see the whole response (fine for rewards), but a
    value model must be causal, so --value-init reward is refused and --value-init policy runs."""
    from transformers import BertConfig, BertForTokenClassification

    from finegrain.ppo.setup import preflight
    from finegrain.ppo.train import train_ppo

    ws = make_workspace(tmp_path)
    tok = word_tokenizer()
    torch.manual_seed(0)
    bert = BertForTokenClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=64, num_labels=1,
                                                 max_position_embeddings=64, pad_token_id=tok.pad_token_id))
    save_checkpoint(tmp_path / "bert_rm", bert.eval(), tok, {"kind": "token"})
    ws["reward_model"] = str(tmp_path / "bert_rm")
    with pytest.raises(ConfigError, match="a value model must not see the future; use --value-init policy"):
        preflight(toy_config(ws, tmp_path / "x", value_init="reward"))
    summary = train_ppo(toy_config(ws, tmp_path / "out", steps=2, sample_every=1, num_samples=8))
    assert summary["steps"] == 2
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and len(samples) == 16  # every rollout of both steps (batch size 8) is logged
    for step, m in enumerate(lines, 1):
        scores = [s["score"] for s in samples if s["step"] == step]
        assert m["reward"] == pytest.approx(sum(scores) / len(scores), rel=1e-6)
    # the BERT's own Eq. 1 score (mean r_t over the response and its closing EOS) of each logged sample whose
    # text gives back its tokens (a sampled pad or unk is dropped from the text: those are left out)
    checked = 0
    for s in samples:
        words = s["response"].split()
        if len(words) != s["length"] - s["ended"]:
            continue
        p_ids = tok(s["prompt"] + " :", add_special_tokens=False)["input_ids"]  # toy_config's template
        ids = p_ids + tok.convert_tokens_to_ids(words) + [tok.eos_token_id]
        with torch.no_grad():
            r_t = bert(input_ids=torch.tensor([ids])).logits[0, len(p_ids):, 0]
        assert s["score"] == pytest.approx(r_t.mean().item(), abs=1e-5)
        checked += 1
    assert checked >= 4


def test_an_echo_reward_model_is_read_with_its_view_in_ppo(tmp_path):
    """An RM saved with token_view echo: PPO builds the doubled input from the policy's ids."""
    from finegrain.ppo.setup import preflight

    ws = make_workspace(tmp_path)
    meta = json.loads((tmp_path / "rm" / "finegrain.json").read_text())
    (tmp_path / "rm" / "finegrain.json").write_text(json.dumps(dict(meta, token_view="echo")))
    run = preflight(toy_config(ws, tmp_path / "x"))
    assert run.rm_view == "echo" and run.rm_max_length == 16 + 2 * (6 + 1)
    from finegrain.ppo.train import train_ppo

    summary = train_ppo(toy_config(ws, tmp_path / "out", steps=2))
    assert summary["steps"] == 2


def test_only_the_tied_lm_head_note_is_dropped_from_accelerates_save_warnings():
    import logging

    from finegrain.training import _TiedWeightsNote

    def kept(msg):
        return _TiedWeightsNote().filter(logging.LogRecord("accelerate.utils.other", logging.WARNING, "", 0, msg,
                                                           None, None))

    note = "[RANK 0] Removed shared tensor {%s} while saving. This should be OK, but check ..."
    assert not kept(note % "'policy.lm_head.weight'") and not kept(note % "'lm_head.weight'")
    assert kept(note % "'policy.lm_head.weight', 'encoder.proj.weight'")  # another shared tensor: still said
    assert kept("something else")
