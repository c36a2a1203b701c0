"""Bad options and unwritable outputs of `finegrain edit`, `winrate` and `convert`: one line, exit code 2, nothing
lost; `--backend-options`, `--config`, `--price-table`, runs whose every request fails at once (HTTP 400), and
input files that start with a UTF-8 byte-order mark."""
from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

from fake_llm_server import FakeLLMServer, serving
from finegrain.cli import main
from finegrain.config import build_config
from finegrain.edit.core import EditConfig, edit_pairs
from finegrain.errors import ConfigError, InputError
from finegrain.eval.winrate import WinrateConfig, winrate
from finegrain.io import atomic_write, iter_records, read_json
from finegrain.llm import backends
from finegrain.llm.accounting import Usage, load_price_table
from finegrain.llm.backends import EditRequest, EditResult, FatalBackendError, get_editor, get_judge, register_backend
from finegrain.llm.files import FileJudge
from finegrain.llm.runner import FailureWatch, Outcome, RetryPolicy

KEY = "sk-fg-inputs-SECRET-5e1d"
FAST = ["--timeout", "5", "--backoff-base", "0.01", "--backoff-max", "0.02", "--max-retries", "1"]


class Fake400Server(FakeLLMServer):
    """The fake server, plus: an edit request whose response holds ``[400]`` gets HTTP 400 (not retried)."""

    def _script(self, user, attempt):
        if "[400]" in user:
            return 400, "", {}
        return super()._script(user, attempt)


@pytest.fixture
def server(monkeypatch):
    yield from serving(monkeypatch, KEY, Fake400Server)


@pytest.fixture
def registry(monkeypatch):
    """A copy of the backend registry for one test."""
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    return backends._REGISTRY


def write_pairs(path: Path, tags: list[str]) -> str:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Question {i}?", "chosen": "A fine answer.",
                                        "rejected": f"[item:p{i}] This answer is bad and vague. {tag}"}) + "\n"
                            for i, tag in enumerate(tags)))
    return str(path)


def write_outputs(tmp_path: Path, n: int = 3) -> tuple[str, str]:
    """Model outputs (GOOD on every one) and references (GOOD on none): the fake judge prefers the model."""
    model = [{"instruction": f"Task {i}", "output": f"answer {i} GOOD", "generator": "mine"} for i in range(n)]
    ref = [{"instruction": f"Task {i}", "output": f"reference {i}", "generator": "ref"} for i in range(n)]
    (tmp_path / "model.json").write_text(json.dumps(model))
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    return str(tmp_path / "model.json"), str(tmp_path / "ref.json")


def one_error_line(capsys, verb: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"finegrain {verb}: error: "), err
    return err.strip()


class RecordingEditor:
    """A user's backend that keeps the options it was built with."""

    name = "recording"
    built: list[dict] = []

    def __init__(self, model: str, **options):
        self.model = model
        RecordingEditor.built.append(options)

    async def edit(self, req: EditRequest) -> EditResult:
        return EditResult(req.response.replace("bad", "good"))


class StrictEditor:
    """A user's backend that declares its options."""

    name = "strict"

    def __init__(self, model: str, *, seed: int = 0, style: str = "plain"):
        self.model, self.seed, self.style = model, seed, style

    async def edit(self, req: EditRequest) -> EditResult:
        return EditResult(req.response)


# ------------------------------------------------------------------ 1. --backend-options
def test_backend_options_from_the_command_line_and_yaml_reach_the_backend(tmp_path, registry, capsys):
    register_backend("recording", editor=RecordingEditor)
    RecordingEditor.built.clear()
    data = write_pairs(tmp_path / "pairs.jsonl", [""])
    code = main(["edit", "--backend", "recording", "--model", "m", "--data", data, "--output", str(tmp_path / "a.jsonl"),
                 "--backend-options", "seed=1,style=terse,ratio=0.5,flag=true"])
    assert code == 0, capsys.readouterr().err
    assert RecordingEditor.built == [{"seed": 1, "style": "terse", "ratio": 0.5, "flag": True}]
    (tmp_path / "c.yaml").write_text("backend_options:\n  seed: 2\n  names: [a, b]\n")
    code = main(["edit", "--config", str(tmp_path / "c.yaml"), "--backend", "recording", "--model", "m", "--data", data,
                 "--output", str(tmp_path / "b.jsonl")])
    assert code == 0 and RecordingEditor.built[-1] == {"seed": 2, "names": ["a", "b"]}
    assert json.loads((tmp_path / "b.jsonl").read_text())["edited"].endswith("This answer is good and vague. ")


