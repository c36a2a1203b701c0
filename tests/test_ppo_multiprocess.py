"""The same PPO code under accelerate with 2 CPU processes: gradients synchronised (identical
weights on both ranks after the steps although each rank sampled different rollouts), and
metrics written by rank 0 only.

Launcher note (accelerate 1.15): `accelerate launch --cpu --num_processes 2` starts ONE process
unless an MPI hostfile is given (`--mpirun_hostfile`); on a machine without GPUs,
`accelerate launch --multi_gpu --num_processes 2` starts two torchrun processes that accelerate
runs as MULTI_CPU (gloo backend) when ACCELERATE_USE_CPU=true. The test uses the latter and
checks that two processes really ran.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from test_ppo_train import make_workspace

ROOT = Path(__file__).resolve().parents[1]

WORKER = r'''
import hashlib, json, sys
sys.path.insert(0, {tests!r})
import torch
from finegrain.config import build_config
from finegrain.ppo.config import PPOConfig
from finegrain.ppo.setup import load_models, preflight
from finegrain.ppo.train import train_ppo

torch.set_num_threads(1)
cfg = build_config(PPOConfig, json.loads(sys.argv[1]))
models = load_models(cfg, preflight(cfg))
seen = []
def on_rollout(step, prompts, responses):
    seen.append(list(prompts))
    return {{}}
train_ppo(cfg, models=models, on_rollout=on_rollout)
import os
rank = int(os.environ.get("RANK", "0"))  # set by accelerate launch (the process group is closed by now)
h = hashlib.sha256()
for m in (x for x in (models.policy, models.value_model) if x is not None):  # no value model when shared
    for name, p in sorted(m.state_dict().items()):
        h.update(name.encode()); h.update(p.detach().cpu().numpy().tobytes())
with open(f"{{cfg.output}}/rank{{rank}}.json", "w") as f:
    json.dump({{"hash": h.hexdigest(), "prompts": seen}}, f)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
# 1 minibatch: the first epoch backpropagates through the rollout's forward; shared: one backbone for policy and value;
# bf16 weights: the fp32 masters (copied once DDP has broadcast rank 0's fresh value head) step on gradients DDP
# reduced in bf16, accumulated over two micro-batches; and bf16 autocast over fp32 weights
@pytest.mark.parametrize("num_minibatches,value_init,extra", [
    (2, "policy", {}), (1, "policy", {}), (1, "shared", {}),
    (1, "policy", {"mixed_precision": "bf16", "param_dtype": "bf16", "grad_accum": 2}),
    (1, "policy", {"mixed_precision": "bf16"}), (1, "policy", {"sequence_reward_model": "seq_rm"})])
def test_two_processes_stay_in_sync(tmp_path, num_minibatches, value_init, extra):
    ws = make_workspace(tmp_path)
    if "sequence_reward_model" in extra:  # a second RM: its running statistics are over both ranks' scores
        from finegrain.models import save_checkpoint
        from test_ppo_train import tiny, word_tokenizer

        save_checkpoint(tmp_path / "seq_rm", tiny(word_tokenizer(), "sequence", 3), word_tokenizer(),
                        {"kind": "sequence"})
        extra = dict(extra, sequence_reward_model=str(tmp_path / "seq_rm"))
    out = tmp_path / "out"
    cfg = dict(ws, output=str(out), reward_mode="token", steps=2, batch_size=4, num_minibatches=num_minibatches,
               ppo_epochs=1 if num_minibatches == 2 else 2,
               max_new_tokens=4, max_prompt_length=16, temperature=1.0, lr=1e-2, value_init=value_init,
               save_every=2, sample_every=1, log_with="none", prompt_template="{prompt} :", **extra)
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(ROOT / "tests")))
    # TMPDIR: torchrun's torchelastic_* directories land under tmp_path, not in the machine's $TMPDIR
    env = dict(os.environ, FINEGRAIN_PROGRESS="0", PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1",
               ACCELERATE_USE_CPU="true", TMPDIR=str(tmp_path))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", extra.get("mixed_precision", "no"), "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(script), json.dumps(cfg)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["prompts"] != r1["prompts"]  # different rollouts on each rank ...
    assert r0["hash"] == r1["hash"]  # ... yet identical weights: gradients were synchronised
    from transformers import AutoModelForCausalLM

    import torch

    base = AutoModelForCausalLM.from_pretrained(ws["policy"]).state_dict()
    final = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert any(not torch.equal(base[k], final[k]) for k in base)  # and the weights did move
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2]  # rank 0 only: no duplicated lines
    assert rows[0]["response_tokens"] > 0
    assert (out / "checkpoints" / "step-00000002" / "rng_1.pt").exists()  # each rank's RNG state
    if "sequence_reward_model" in extra:  # 2 steps x 4 rollouts x 2 ranks: the scores were gathered
        state = json.loads((out / "checkpoints" / "step-00000002" / "state.json").read_text())
        assert state["sequence_moments"]["count"] == 16 and "sequence_score" in rows[0]
