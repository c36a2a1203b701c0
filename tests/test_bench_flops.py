"""The benchmark's FLOP model (the numerator of ppo_mfu), checked against hand-computed numbers."""
from __future__ import annotations

import importlib
from dataclasses import replace

import pytest


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


# ----------------------------------------------------------------------------- cost curves and the real arm
def test_mfu_divides_each_updates_flops_by_the_peak_its_own_process_probed_in_its_own_precision(bench_run):
    s = replace(bench_run.QUICK, response_length=4, ppo_epochs=3, batch_size=2, num_minibatches=2, warmup_steps=1)
    peak = {"lm_head_params": 10, "policy_matmul_params": 110, "value_matmul_params": 100, "n_layer": 2, "n_embd": 4,
            "fp32_flops": 1e6, "bf16_flops": 9e6}  # the separate probe: only quoted, never the divisor
    flops = 838152  # bench_run.update_flops(20, peak, s), checked by hand above
    run = {"name": "fg_seq_bf16", "peak_dtype": "bf16", "query_widths": [20, 20, 20],
           "peak_after_step": [4e6, 2e6, 3e6],  # probed after steps 0, 1, 2
           "metrics": [{"time_update": 9.0}, {"time_update": 0.5}, {"time_update": 0.25}]}
    state = {"ppo_runs": [run]}
    mfu, text = bench_run.mfu_of("fg_seq_bf16", "bf16", s, peak, state)
    # step 0 is the warm-up; step i is divided by the larger of the probes just before and after it
    per_step = [flops / 0.5 / 4e6, flops / 0.25 / 3e6]
    assert state["mfu"]["fg_seq_bf16"]["per_step"] == pytest.approx(per_step)
    assert mfu == pytest.approx(sum(per_step) / 2)
    assert text.startswith("update-phase FLOP/s") and "bf16 matmul peak" in text and "over 2 steps" in text
    with pytest.raises(bench_run.BenchFailed, match="probed the bf16 matmul peak, not the fp32 one"):
        bench_run.mfu_of("fg_seq_bf16", "fp32", s, peak, state)
    assert bench_run.PPO_ARMS["fg_seq_bf16"][2]["peak_probe_dtype"] == "bf16"
    assert bench_run.PPO_ARMS["fg_seq"][2]["peak_probe_dtype"] == "fp32"