def test_backend_options_seed_of_the_readme_runs_winrate_with_the_sandbox_judge(tmp_path, capsys):
    """`--backend-options seed=1,noise=0.5` reaches the sandbox judge: the same seed draws the same judgements."""
    import random

    from finegrain.sandbox.domain import make_prompts, parse_prompt, sample_response

    rng = random.Random(0)
    prompts = list(dict.fromkeys(make_prompts(60, 0)))[:20]  # distinct instructions
    (tmp_path / "o.json").write_text(json.dumps([{"instruction": p, "output": sample_response(parse_prompt(p), rng),
                                                  "generator": "mine"} for p in prompts]))
    (tmp_path / "r.json").write_text(json.dumps([{"instruction": p, "output": sample_response(parse_prompt(p), rng)}
                                                 for p in prompts]))

    def judged(options: str, name: str) -> list[float]:
        code = main(["winrate", "--outputs", str(tmp_path / "o.json"), "--reference", str(tmp_path / "r.json"),
                     "--judge", "sandbox", "--output", str(tmp_path / f"{name}.json"), "--backend-options", options])
        assert code == 0, capsys.readouterr().err
        summary = json.loads((tmp_path / f"{name}.json").read_text())
        assert summary["judge_model"] == "gold" and (summary["n"], summary["n_failed"]) == (20, 0)
        return [a["preference"] for a in json.loads((tmp_path / f"{name}.annotations.json").read_text())]

    assert judged("seed=1,noise=0.4", "a") == judged("seed=1,noise=0.4", "b") != judged("seed=2,noise=0.4", "c")
    # a value the backend refuses is one line too
    code = main(["winrate", "--outputs", str(tmp_path / "o.json"), "--reference", str(tmp_path / "r.json"),
                 "--judge", "sandbox", "--output", str(tmp_path / "d.json"), "--backend-options", "noise=0.5"])
    assert code == 2 and one_error_line(capsys, "winrate") == (
        "finegrain winrate: error: backend 'sandbox' refused its options (noise=0.5): noise must be in [0, 0.5), "
        "got 0.5")


def test_the_sandbox_and_file_backends_which_are_not_cached_leave_no_cache_file(tmp_path, capsys):
    """They are not cacheable, yet an empty OUTPUT_BASE.cache.sqlite was made and named as the cache in the summary."""
    import random

    from finegrain.sandbox.domain import make_prompts, parse_prompt, sample_response

    rng = random.Random(0)
    prompts = list(dict.fromkeys(make_prompts(30, 0)))[:4]
    answers = [(sample_response(parse_prompt(p), rng), sample_response(parse_prompt(p), rng)) for p in prompts]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "prompt": p, "chosen": a, "rejected": b})
                                                  + "\n" for i, (p, (a, b)) in enumerate(zip(prompts, answers))))
    (tmp_path / "human.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "edited": a + " Fixed."}) + "\n"
                                                  for i, (a, _) in enumerate(answers)))
    for backend, model in (("sandbox", "oracle"), ("file", str(tmp_path / "human.jsonl"))):
        assert main(["edit", "--backend", backend, "--model", model, "--data", str(tmp_path / "pairs.jsonl"),
                     "--output", str(tmp_path / f"{backend}.jsonl")]) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["cache"] is None
        assert json.loads((tmp_path / f"{backend}.summary.json").read_text())["cache"] is None
    (tmp_path / "o.json").write_text(json.dumps([{"instruction": p, "output": a, "generator": "mine"}
                                                 for p, (a, _) in zip(prompts, answers)]))
    (tmp_path / "r.json").write_text(json.dumps([{"instruction": p, "output": b}
                                                 for p, (_, b) in zip(prompts, answers)]))
    assert main(["winrate", "--outputs", str(tmp_path / "o.json"), "--reference", str(tmp_path / "r.json"),
                 "--judge", "sandbox", "--output", str(tmp_path / "w.json")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "w.json").read_text())["cache"] is None
    assert list(tmp_path.glob("*.sqlite*")) == []


