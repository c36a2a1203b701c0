"""The benchmark's FLOP model (the numerator of ppo_mfu), checked against hand-computed numbers."""
from __future__ import annotations

import importlib
import sys
from dataclasses import replace
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench_run():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("run")
    finally:
        sys.path.remove(str(BENCH))


def test_train_flops_per_token_by_hand(bench_run):
    common = importlib.import_module("common")
    # 6 N + 12 L d T: 6 * 100 + 12 * 2 * 4 * 24 = 600 + 2304
    assert common.train_flops_per_token(100, 2, 4, 24) == 2904.0


def test_update_flops_counts_the_lm_head_only_where_logits_are_kept(bench_run):
    s = replace(bench_run.QUICK, response_length=4, ppo_epochs=3, batch_size=2)
    peak = {"lm_head_params": 10, "policy_matmul_params": 110, "value_matmul_params": 100, "n_layer": 2, "n_embd": 4}
    # T = 20 + 4 = 24; per token 6 N + 12 L d T = 6 N + 2304
    policy = 24 * (6 * 100 + 2304) + (4 + 1) * 6 * 10  # backbone on all 24 positions, LM head on 5
    value = 24 * (6 * 100 + 2304)
    two = replace(s, num_minibatches=2)  # every epoch's forward and backward in the update phase
    assert bench_run.update_flops(20, peak, two) == 3 * 2 * (policy + value) == 838152
    # one minibatch: the first epoch's forward (a third of 6 N + 12 L d T) runs in the rollout
    assert bench_run.update_flops(20, peak, s) == pytest.approx((3 - 1 / 3) * 2 * (policy + value)) == 745024
    # a wider prompt adds backbone work only
    wider = bench_run.update_flops(21, peak, two) - bench_run.update_flops(20, peak, two)
    assert wider == 3 * 2 * ((25 * (600 + 12 * 2 * 4 * 25) - 24 * 2904) * 2)