def test_growth_exponent_fit_table_and_plot(bench_run, tmp_path):
    curves = importlib.import_module("curves")
    # step time = 0.5 s + 0.01 s per token: below linear (the fixed cost weighs at short lengths)
    rows = [{"model": "tiny", "length": n, "batch": 16, "system": s,
             "step_s": (0.5 + 0.01 * n) * (2 if s == "trl" else 1), "peak_rss_gb": 1.0 + n / 1000}
            for n in curves.SWEEPS["tiny"].lengths for s in ("finegrain", "trl")]
    # the batch sweep at length 32: batch 8 and 32 beside the shared corner (32, 16), linear in the batch
    rows += [{"model": "tiny", "length": 32, "batch": b, "system": s, "step_s": 0.82 * b / 16 * (2 if s == "trl" else 1),
              "peak_rss_gb": 1.0} for b in (8, 32) for s in ("finegrain", "trl")]
    ex = curves.exponents(rows)
    # the least-squares log-log slope through (32, 0.82), (64, 1.14), (128, 1.78), (256, 3.06), computed apart
    assert ex["tiny_length_finegrain"] == pytest.approx(0.6342, abs=1e-3)
    assert ex["tiny_length_trl"] == pytest.approx(ex["tiny_length_finegrain"])  # a constant factor: same growth
    assert ex["tiny_batch_finegrain"] == pytest.approx(1.0) and ex["tiny_batch_trl"] == pytest.approx(1.0)
    assert curves.fit_exponent([8, 16, 32], [1.0, 4.0, 16.0]) == pytest.approx(2.0)
    table = curves.table(rows)
    assert "| tiny | 256 | 16 | 3.06 | 6.12 | 2.00 | 1.26 | 1.26 |" in table
    assert table.count("| tiny | 32 | 16 |") == 1  # the shared corner is one line
    png = curves.plot(rows, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_real_arms_pair_every_finegrain_arm_with_trl_in_the_same_setting(bench_run):
    arms = bench_run.real_arms(bench_run.REAL)
    assert len(arms) == 8
    for name, (task, extra) in arms.items():
        if task == "fg_ppo":
            peer = arms[name.replace("fg_", "trl_", 1)][1]
            assert {k: v for k, v in extra.items() if k != "reward_mode"} == peer
    assert arms["trl_lora_bf16"][1] == {"mixed_precision": "bf16", "use_lora": True, "lora_r": 16, "lora_alpha": 32,
                                        "lora_target_modules": ["q_proj", "v_proj"]}
    with_before = bench_run.real_arms(bench_run.REAL, before_after=True)
    assert with_before["fg_lora_bf16_no_frozen_low_precision"][1]["speed"] == {"frozen_low_precision": False}
    assert with_before["fg_lora_bf16_no_merged_lora_sampling"][1]["speed"] == {"merge_lora_sampling": False}
    assert "fg_full_bf16_no_merged_lora_sampling" not in with_before  # a path for LoRA only
    assert with_before["fg_full_bf16_no_heap_large_blocks"][1]["speed"] == {"heap_large_blocks": False}
    assert with_before["fg_lora_bf16_no_sdpa_sampling"][1]["speed"] == {"sdpa_sampling": False}
    assert len(with_before) == 8 + 7  # the bf16 finegrain arms, each without the paths that act in it
    one = bench_run.real_arms(bench_run.REAL, before_after=("no_merged_lora_sampling",), which=("full_bf16", "lora_bf16"))
    assert sorted(one) == ["fg_full_bf16", "fg_lora_bf16", "fg_lora_bf16_no_merged_lora_sampling", "trl_full_bf16",
                           "trl_lora_bf16"]
    shared = bench_run.real_arms(bench_run.REAL, which=("full_bf16", "lora_fp32"), variants=("shared", "weights"))
    assert sorted(shared) == ["fg_full_bf16", "fg_full_bf16_shared", "fg_full_bf16_weights", "fg_lora_fp32",
                              "trl_full_bf16", "trl_lora_fp32"]
    assert shared["fg_full_bf16_shared"][1] == dict(shared["fg_full_bf16"][1], value_init="shared")
    assert shared["fg_full_bf16_weights"][1] == dict(shared["fg_full_bf16"][1], param_dtype="bf16")
    plain = bench_run.PPO_ARMS["fg_seq_bf16"]
    for arm, option in (("fg_shared_bf16", {"value_init": "shared"}), ("fg_weights_bf16", {"param_dtype": "bf16"})):
        tiny = bench_run.PPO_ARMS[arm]  # the same run but the one option
        assert tiny[:2] == plain[:2] and tiny[2] == dict({k: v for k, v in plain[2].items() if not k.startswith("peak_probe")},
                                                         **option)
    some = bench_run.real_arms(bench_run.REAL, before_after=True, which=("lora_bf16",))
    assert sorted(some) == ["fg_lora_bf16", "fg_lora_bf16_no_frozen_low_precision", "fg_lora_bf16_no_heap_large_blocks",
                            "fg_lora_bf16_no_merged_lora_sampling", "fg_lora_bf16_no_sdpa_sampling", "trl_lora_bf16"]


def test_policy_with_length_forces_the_response_length_without_copying_weights(bench_run, tmp_path):
    import json

    common = importlib.import_module("common")
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "model.safetensors").write_bytes(b"weights")
    (policy / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "min_new_tokens": 32}))
    name = common.policy_with_length(tmp_path, 128)
    out = tmp_path / name
    assert name == "policy_L128" and (out / "model.safetensors").is_symlink()
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": 2, "min_new_tokens": 128}
    assert common.policy_with_length(tmp_path, 128) == name  # made once