@pytest.mark.parametrize("text, words", [
    ("backend_options: 5\n", "field 'backend_options': expected a mapping of KEY: VALUE, got int 5"),
    ("backend_options: [seed, 1]\n", "field 'backend_options': expected a mapping of KEY: VALUE, got list ['seed', 1]"),
    ("backend_options: {1: x}\n", "field 'backend_options': keys must be strings, got int 1"),
])
def test_backend_options_in_yaml_that_are_not_a_mapping_are_refused(tmp_path, capsys, text, words):
    (tmp_path / "c.yaml").write_text(text)
    outputs, reference = write_outputs(tmp_path)
    code = main(["winrate", "--config", str(tmp_path / "c.yaml"), "--outputs", outputs, "--reference", reference,
                 "--judge", "sandbox", "--output", str(tmp_path / "w.json")])
    assert code == 2 and one_error_line(capsys, "winrate") == f"finegrain winrate: error: {tmp_path / 'c.yaml'}: {words}"
    with pytest.raises(ConfigError, match="option 'backend_options': expected a mapping of KEY: VALUE, got str 'x'"):
        build_config(WinrateConfig, dict(outputs=outputs, reference=reference, judge="sandbox", output="w.json",
                                         backend_options="x"))


@pytest.mark.parametrize("value, words", [("seed", "expected KEY=VALUE, got 'seed'"), ("=1", "expected KEY=VALUE, got '=1'"),
                                          ("seed=[", "seed: invalid value '['")])
