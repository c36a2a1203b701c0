"""`finegrain generate` on a tiny checkpoint, and the `hf` editor/judge backend on the same model."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_model
from finegrain.cli import main
from finegrain.config import build_config
from finegrain.edit.core import EditConfig, edit_pairs
from finegrain.errors import InputError
from finegrain.eval.generate import GenerateConfig, generate, prompt_of
from finegrain.models import save_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("ckpt") / "tiny-policy"
    save_checkpoint(d, make_tiny_model(tiny_tokenizer, "causal", seed=0), tiny_tokenizer, {"what": "test"})
    return str(d)


@pytest.fixture
def seen_dtypes(monkeypatch) -> list[set]:
    """The set of parameter dtypes of each model ``generate`` hands to ``generate_texts``, in call order."""
    import finegrain.generation as generation

    seen: list[set] = []
    real = generation.generate_texts

    def spy(model, *a, **kw):
        seen.append({p.dtype for p in model.parameters()})
        return real(model, *a, **kw)

    monkeypatch.setattr(generation, "generate_texts", spy)
    return seen


def test_prompt_of_fields():
    assert prompt_of({"prompt": "p"}, "f", "line 1") == "p"
    assert prompt_of({"instruction": "Do x.", "input": "data"}, "f", "line 1") == "Do x.\n\ndata"
    assert prompt_of({"instruction": "Do x.", "input": ""}, "f", "line 1") == "Do x."
    with pytest.raises(InputError, match="f: line 2: field 'instruction'"):
        prompt_of({"instruction": ""}, "f", "line 2")
    with pytest.raises(InputError, match="no 'prompt' or 'instruction'"):
        prompt_of({"text": "x"}, "f", "line 3")


def test_generate_writes_alpaca_eval_outputs(tmp_path, tiny_dir):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"instruction": f"Question {i}: how tall is Mount Everest?", "dataset": "toy"}
                                   for i in range(5)]))
    cfg = build_config(GenerateConfig, dict(model=tiny_dir, prompts=str(prompts), output=str(tmp_path / "out.json"),
                                            max_new_tokens=6, batch_size=2, seed=3))
    res = generate(cfg)
    rows = json.loads((tmp_path / "out.json").read_text())
    assert res["n"] == len(rows) == 5 and res["generator"] == "tiny-policy"
    assert [r["instruction"] for r in rows] == [f"Question {i}: how tall is Mount Everest?" for i in range(5)]
    assert all(set(r) == {"instruction", "dataset", "output", "generator"} and isinstance(r["output"], str) for r in rows)
    assert generate(cfg) and json.loads((tmp_path / "out.json").read_text()) == rows  # seeded: same outputs

    jl = tmp_path / "prompts.jsonl"
    jl.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(3)))
    code = main(["generate", "--model", tiny_dir, "--prompts", str(jl), "--output", str(tmp_path / "o.jsonl"),
                 "--max-new-tokens", "4", "--generator", "mine", "--temperature", "0"])
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert code == 0 and [(r["instruction"], r["generator"]) for r in rows] == [("p0", "mine"), ("p1", "mine"),
                                                                                  ("p2", "mine")]


def test_an_interrupted_generate_resumes_with_the_outputs_of_an_uninterrupted_run(tmp_path, tiny_dir, monkeypatch):
    from finegrain import generation

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": "word " * (i % 4) + f"question {i}"}) + "\n" for i in range(7)))
    settings = dict(model=tiny_dir, prompts=str(prompts), max_new_tokens=5, batch_size=2, seed=4)
    generate(build_config(GenerateConfig, dict(settings, output=str(tmp_path / "whole.jsonl"))))
    whole = (tmp_path / "whole.jsonl").read_text()
    assert not (tmp_path / "whole.jsonl.partial.jsonl").exists()  # removed once the output is written

    real_sample, calls = generation.sample, []

    def crashing_sample(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(generation, "sample", crashing_sample)
    out = tmp_path / "out.jsonl"
    cfg = build_config(GenerateConfig, dict(settings, output=str(out)))
    with pytest.raises(KeyboardInterrupt):
        generate(cfg)
    partial = out.with_name("out.jsonl.partial.jsonl")
    assert not out.exists() and len(partial.read_text().splitlines()) == 1 + 4  # the header, two batches of two
    with open(partial, "a") as f:
        f.write('{"i": 5, "outp')  # a line a crash cut short
    calls.clear()
    monkeypatch.setattr(generation, "sample", lambda *a, **k: calls.append(len(a[2])) or real_sample(*a, **k))
    assert generate(cfg)["resumed"] == 4
    assert calls == [2, 1] and out.read_text() == whole and not partial.exists()

    # other sampling settings do not take the kept outputs
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(generation, "sample", crashing_sample)
        calls.clear()
        generate(cfg)
    monkeypatch.setattr(generation, "sample", real_sample)
    other = build_config(GenerateConfig, dict(settings, output=str(out), seed=5))
    assert generate(other)["resumed"] == 0


def test_runs_whose_seeds_differ_by_a_multiple_of_the_batch_draw_independent_samples(tiny_dir, tiny_tokenizer):
    """With a batch's seed = seed + its start, --seed 16 at batch 16 sampled its first batch with the stream of
    --seed 0's second batch: on the same prompts the same responses. Each batch's seed is now a hash of both."""
    from finegrain.generation import batch_seed, generate_texts
    from finegrain.models import load_model

    model = load_model(tiny_dir, "causal").eval()
    prompts = ["how do i clean the oven ?"] * 8
    kw = dict(template="{prompt}", batch_size=4, max_new_tokens=8, temperature=1.0)
    first, second = generate_texts(model, tiny_tokenizer, prompts, seed=0, **kw), \
        generate_texts(model, tiny_tokenizer, prompts, seed=4, **kw)
    assert first == generate_texts(model, tiny_tokenizer, prompts, seed=0, **kw)  # still seeded
    assert second[:4] != first[4:]
    seeds = {batch_seed(s, start) for s in range(64) for start in range(0, 512, 16)}
    assert len(seeds) == 64 * 32 and all(0 <= x < 2 ** 63 for x in seeds)


def test_generate_bad_prompt_file_exits_2(tmp_path, tiny_dir, capsys):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": 7}) + "\n")
    code = main(["generate", "--model", tiny_dir, "--prompts", str(p), "--output", str(tmp_path / "o.json")])
    assert code == 2 and "bad.jsonl: line 2: field 'prompt'" in capsys.readouterr().err


def test_hf_editor_backend_batches_a_local_model(tmp_path, tiny_dir, tiny_tokenizer):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": f"p{i}", "prompt": "Be polite.", "chosen": "Sure, happy to help.",
                                         "rejected": f"You are stupid for asking that {i}."}) + "\n" for i in range(5)))
    # the editing prompt does not fit a 256-position model: every item fails so, and the run stops saying why
    from finegrain.llm.interfaces import FatalBackendError

    with pytest.raises(FatalBackendError, match=r"every request failed \(5 items, last: too_long: prompt of \d+ "
                                                r"tokens \+ max_tokens=6 exceeds the model's context of 256 tokens"):
        edit_pairs(build_config(EditConfig, dict(data=str(pairs), output=str(tmp_path / "s.jsonl"), backend="hf",
                                                 model=tiny_dir, max_tokens=6)))
    assert not (tmp_path / "s.jsonl").exists()
    long_dir = tmp_path / "long-ctx"
    save_checkpoint(long_dir, make_tiny_model(tiny_tokenizer, "causal", seed=1, n_positions=1024), tiny_tokenizer, {})
    cfg = build_config(EditConfig, dict(data=str(pairs), output=str(tmp_path / "e.jsonl"), backend="hf",
                                        model=str(long_dir), max_tokens=6, batch_size=4, concurrency=8))
    s = edit_pairs(cfg)
    # an untrained model cannot edit: every answer is judged by the guards, none is lost, none paid
    assert s["n_edited"] + s["n_rejected"] == 5 and s["n_requests"] == 5 and s["cost_usd"] == 0.0
    assert s["tokens"]["input"] > 0
    again = edit_pairs(cfg)
    assert again["n_cached"] == 5 and again["n_requests"] == 0
    # a model trained again into the same directory, or loaded in another dtype, answers anew
    save_checkpoint(long_dir, make_tiny_model(tiny_tokenizer, "causal", seed=2, n_positions=1024), tiny_tokenizer, {})
    retrained = edit_pairs(cfg)
    assert retrained["n_cached"] == 0 and retrained["n_requests"] == 5
    assert edit_pairs(cfg)["n_cached"] == 5
    bf16 = build_config(EditConfig, dict(cfg.__dict__, backend_options={"dtype": "bfloat16"}))
    assert edit_pairs(bf16)["n_requests"] == 5


def test_hf_backend_batches_sample_with_seeds_of_their_own(tiny_dir, monkeypatch):
    """Every batch was sampled with seed 0: at temperature > 0 each batch position drew the same random stream."""
    import finegrain.generation as generation
    from finegrain.llm.local import HFChatClient

    seeds, real = [], generation.sample
    monkeypatch.setattr(generation, "sample", lambda *a, **kw: seeds.append(kw["generator_seed"]) or real(*a, **kw))
    client = HFChatClient(tiny_dir, max_tokens=4, temperature=1.0, batch_size=2)
    first = client._generate(["Task 1", "Task 2"])
    client._generate(["Task 3", "Task 4"])
    again = client._generate(["Task 1", "Task 2"])
    assert seeds[0] != seeds[1] and seeds[2] == seeds[0]  # other batches draw apart; the same batch again the same
    assert [c.text for c in again] == [c.text for c in first]


def test_hf_judge_backend_runs_and_a_run_with_nothing_judged_writes_nothing(tmp_path, tiny_tokenizer):
    from finegrain.eval.winrate import WinrateConfig, winrate

    d = tmp_path / "judge"
    save_checkpoint(d, make_tiny_model(tiny_tokenizer, "causal", seed=2, n_positions=1024), tiny_tokenizer, {})
    rows = [{"instruction": f"Task {i}", "output": f"answer {i}"} for i in range(3)]
    (tmp_path / "o.json").write_text(json.dumps(rows))
    (tmp_path / "r.json").write_text(json.dumps([dict(r, output="ref") for r in rows]))
    from finegrain.llm.interfaces import FatalBackendError

    # this untrained judge (greedy, seed 2) never says A, B or TIE: nothing is judged, so nothing is written
    with pytest.raises(FatalBackendError, match=r"no example was judged \(3 examples, first error: unparseable"):
        winrate(build_config(WinrateConfig, dict(outputs=str(tmp_path / "o.json"), reference=str(tmp_path / "r.json"),
                                                 judge="hf", judge_model=str(d), max_tokens=3,
                                                 output=str(tmp_path / "w.json"))))
    assert not (tmp_path / "w.json").exists() and not (tmp_path / "w.annotations.json").exists()


def test_dtype_auto_is_the_dtype_a_checkpoint_was_saved_in(tmp_path, tiny_dir, tiny_tokenizer):
    import torch

    from finegrain.models import resolve_dtype

    saved = tmp_path / "bf16"
    save_checkpoint(saved, make_tiny_model(tiny_tokenizer, "causal", seed=0).to(torch.bfloat16), tiny_tokenizer, {})
    assert resolve_dtype("auto", str(saved)) == "bfloat16"
    assert resolve_dtype("auto", tiny_dir) == "float32"
    assert resolve_dtype("auto", None) == "float32"  # built from scratch
    assert resolve_dtype("float16", str(saved)) == "float16"  # a named dtype is taken as it is
    config = json.loads((saved / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (saved / "config.json").write_text(json.dumps(config))
    assert resolve_dtype("auto", str(saved)) == "float32"  # a config that does not say


def test_generate_dtype_auto_loads_the_checkpoint_as_saved(tmp_path, tiny_dir, tiny_tokenizer, seen_dtypes):
    import torch

    seen = seen_dtypes
    saved = tmp_path / "bf16"
    save_checkpoint(saved, make_tiny_model(tiny_tokenizer, "causal", seed=0).to(torch.bfloat16), tiny_tokenizer, {})
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "question"}) + "\n")
    for model, want in ((str(saved), torch.bfloat16), (tiny_dir, torch.float32)):
        res = generate(build_config(GenerateConfig, dict(model=model, prompts=str(p), output=str(tmp_path / "o.jsonl"),
                                                         max_new_tokens=3, dtype="auto")))
        assert seen[-1] == {want} and res["dtype"] == str(want).removeprefix("torch.")
    # the float32 default widens the bf16 checkpoint
    generate(build_config(GenerateConfig, dict(model=str(saved), prompts=str(p), output=str(tmp_path / "o.jsonl"),
                                               max_new_tokens=3)))
    assert seen[-1] == {torch.float32}


def test_generate_dtype_loads_the_weights_in_it(tmp_path, tiny_dir, seen_dtypes, capsys):
    import torch

    seen = seen_dtypes
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(3)))
    res = generate(build_config(GenerateConfig, dict(model=tiny_dir, prompts=str(p), output=str(tmp_path / "b.jsonl"),
                                                     max_new_tokens=4, dtype="bfloat16")))
    rows = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert res["dtype"] == "bfloat16" and seen == [{torch.bfloat16}] and len(rows) == 3
    generate(build_config(GenerateConfig, dict(model=tiny_dir, prompts=str(p), output=str(tmp_path / "f.jsonl"),
                                               max_new_tokens=4)))
    assert seen[1] == {torch.float32}  # the default keeps the checkpoint's float32 arithmetic

    with pytest.raises(SystemExit) as exit_info:  # argparse's own errors exit through SystemExit
        main(["generate", "--model", tiny_dir, "--prompts", str(p), "--output", str(tmp_path / "x.jsonl"),
              "--dtype", "int8"])
    assert exit_info.value.code == 2 and "--dtype" in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()


def test_the_hf_backend_counts_the_tokens_it_sampled_and_flags_answers_cut_at_max_tokens(tmp_path, tiny_tokenizer,
                                                                                      sharp_model):
    """Its answers' token counts and ``truncated`` come from the decoder (EOS seen or not), not from re-encoding
    the decoded text, which merges or splits pieces (a cut answer read as complete, or the reverse)."""
    from finegrain.generation import sample
    from finegrain.llm.local import HFChatClient
    from finegrain.tokens import encode_prompts

    d = tmp_path / "sharp"
    save_checkpoint(d, sharp_model, tiny_tokenizer, {})
    client = HFChatClient(str(d), max_tokens=6)
    texts = ["Be polite.", "how do i clean the oven ? my oven is red .", "Sure."]
    got = client._generate(texts)
    ref = sample(client.lm, client.tokenizer, encode_prompts(client.tokenizer, texts), max_new_tokens=6,
                 do_sample=False)
    assert [c.text for c in got] == ref.texts
    assert [c.output_tokens for c in got] == ref.response_mask.sum(dim=1).tolist()
    assert [c.truncated for c in got] == [not e for e in ref.ended.tolist()]
    with torch.no_grad():  # every hidden state all ones, EOS's row the largest: every answer ends at once
        client.lm.transformer.ln_f.weight.zero_()
        client.lm.transformer.ln_f.bias.fill_(1.0)
        client.lm.get_output_embeddings().weight[tiny_tokenizer.eos_token_id] = 10.0
    ended = client._generate(texts)
    assert [(c.text, c.output_tokens, c.truncated) for c in ended] == [("", 1, False)] * 3