def test_gemm_ceiling_times_every_linear_layer_of_the_benchmark_model(bench_run):
    """The ceiling script's layer list is the benchmark GPT-2's own linear layers (every distinct shape, the
    tied LM head included), and its combined rate is total FLOPs over the summed times of the three products."""
    common = importlib.import_module("common")
    ceiling = importlib.import_module("gemm_ceiling")
    from finegrain.scratch import tiny_gpt2_config
    from transformers import GPT2LMHeadModel

    spec = common.ModelSpec(vocab=64, n_layer=1, n_head=2, n_embd=16)
    model = GPT2LMHeadModel(tiny_gpt2_config(spec.vocab, n_embd=spec.n_embd, n_layer=spec.n_layer,
                                             n_head=spec.n_head, n_positions=32))
    found = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if w is not None and w.dim() == 2 and "wpe" not in name and "wte" not in name:
            key = name.split(".", 3)[-1] if name.startswith("transformer.h.") else name
            # GPT-2's Conv1D stores (in, out), nn.Linear (out, in)
            found[key] = tuple(w.shape) if type(mod).__name__ == "Conv1D" else tuple(w.shape[::-1])
    assert found == {name: (k, n) for name, k, n in ceiling.linear_shapes(spec)}
    c = ceiling.ceiling(rows=8, precision="fp32", seconds=0.01, spec=spec)
    flops = sum(3 * 2.0 * 8 * k * n for _, k, n in ceiling.linear_shapes(spec))
    secs = sum(2.0 * 8 * k * n / r for (_, k, n), got in zip(ceiling.linear_shapes(spec), c["layers"].values())
               for r in got.values())
    assert c["combined_flops"] == pytest.approx(flops / secs)
    assert c["ceiling_mfu"] == pytest.approx(c["combined_flops"] / c["peak_flops"]) and c["peak_flops"] > 0


def test_rounds_rotate_the_order_and_an_empty_set_of_arms_runs_nothing(bench_run):
    """`--real-arms rm` leaves no PPO arm: its rounds must run nothing, not divide by zero."""
    assert [bench_run.rotated(["a", "b", "c"], r) for r in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert bench_run.rotated([], 3) == []
    assert bench_run.real_arms(bench_run.REAL, which=()) == {}


def test_real_figures_are_the_ratios_of_the_arms_tokens_per_s_and_a_failed_arm_is_nan_with_its_reason(
        bench_run, tmp_path, monkeypatch):
    """bench_real's arithmetic on a fake worker: each figure is the median over rounds of one arm's tokens/s over
    its peer's (steps after the warm-up), with peak RSS beside it; a failed arm gives nan and says why."""
    speeds = {"fg_full_bf16": 40.0, "trl_full_bf16": 20.0, "fg_full_bf16_weights": 30.0,
              "fg_full_bf16_no_heap_large_blocks": 32.0}

    def fake_worker(task, assets, logs, tag, **kw):
        arm = tag[len("real_"):tag.rindex("_")]
        if arm == "fg_full_bf16_shared":
            raise bench_run.BenchFailed("shared arm broke")
        # 4 steps, the first two the warm-up: then 2 s for 2 x tokens_per_step, so tokens/s = tokens_per_step
        return {"step_s": [9.0, 5.0, 1.0, 1.0], "response_tokens_per_step": speeds[arm],
                "peak_rss_gb": speeds[arm] / 10, "process_peak_rss_gb": speeds[arm] / 10}

    monkeypatch.setattr(bench_run, "worker", fake_worker)
    monkeypatch.setattr(bench_run, "build_in_child", lambda *a, **k: None)
    s = replace(bench_run.QUICK, real_rounds=2, real_arms=("full_bf16",), real_variants=("weights", "shared"),
                real_before_after=("no_heap_large_blocks",))
    out = bench_run.bench_real(s, tmp_path / "assets", tmp_path, {})
    assert out["real_ppo_speedup_full_bf16"][0] == pytest.approx(2.0)
    assert out["real_ppo_rss_ratio_full_bf16"][0] == pytest.approx(2.0)
    assert out["real_bf16_weights_vs_trl_full"][0] == pytest.approx(1.5)
    assert "30.0 / 20.0" in out["real_bf16_weights_vs_trl_full"][1] and "over 2 rounds" in out["real_bf16_weights_vs_trl_full"][1]
    assert out["real_gain_no_heap_large_blocks_full"][0] == pytest.approx(40 / 32)
    value, reason = out["real_shared_vs_trl_full"]
    assert value != value and "shared arm broke" in reason
    assert "real_rm_speedup_vs_trl" not in out  # rm not asked for