def test_a_malformed_backend_options_flag_is_one_line(tmp_path, capsys, value, words):
    with pytest.raises(SystemExit) as e:
        main(["edit", "--backend", "sandbox", "--model", "oracle", "--data", "p.jsonl", "--output", "o.jsonl",
              "--backend-options", value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"argument --backend-options: {words}" in err, err


def test_an_unknown_backend_option_is_refused_naming_it_and_the_known_ones(tmp_path, server, registry, capsys):
    with pytest.raises(ConfigError) as e:
        get_editor("openai", "m", base_url=server.url + "/v1", tempurature=1)
    assert str(e.value) == ("backend 'openai': unknown option 'tempurature' "
                            "(known: api_key_env, base_url, max_tokens, prompt, temperature, timeout)")
    with pytest.raises(ConfigError, match=r"^backend 'anthropic': unknown option 'device' \(known: api_key_env, "):
        get_judge("anthropic", "m", device="cpu")
    with pytest.raises(ConfigError, match=r"^backend 'hf': unknown option 'seed' \(known: batch_size, device, dtype, "
                                          r"max_tokens, prompt, temperature, trust_remote_code\)$"):
        get_editor("hf", str(tmp_path / "no-model-loaded"), seed=1)  # refused before any model is loaded
    with pytest.raises(ConfigError, match=r"^backend 'file': unknown option 'foo' \(it takes no options\)$"):
        get_judge("file", str(tmp_path / "j.jsonl"), foo=1)
    register_backend("strict", editor=StrictEditor)
    with pytest.raises(ConfigError, match=r"^backend 'strict': unknown option 'sed' \(known: seed, style\)$"):
        get_editor("strict", "m", sed=3)
    assert get_editor("strict", "m", seed=3, style="x").seed == 3  # declared options pass
    # on the command line: one line, nothing asked
    (tmp_path / "c.yaml").write_text("backend_options: {tempurature: 1}\n")
    data = write_pairs(tmp_path / "pairs.jsonl", [""])
    code = main(["edit", "--config", str(tmp_path / "c.yaml"), "--backend", "openai", "--model", "gpt-4o-mini",
                 "--base-url", server.url + "/v1", "--data", data, "--output", str(tmp_path / "o.jsonl")])
    assert code == 2 and "backend 'openai': unknown option 'tempurature' (known: " in one_error_line(capsys, "edit")
    assert server.count() == {} and not (tmp_path / "o.jsonl").exists()
    # the shared options and the client's own still go through
    ok = get_editor("openai", "m", base_url=server.url + "/v1", temperature=0.3, batch_size=4, prompt="minimal_edit_v1")
    assert ok.client.temperature == 0.3 and ok.prompt_version == "minimal_edit_v1"


# ------------------------------------------------------------------ 2. --config
def test_a_config_file_that_is_not_utf8_or_is_a_directory_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"seed: \xff\xfe\n")
    assert main(["edit", "--config", str(bad)]) == 2
    assert one_error_line(capsys, "edit") == (f"finegrain edit: error: {bad}: text is not valid UTF-8 (byte 6); "
                                              "re-encode the file as UTF-8")
    assert main(["edit", "--config", str(tmp_path)]) == 2
    assert one_error_line(capsys, "edit") == f"finegrain edit: error: {tmp_path}: is a directory, not a config file"
    bom = tmp_path / "bom.yaml"  # a byte-order mark (Windows editors) is fine
    bom.write_bytes(b"\xef\xbb\xbfbackend: sandbox\nmodel: oracle\nlimit: 1\n")
    cfg = build_config(EditConfig, dict(data="p.jsonl", output=str(tmp_path / "o.jsonl")), yaml_path=str(bom))
    assert (cfg.backend, cfg.model, cfg.limit) == ("sandbox", "oracle", 1)


# ------------------------------------------------------------------ 3. --price-table
@pytest.mark.parametrize("text, words", [
    ("gpt: [1.0, 2.0\n", "invalid YAML: "),
    ("- gpt\n- 1\n", "a price table must be a mapping of model-prefix: [input, output] USD per million tokens, "
                     "got list"),
    ("gpt: [.nan, -5]\n", "field 'gpt': prices must be finite numbers >= 0, got [nan, -5]"),
    ("gpt: [1.0, -5]\n", "field 'gpt': prices must be finite numbers >= 0, got [1.0, -5]"),
    ("gpt: [.inf, 1]\n", "field 'gpt': prices must be finite numbers >= 0, got [inf, 1]"),
    ("gpt: 3\n", "field 'gpt': expected [input_usd_per_mtok, output_usd_per_mtok], got 3"),
])
def test_a_bad_price_table_stops_edit_before_anything_runs(tmp_path, server, capsys, text, words):
    table = tmp_path / "prices.yaml"
    table.write_text(text)
    with pytest.raises(InputError):
        load_price_table(str(table))
    data = write_pairs(tmp_path / "pairs.jsonl", [""])
    code = main(["edit", "--backend", "openai", "--model", "gpt-4o", "--base-url", server.url + "/v1", "--data", data,
                 "--output", str(tmp_path / "o.jsonl"), "--price-table", str(table)])
    assert code == 2 and one_error_line(capsys, "edit").startswith(f"finegrain edit: error: {table}: {words}")
    assert server.count() == {} and not (tmp_path / "o.jsonl").exists()


def test_a_good_price_table_prices_the_run_and_a_directory_is_refused(tmp_path, server, capsys):
    table = tmp_path / "prices.yaml"
    table.write_text("gpt: [0, 0]\ngpt-4o: [1.5, 3]\n")
    assert load_price_table(str(table)) == {"gpt": (0.0, 0.0), "gpt-4o": (1.5, 3.0)}
    data = write_pairs(tmp_path / "pairs.jsonl", [""])
    s = edit_pairs(build_config(EditConfig, dict(data=data, output=str(tmp_path / "o.jsonl"), backend="openai",
                                                 model="gpt-4o-x", base_url=server.url + "/v1", price_table=str(table))))
    assert s["price_usd_per_mtok"] == [1.5, 3.0]
    assert s["cost_usd"] == round((s["tokens"]["input"] * 1.5 + s["tokens"]["output"] * 3) / 1e6, 6) > 0
    with pytest.raises(InputError, match="is a directory, not a price table"):
        load_price_table(str(tmp_path))


def test_a_bad_price_table_stops_winrate_before_judging_or_writing(tmp_path, server, capsys):
    outputs, reference = write_outputs(tmp_path)
    (tmp_path / "prices.yaml").write_text("gpt: [.nan, 1]\n")
    board = tmp_path / "board.csv"
    board.write_text("name,win_rate\nmine,50.0\n")
    code = main(["winrate", "--outputs", outputs, "--reference", reference, "--judge", "openai", "--judge-model", "gpt",
                 "--base-url", server.url + "/v1", "--output", str(tmp_path / "w.json"), "--leaderboard", str(board),
                 "--price-table", str(tmp_path / "prices.yaml")])
    assert code == 2 and "prices.yaml: field 'gpt': prices must be finite" in one_error_line(capsys, "winrate")
    assert server.count() == {} and board.read_text() == "name,win_rate\nmine,50.0\n"
    assert not (tmp_path / "w.json").exists()


# ------------------------------------------------------------------ 4. winrate with nothing judged
def test_an_empty_judgements_file_is_refused(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError) as e:
        FileJudge(str(tmp_path / "empty.jsonl"))
    assert str(e.value) == f"{tmp_path / 'empty.jsonl'}: no judgements (the file is empty)"
    outputs, reference = write_outputs(tmp_path)
    board = tmp_path / "board.csv"
    board.write_text("name,win_rate,standard_error,n_wins,n_draws,n_total,avg_length\nmine,75.0,5.0,3,0,4,10\n")
    code = main(["winrate", "--outputs", outputs, "--reference", reference, "--judge", "file",
                 "--judge-model", str(tmp_path / "empty.jsonl"), "--output", str(tmp_path / "w.json"),
                 "--leaderboard", str(board)])
    assert code == 2 and one_error_line(capsys, "winrate").endswith("empty.jsonl: no judgements (the file is empty)")
    assert board.read_text().endswith("mine,75.0,5.0,3,0,4,10\n") and not (tmp_path / "w.json").exists()


BOARD = "name,win_rate,standard_error,n_wins,n_draws,n_total,avg_length\nmine,75.0,5.0,3,0,4,10\n"


@pytest.mark.parametrize("case", ["unparseable", "http_400", "no_matching_judgement"])
def test_winrate_with_nothing_judged_exits_2_and_keeps_the_leaderboard(tmp_path, server, monkeypatch, capsys, case):
    outputs, reference = write_outputs(tmp_path)
    board = tmp_path / "board.csv"
    board.write_text(BOARD)
    if case == "no_matching_judgement":
        (tmp_path / "j.jsonl").write_text(json.dumps({"instruction": "Another task", "output_1": "a", "output_2": "b",
                                                      "preference": 1}) + "\n")
        judge = ["--judge", "file", "--judge-model", str(tmp_path / "j.jsonl")]
    else:
        answer = (200, "Both have merits.", {}) if case == "unparseable" else (400, "", {})
        monkeypatch.setattr(server, "_script", lambda user, attempt: answer)
        judge = ["--judge", "openai", "--judge-model", "gpt", "--base-url", server.url + "/v1", *FAST]
    code = main(["winrate", "--outputs", outputs, "--reference", reference, *judge, "--output", str(tmp_path / "w.json"),
                 "--leaderboard", str(board), "--cache", "none"])
    err = one_error_line(capsys, "winrate")
    assert code == 2
    if case == "unparseable":  # answered, but no answer names an output
        assert err == ("finegrain winrate: error: judge: no example was judged (3 examples, first error: unparseable: "
                       f"the judge's answer names neither output nor a tie); nothing was written (the leaderboard "
                       f"{board} is unchanged)")
    elif case == "http_400":
        assert err.startswith("finegrain winrate: error: judge: every request failed (3 items, last: http_400: "), err
        assert server.count() == {"?": 3}  # once each: a 400 is not retried
    else:
        assert err.startswith("finegrain winrate: error: judge: every request failed (3 items, last: missing: "), err
    assert board.read_text() == BOARD
    assert not (tmp_path / "w.json").exists() and not (tmp_path / "w.annotations.json").exists()


# ------------------------------------------------------------------ 5. per-item failures (HTTP 400)
def test_an_edit_whose_every_request_gets_http_400_exits_2(tmp_path, server, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", ["[400]", "[400]"])
    out = tmp_path / "e.jsonl"
    code = main(["edit", "--backend", "openai", "--model", "gpt-4o-mini", "--base-url", server.url + "/v1",
                 "--data", data, "--output", str(out), *FAST])
    assert code == 2
    assert one_error_line(capsys, "edit") == ("finegrain edit: error: edit: every request failed (2 items, last: "
                                              "http_400: Error code: 400 - scripted 400); nothing was answered")
    assert server.count() == {"p0": 1, "p1": 1} and not out.exists()


def test_a_partial_http_400_run_exits_0_and_says_how_many_failed(tmp_path, server, capsys, caplog):
    data = write_pairs(tmp_path / "pairs.jsonl", ["", "[400]", ""])
    caplog.set_level(logging.WARNING, logger="finegrain.llm")
    code = main(["edit", "--backend", "openai", "--model", "gpt-4o-mini", "--base-url", server.url + "/v1",
                 "--data", data, "--output", str(tmp_path / "e.jsonl"), *FAST])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["n_edited"], summary["n_failed"], summary["n_requests"]) == (2, 1, 2)
    assert summary["rejects_by_reason"] == {"http_400": 1}
    assert caplog.records[-1].getMessage() == ("edit: 1 of 3 requested items failed: 1 with an error that is not "
                                               "retried (last: http_400: Error code: 400 - scripted 400)")
    rejects = [json.loads(x) for x in (tmp_path / "e.rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in rejects] == [("p1", "http_400")]


def test_the_failure_watch_and_the_usage_count_per_item_failures():
    failure = EditResult(None, error="http_400: bad request")
    answered = [EditResult("x"), EditResult(None, raw="I'm sorry", error="refusal: ...")]
    w = FailureWatch(RetryPolicy(max_retries=1), "edit")
    w.answered(failure)
    w.answered(failure)
    with pytest.raises(FatalBackendError, match=r"edit: every request failed \(2 items, last: http_400: bad request\)"):
        w.finish(2, 0)
    w.finish(2, 1)  # something came from the cache: no stop
    for r in answered:
        w.answered(r)
    assert (w.n_answered, w.n_errors, w.n_failed) == (2, 2, 0)
    u = Usage(None).add([Outcome(failure, attempts=1), Outcome(answered[0], attempts=1),
                         Outcome(answered[1], attempts=2), Outcome(None, attempts=2)]).summary()
    assert (u["n_failed"], u["n_requests"], u["n_attempts"]) == (2, 2, 6)


# ------------------------------------------------------------------ 6. unwritable outputs
def test_edit_into_a_directory_is_refused_before_any_request(tmp_path, server, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", [""])
    (tmp_path / "out").mkdir()
    code = main(["edit", "--backend", "openai", "--model", "gpt-4o-mini", "--base-url", server.url + "/v1",
                 "--data", data, "--output", str(tmp_path / "out")])
    assert code == 2 and one_error_line(capsys, "edit") == (
        f"finegrain edit: error: {tmp_path / 'out'}: --output cannot be written: it is a directory, not a file")
    assert server.count() == {} and not (tmp_path / "out.cache.sqlite").exists() and list((tmp_path / "out").iterdir()) == []
    (tmp_path / "e.summary.json").mkdir()
    code = main(["edit", "--backend", "sandbox", "--model", "oracle", "--data", data, "--output", str(tmp_path / "e.jsonl")])
    assert code == 2 and one_error_line(capsys, "edit").endswith(
        "e.summary.json: the summary beside --output cannot be written: it is a directory, not a file")
    (tmp_path / "afile").write_text("keep me\n")
    code = main(["edit", "--backend", "sandbox", "--model", "oracle", "--data", data,
                 "--output", str(tmp_path / "afile" / "e.jsonl")])
    assert code == 2 and one_error_line(capsys, "edit").endswith(
        f"--output cannot be written: {tmp_path / 'afile'} is a file, not a directory")
    assert (tmp_path / "afile").read_text() == "keep me\n"


def test_winrate_into_a_directory_is_refused_before_the_leaderboard_is_touched(tmp_path, capsys):
    outputs, reference = write_outputs(tmp_path)
    board = tmp_path / "board.csv"
    board.write_text(BOARD)
    (tmp_path / "w").mkdir()
    code = main(["winrate", "--outputs", outputs, "--reference", reference, "--judge", "sandbox",
                 "--output", str(tmp_path / "w"), "--leaderboard", str(board)])
    assert code == 2 and one_error_line(capsys, "winrate") == (
        f"finegrain winrate: error: {tmp_path / 'w'}: --output cannot be written: it is a directory, not a file")
    assert board.read_text() == BOARD and not (tmp_path / "w.annotations.json").exists()
    code = main(["winrate", "--outputs", outputs, "--reference", reference, "--judge", "sandbox",
                 "--output", str(tmp_path / "w.json"), "--leaderboard", str(tmp_path / "w")])
    assert code == 2 and one_error_line(capsys, "winrate").endswith(
        "--leaderboard cannot be written: it is a directory, not a file")
    assert not (tmp_path / "w.json").exists()


def test_convert_into_an_existing_file_is_refused_and_the_file_kept(tmp_path, capsys):
    src = tmp_path / "hh.jsonl"
    src.write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello there",
                               "rejected": "\n\nHuman: hi\n\nAssistant: go away"}) + "\n")
    (tmp_path / "out").write_text("not a directory\n")
    code = main(["convert", "--from", "hh", str(src), "--output", str(tmp_path / "out")])
    assert code == 2 and one_error_line(capsys, "convert") == (
        f"finegrain convert: error: {tmp_path / 'out'}: --output cannot be written: it is a file, not a directory")
    assert (tmp_path / "out").read_text() == "not a directory\n"
    (tmp_path / "d" / "pairs.jsonl").mkdir(parents=True)
    code = main(["convert", "--from", "hh", str(src), "--output", str(tmp_path / "d")])
    assert code == 2 and one_error_line(capsys, "convert").endswith(
        "pairs.jsonl: pairs.jsonl in --output cannot be written: it is a directory, not a file")
    code = main(["convert", "--from", "hh", str(src), "--output", str(tmp_path / "ok")])
    assert code == 0 and json.loads((tmp_path / "ok" / "pairs.jsonl").read_text())["chosen"] == "hello there"


def test_atomic_write_turns_an_os_error_into_an_input_error(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError) as e:
        with atomic_write(tmp_path / "dir") as f:
            f.write("data")
    assert str(e.value) == f"{tmp_path / 'dir'}: cannot write: it is a directory, not a file"
    assert list((tmp_path / "dir").iterdir()) == []  # no temporary file left behind
    with pytest.raises(InputError) as e:
        with atomic_write(tmp_path / "file" / "x.json") as f:
            f.write("data")
    assert str(e.value) == f"{tmp_path / 'file' / 'x.json'}: cannot write: {tmp_path / 'file'} is a file, not a directory"

    def no_space(*args):
        raise OSError(28, "No space left on device")

    with pytest.raises(InputError, match=r"ok\.json: cannot write: No space left on device$"):
        with atomic_write(tmp_path / "ok.json") as f:
            f.write("data")
            no_space()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]


# ------------------------------------------------------------------ 7. UTF-8 byte-order mark
def test_jsonl_and_json_files_with_a_byte_order_mark_are_read(tmp_path, capsys):
    bom = b"\xef\xbb\xbf"
    rows = [{"id": "a", "prompt": "Which city?", "chosen": "Paris is the capital.", "rejected": "Lyon is the capital."},
            {"id": "b", "prompt": "Which year?", "chosen": "It was 1789.", "rejected": "It was 1798, in été."}]
    (tmp_path / "p.jsonl").write_bytes(bom + "".join(json.dumps(r) + "\n" for r in rows).encode())
    (tmp_path / "p.json").write_bytes(bom + json.dumps(rows, ensure_ascii=False).encode())
    (tmp_path / "p.jsonl.gz").write_bytes(gzip.compress((tmp_path / "p.jsonl").read_bytes()))
    assert [(w, r) for w, r in iter_records(tmp_path / "p.jsonl")] == [("line 1", rows[0]), ("line 2", rows[1])]
    assert [r for _, r in iter_records(tmp_path / "p.jsonl.gz")] == rows
    assert [(w, r) for w, r in iter_records(tmp_path / "p.json")] == [("index 0", rows[0]), ("index 1", rows[1])]
    assert read_json(tmp_path / "p.json") == rows
    # the pairs and the human edits of `finegrain edit --backend file` both start with a BOM
    (tmp_path / "human.jsonl").write_bytes(bom + (json.dumps({"id": "a", "edited": "Paris is the capital."}) + "\n"
                                                  + json.dumps({"id": "b", "edited": "It was 1789, in été."})).encode())
    code = main(["edit", "--backend", "file", "--model", str(tmp_path / "human.jsonl"), "--data", str(tmp_path / "p.jsonl"),
                 "--output", str(tmp_path / "e.jsonl")])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert (summary["input"]["n_records"], summary["n_edited"]) == (2, 2)
    assert [json.loads(x)["edited"] for x in (tmp_path / "e.jsonl").read_text().splitlines()] == [
        "Paris is the capital.", "It was 1789, in été."]


def test_the_sandbox_backends_refuse_an_unknown_option():
    import finegrain.sandbox.backends  # noqa: F401  (registers the sandbox backend)

    with pytest.raises(ConfigError, match=r"^backend 'sandbox': unknown option 'nosie' \(known: noise, seed, temperature\)$"):
        get_judge("sandbox", "gold", nosie=0.1)
    with pytest.raises(ConfigError, match=r"^backend 'sandbox': unknown option 'seed' \(it takes no options\)$"):
        get_editor("sandbox", "oracle", seed=1)
    assert get_judge("sandbox", "gold", noise=0.0, seed=2).annotator is not None
