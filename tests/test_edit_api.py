"""`finegrain edit` through the official Anthropic and OpenAI SDKs against a local fake server.

The server (tests/fake_llm_server.py) speaks both wire formats on 127.0.0.1 and scripts
failures per item: 429 with Retry-After, 500, a timeout, malformed JSON, a refusal, a preamble,
a code fence and a non-minimal rewrite. The SDKs' own retries are off, so the request counts
seen by the server are exactly those of finegrain's runner.
"""
from __future__ import annotations

import json
import re
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from fake_llm_server import _ITEM_RE, FakeLLMServer, serving
from finegrain.cli import main
from finegrain.config import build_config
from finegrain.edit.core import EditConfig, edit_pairs
from finegrain.errors import ConfigError, InputError
from finegrain.llm.backends import FatalBackendError
from finegrain.llm.cache import AnswerCache

KEY = "sk-fg-test-SECRET-7f3a9c21"
FAST = dict(timeout=0.5, backoff_base=0.02, backoff_max=0.1, max_retries=2, concurrency=4)
SCENARIOS = ["", "[429]", "[500]", "[slow]", "[malformed]", "[refuse]", "[preamble]", "[rewrite]", "[fence]", "[same]",
             "[500-always]"]


@pytest.fixture
def server(monkeypatch):
    yield from serving(monkeypatch, KEY)


def rejected_text(i: int, tag: str) -> str:
    return f"[item:p{i}] This answer is bad because it gives a bad date and a vague list of steps to follow.{' ' + tag if tag else ''}"


def write_pairs(path: Path, tags: list[str]) -> Path:
    with open(path, "w") as f:
        for i, tag in enumerate(tags):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"Question {i}?", "chosen": "A fine answer.",
                                "rejected": rejected_text(i, tag), "source": "test"}) + "\n")
    return path


def read_jsonl(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def config(tmp_path, server, backend="openai", **kw) -> EditConfig:
    base_url = server.url + ("/v1" if backend == "openai" else "")
    model = "gpt-4o-mini" if backend == "openai" else "claude-3-5-haiku-latest"
    values = dict(data=str(tmp_path / "pairs.jsonl"), output=str(tmp_path / "out" / "edited.jsonl"), backend=backend,
                  model=model, base_url=base_url, **FAST)
    values.update(kw)
    return build_config(EditConfig, values)


@pytest.mark.parametrize("backend", ["anthropic", "openai"])
def test_edit_through_sdk_handles_every_scripted_case(tmp_path, server, backend, caplog):
    write_pairs(tmp_path / "pairs.jsonl", SCENARIOS)
    cfg = config(tmp_path, server, backend)
    with caplog.at_level("WARNING", logger="finegrain.llm"):
        summary = edit_pairs(cfg)

    rows = {r["id"]: r for r in read_jsonl(cfg.output)}
    rejects = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "edited.rejects.jsonl")}
    assert set(rows) | set(rejects) == {f"p{i}" for i in range(len(SCENARIOS))} and not set(rows) & set(rejects)
    # the five transient failures were retried and then edited; wrappers were stripped
    for i in (0, 1, 2, 3, 4, 6, 8):
        assert rows[f"p{i}"]["edited"] == rejected_text(i, SCENARIOS[i]).replace("bad", "good"), i
    assert {k: v["reason"] for k, v in rejects.items()} == {
        "p5": "refusal", "p7": "non_minimal", "p9": "unchanged", "p10": "failed"}
    assert "HTTP 500" in rejects["p10"]["error"]
    # one request per clean item; two for each item that failed once; 1 + max_retries for the hopeless one
    assert server.count() == {"p0": 1, "p1": 2, "p2": 2, "p3": 2, "p4": 2, "p5": 1, "p6": 1, "p7": 1, "p8": 1, "p9": 1,
                              "p10": 3}
    # Retry-After: 0.3 honoured: the retry waits 0.3 s (our own backoff would be <= 0.1 s), read from the runner's
    # log line of that retry rather than from the clock
    waits = [float(m.group(1)) for r in caplog.records if "429" in r.getMessage()
             for m in [re.search(r"retry 1/\d+ in (\d+\.\d+) s", r.getMessage())] if m]
    assert waits == [0.3], [r.getMessage() for r in caplog.records]
    # edit_meta and summary
    meta = rows["p0"]["edit_meta"]
    assert (meta["backend"], meta["prompt_version"], meta["cached"]) == (backend, "minimal_edit_v1", False)
    assert meta["tokens_deleted"] == meta["tokens_inserted"] == 2 and meta["edit_ratio"] > 0
    assert rows["p0"]["chosen"] == "A fine answer." and rows["p0"]["source"] == "test"
    assert summary["n_edited"] == 7 and summary["n_rejected"] == 4
    assert summary["rejects_by_reason"] == {"failed": 1, "non_minimal": 1, "refusal": 1, "unchanged": 1}
    assert summary["n_requests"] == 10 and summary["n_failed"] == 1 and summary["n_cached"] == 0
    in_tok = sum(r["edit_meta"]["input_tokens"] for r in list(rows.values()) + list(rejects.values()))
    out_tok = sum(r["edit_meta"]["output_tokens"] for r in list(rows.values()) + list(rejects.values()))
    assert summary["tokens"] == {"input": in_tok, "output": out_tok} and in_tok > 0
    price = (0.8, 4.0) if backend == "anthropic" else (0.15, 0.6)  # packaged table
    assert summary["cost_usd"] == round((in_tok * price[0] + out_tok * price[1]) / 1e6, 6)
    assert json.loads((tmp_path / "out" / "edited.summary.json").read_text())["n_edited"] == 7

    # a re-run pays nothing for answered items, only retries the failed one, and writes the same rows
    before = server.count()
    again = edit_pairs(cfg)
    assert server.count() - before == {"p10": 3}
    assert again["n_cached"] == 10 and again["n_requests"] == 0 and again["tokens"] == {"input": 0, "output": 0}
    assert again["cached_tokens"] == {"input": in_tok, "output": out_tok}
    rows2 = read_jsonl(cfg.output)
    assert [r["edited"] for r in rows2] == [r["edited"] for r in rows.values()]
    assert all(r["edit_meta"]["cached"] for r in rows2)


def test_guard_threshold_is_applied_to_cached_answers_without_new_requests(tmp_path, server):
    write_pairs(tmp_path / "pairs.jsonl", ["", "[preamble]"])
    first = edit_pairs(config(tmp_path, server))
    assert first["n_edited"] == 2
    strict = edit_pairs(config(tmp_path, server, max_edit_ratio=0.01))
    assert strict["rejects_by_reason"] == {"non_minimal": 2} and server.count() == {"p0": 1, "p1": 1}


def test_bad_key_stops_the_run_with_one_line(tmp_path, server, monkeypatch, capsys):
    write_pairs(tmp_path / "pairs.jsonl", ["", ""])
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fg-WRONG-key-0000")
    with pytest.raises(FatalBackendError, match="401"):
        edit_pairs(config(tmp_path, server))
    code = main(["edit", "--backend", "openai", "--model", "gpt-4o-mini", "--base-url", server.url + "/v1",
                 "--data", str(tmp_path / "pairs.jsonl"), "--output", str(tmp_path / "o.jsonl"), "--max-retries", "0"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "401" in err and "WRONG" not in err
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        edit_pairs(config(tmp_path, server, backend="anthropic", base_url=None))


def test_bad_input_names_file_record_and_field(tmp_path, server, capsys):
    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"id": "a", "prompt": "q", "chosen": "x", "rejected": ""}) + "\n")
    with pytest.raises(InputError, match="line 1.*rejected"):
        edit_pairs(config(tmp_path, server))
    code = main(["edit", "--backend", "openai", "--model", "m", "--data", str(p), "--output", str(tmp_path / "o.jsonl"),
                 "--base-url", server.url + "/v1"])
    err = capsys.readouterr().err
    assert code == 2 and "pairs.jsonl: line 1" in err and "'rejected'" in err
    assert server.count() == {}


def _env() -> dict[str, str]:
    env = dict(os.environ, OPENAI_API_KEY=KEY, FINEGRAIN_PROGRESS="0", PYTHONUNBUFFERED="1")
    env.pop("ANTHROPIC_API_KEY", None)
    return env


def _edit_cmd(tmp_path, server, *extra: str) -> list[str]:
    return [sys.executable, "-m", "finegrain", "edit", "--backend", "openai", "--model", "gpt-4o-mini",
            "--base-url", server.url + "/v1", "--data", str(tmp_path / "pairs.jsonl"),
            "--output", str(tmp_path / "out" / "edited.jsonl"), "--cache", str(tmp_path / "cache.sqlite"),
            "--timeout", "5", "--backoff-base", "0.02", "--max-retries", "2", *extra]


def test_sigkill_mid_run_then_resume_pays_once_and_loses_nothing(tmp_path, server):
    n = 24
    write_pairs(tmp_path / "pairs.jsonl", [""] * n)
    server.delay = 0.12
    proc = subprocess.Popen(_edit_cmd(tmp_path, server, "--concurrency", "2"), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cache_path = tmp_path / "cache.sqlite"
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until some answers are durable, then kill -9
        if cache_path.exists() and len(AnswerCache(cache_path).item_ids()) >= 6:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    answered = AnswerCache(cache_path).item_ids()
    assert 6 <= len(answered) < n, "the kill must land mid-run"
    assert not (tmp_path / "out" / "edited.jsonl").exists()  # outputs appear only whole
    counts_at_kill = server.count()

    server.delay = 0.0
    done = subprocess.run(_edit_cmd(tmp_path, server, "--concurrency", "4"), env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    after = server.count()
    assert all(after[i] == counts_at_kill[i] for i in answered), "an answered item was requested again"
    rows = read_jsonl(tmp_path / "out" / "edited.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(f"p{i}" for i in range(n))  # none lost, none duplicated
    assert read_jsonl(tmp_path / "out" / "edited.rejects.jsonl") == []
    summary = json.loads(done.stdout)
    assert summary["n_cached"] == len(answered) and summary["n_requests"] == n - len(answered)


def test_api_key_never_reaches_outputs_or_logs(tmp_path, server, caplog):
    write_pairs(tmp_path / "pairs.jsonl", ["", "[429]", "[500-always]", "[refuse]", "[malformed]"])
    done = subprocess.run(_edit_cmd(tmp_path, server), env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "retry" in done.stderr  # retries were logged ...
    with caplog.at_level(logging.DEBUG):  # ... and an in-process run logs everything at DEBUG
        edit_pairs(config(tmp_path, server, output=str(tmp_path / "out2" / "e.jsonl")))
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 8  # outputs, rejects, summaries, caches, input
    for p in files:
        assert KEY.encode() not in p.read_bytes(), p
    for text in (done.stdout, done.stderr, caplog.text):
        assert KEY not in text


def test_human_edits_file_backend(tmp_path):
    write_pairs(tmp_path / "pairs.jsonl", ["", "", "", ""])
    human = tmp_path / "human.jsonl"
    human.write_text("\n".join(json.dumps(r) for r in [
        {"id": "p0", "edited": rejected_text(0, "").replace("a bad date", "the right date"), "annotator": "ann-1",
         "notes": "fixed the date"},
        {"id": "p1", "edited": "Something else entirely, written from scratch by a person."},
        {"id": "p2", "edited": rejected_text(2, "")},
        {"id": "zzz", "edited": "an edit for a pair that is not in the data"},
    ]) + "\n")
    cfg = build_config(EditConfig, dict(data=str(tmp_path / "pairs.jsonl"), output=str(tmp_path / "e.jsonl"),
                                        backend="file", model=str(human)))
    with pytest.raises(InputError, match=r"human.jsonl: line 4: field 'id': no pair with id 'zzz' in .*pairs.jsonl"):
        edit_pairs(cfg)  # an edit nobody can use is someone's lost work: refused, unless --skip-invalid
    assert not (tmp_path / "e.jsonl").exists()
    cfg = build_config(EditConfig, dict(data=str(tmp_path / "pairs.jsonl"), output=str(tmp_path / "e.jsonl"),
                                        backend="file", model=str(human), skip_invalid=True))
    s = edit_pairs(cfg)
    rows = read_jsonl(tmp_path / "e.jsonl")
    assert [r["id"] for r in rows] == ["p0"]
    assert rows[0]["edit_meta"]["annotator"] == "ann-1" and rows[0]["edit_meta"]["notes"] == "fixed the date"
    assert rows[0]["edit_meta"]["backend"] == "file" and rows[0]["edit_meta"]["prompt_version"] == "human"
    assert {r["id"]: r["reason"] for r in read_jsonl(tmp_path / "e.rejects.jsonl")} == {
        "p1": "non_minimal", "p2": "unchanged", "p3": "missing"}
    assert s["n_unmatched_human_edits"] == 1 and s["cost_usd"] == 0.0
    human.write_text(json.dumps({"id": "p0", "edited": 5}) + "\n")
    with pytest.raises(InputError, match=r"human.jsonl: line 1: field 'edited'"):
        edit_pairs(cfg)


def test_key_from_a_custom_environment_variable(tmp_path, server, monkeypatch):
    write_pairs(tmp_path / "pairs.jsonl", [""])
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setenv("MY_VLLM_KEY", KEY)
    s = edit_pairs(config(tmp_path, server, api_key_env="MY_VLLM_KEY"))
    assert s["n_edited"] == 1
    monkeypatch.delenv("MY_VLLM_KEY")  # a local server without a key: a placeholder is sent, the server says 401
    with pytest.raises(FatalBackendError, match="401"):
        edit_pairs(config(tmp_path, server, api_key_env="MY_VLLM_KEY", cache="none"))


def test_concurrency_is_bounded(tmp_path, server):
    write_pairs(tmp_path / "pairs.jsonl", [""] * 12)
    server.delay = 0.05
    s = edit_pairs(config(tmp_path, server, concurrency=3))
    assert s["n_edited"] == 12 and server.max_in_flight == 3


# ----------------------------------------------------------------------------- a run that is not getting through
def closed_port() -> int:
    """A local port nothing listens on (bound, then released): connections to it are refused."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_refuses_connections_stops_the_run_after_three_attempts(tmp_path):
    """Default retries and backoff: the run stops after the first refused attempts, not after ~5 minutes
    (the error line says it stopped after 3 attempts; the subprocess timeout guards against a hang)."""
    write_pairs(tmp_path / "pairs.jsonl", [""] * 12)
    out = tmp_path / "out" / "edited.jsonl"
    out.parent.mkdir()
    out.write_text('{"earlier": "run"}\n')
    cmd = [sys.executable, "-m", "finegrain", "edit", "--backend", "openai", "--model", "gpt-4o-mini",
           "--base-url", f"http://127.0.0.1:{closed_port()}/v1", "--data", str(tmp_path / "pairs.jsonl"),
           "--output", str(out)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("finegrain edit: error: edit: stopped, 3 attempts in a row found no server "
                                  "(cannot connect to http://127.0.0.1:"), done.stderr
    assert "[Errno 111]" in done.stderr and "check --base-url" in done.stderr  # ECONNREFUSED
    assert out.read_text() == '{"earlier": "run"}\n' and done.stdout == ""


def test_items_failing_in_a_row_stop_the_run_and_keep_the_answers(tmp_path, server, capsys):
    write_pairs(tmp_path / "pairs.jsonl", [""] + ["[500-always]"] * 8)
    argv = ["edit", "--backend", "openai", "--model", "gpt-4o-mini", "--base-url", server.url + "/v1",
            "--data", str(tmp_path / "pairs.jsonl"), "--output", str(tmp_path / "e.jsonl"),
            "--cache", str(tmp_path / "cache.sqlite"), "--timeout", "5", "--backoff-base", "0.01",
            "--backoff-max", "0.02", "--max-retries", "1", "--concurrency", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("finegrain edit: error: edit: stopped, 5 items in a row failed after 2 attempts each "
                          "(last: HTTP 500"), err
    assert "1 answers are cached" in err and not (tmp_path / "e.jsonl").exists()
    assert AnswerCache(tmp_path / "cache.sqlite").item_ids() == {"p0"}  # the answer before the stop is kept
    assert server.count("p0") == 1 and all(server.count(f"p{i}") == 2 for i in range(1, 6))
    assert server.count("p7") == server.count("p8") == 0  # the run stopped instead of trying them all


def test_every_request_failing_exits_non_zero_and_a_partial_failure_says_how_many(tmp_path, server, capsys):
    common = ["edit", "--backend", "openai", "--model", "gpt-4o-mini", "--base-url", server.url + "/v1",
              "--timeout", "5", "--backoff-base", "0.01", "--backoff-max", "0.02", "--max-retries", "1"]
    write_pairs(tmp_path / "all.jsonl", ["[500-always]"] * 2)
    assert main(common + ["--data", str(tmp_path / "all.jsonl"), "--output", str(tmp_path / "all-out.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("finegrain edit: error: edit: every request failed (2 items, last: HTTP 500"), err
    assert not (tmp_path / "all-out.jsonl").exists()

    write_pairs(tmp_path / "some.jsonl", ["", "[500-always]", ""])
    done = subprocess.run([sys.executable, "-m", "finegrain", *common, "--data", str(tmp_path / "some.jsonl"),
                           "--output", str(tmp_path / "some-out.jsonl")], env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout)["n_failed"] == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        "edit: 1 of 3 requested items failed after 2 attempts each (last: HTTP 500"), done.stderr
    assert len(read_jsonl(tmp_path / "some-out.jsonl")) == 2


def test_a_second_edit_on_the_same_output_refuses_and_nothing_is_paid_twice(tmp_path, server):
    n = 12
    write_pairs(tmp_path / "pairs.jsonl", [""] * n)
    server.delay = 1.0  # the first run takes ~6 s, the second starts while it asks
    first = subprocess.Popen(_edit_cmd(tmp_path, server, "--concurrency", "2"), env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "out" / "edited.lock"
    deadline = time.time() + 60
    while time.time() < deadline and server.count() == Counter():  # the first run holds the lock and is asking
        time.sleep(0.05)
    second = subprocess.run(_edit_cmd(tmp_path, server), env=_env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert second.stderr.startswith(f"finegrain edit: error: {tmp_path / 'out' / 'edited.jsonl'}: in use by process "
                                    f"{first.pid}, which holds the lock {lock}"), second.stderr
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert server.count() == Counter({f"p{i}": 1 for i in range(n)})  # every item asked once, by the first run
    assert len(read_jsonl(tmp_path / "out" / "edited.jsonl")) == n


def test_the_lock_of_a_killed_run_is_free(tmp_path):
    """flock: the kernel releases the lock of a SIGKILLed process, so no stale lock blocks the next run."""
    from finegrain.io import exclusive_lock

    lock = tmp_path / "x.lock"
    script = (f"import time\nfrom finegrain.io import exclusive_lock\nwith exclusive_lock({str(lock)!r}, 'x'):\n"
              "    print('held', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(InputError, match=f"x: in use by process {holder.pid}"):
        with exclusive_lock(lock, "x"):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with exclusive_lock(lock, "x"):
        assert lock.read_text() == f"process {os.getpid()}\n"


# ----------------------------------------------------------------------------- replies outside the wire format
class ScriptedReplies(FakeLLMServer):
    """The fake server, except that the n-th request of item NAME gets ``replies[NAME][n]`` while there is one: a
    dict (sent as JSON), bytes (sent as an HTML page with status 200) or ``(status, bytes)`` (an HTML page)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.replies: dict[str, list] = {}

    def _respond(self, h):
        import io

        body = h.rfile.read(int(h.headers.get("content-length", 0)))
        m = _ITEM_RE.search(body.decode())
        item = m.group(1) if m else "?"
        attempt = self._attempt(item)
        if attempt >= len(self.replies.get(item, [])):
            h.rfile = io.BytesIO(body)
            return super()._respond(h)
        with self._lock:
            self.requests.append({"item": item, "api": "?", "time": time.monotonic(), "attempt": attempt})
        status, reply = self.replies[item][attempt] if isinstance(self.replies[item][attempt], tuple) else \
            (200, self.replies[item][attempt])
        raw = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
        h.send_response(status)
        h.send_header("content-type", "text/html" if isinstance(reply, bytes) else "application/json")
        h.send_header("content-length", str(len(raw)))
        h.end_headers()
        h.wfile.write(raw)


@pytest.fixture
def scripted(monkeypatch):
    yield from serving(monkeypatch, KEY, ScriptedReplies)


def openai_reply(content, finish_reason="stop") -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "finish_reason": finish_reason,
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}}


def anthropic_reply(text, stop_reason="end_turn") -> dict:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-3-5-haiku-latest",
            "content": [{"type": "text", "text": text}], "stop_reason": stop_reason, "stop_sequence": None,
            "usage": {"input_tokens": 7, "output_tokens": 5}}


def test_replies_outside_the_wire_format_are_retried_and_content_parts_are_read(tmp_path, scripted):
    write_pairs(tmp_path / "pairs.jsonl", [""] * 4)
    fixed = [rejected_text(i, "").replace("bad", "good") for i in range(4)]
    scripted.replies = {
        "p0": [b"<html><body>502 Bad Gateway (a proxy's page, status 200)</body></html>"],
        "p1": [{"id": "chatcmpl-1", "object": "chat.completion"}],  # JSON without choices
        "p2": [openai_reply([{"type": "text", "text": fixed[2][:20]}, {"type": "text", "text": fixed[2][20:]}])],
        "p3": [openai_reply(5)] * 3,  # content that is no text, every time
    }
    s = edit_pairs(config(tmp_path, scripted))
    rows = {r["id"]: r["edited"] for r in read_jsonl(tmp_path / "out" / "edited.jsonl")}
    assert rows == {"p0": fixed[0], "p1": fixed[1], "p2": fixed[2]}
    rejects = read_jsonl(tmp_path / "out" / "edited.rejects.jsonl")
    assert [(r["id"], r["reason"]) for r in rejects] == [("p3", "failed")] and "malformed" in rejects[0]["error"]
    assert scripted.count() == {"p0": 2, "p1": 2, "p2": 1, "p3": 3}  # a malformed reply is retried, like broken JSON
    assert s["n_failed"] == 1


@pytest.mark.parametrize("backend,reply", [
    ("openai", openai_reply("This answer is good because it gives", "length")),
    ("anthropic", anthropic_reply("This answer is good because it gives", "max_tokens")),
    ("anthropic", anthropic_reply("This answer is good because it gives", "model_context_window_exceeded")),
], ids=["openai-length", "anthropic-max_tokens", "anthropic-context-window"])
def test_an_answer_cut_by_a_token_limit_is_rejected_as_truncated(tmp_path, scripted, backend, reply):
    write_pairs(tmp_path / "pairs.jsonl", ["", ""])
    scripted.replies = {"p1": [reply]}
    s = edit_pairs(config(tmp_path, scripted, backend=backend))
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "edited.jsonl")] == ["p0"]
    (rej,) = read_jsonl(tmp_path / "out" / "edited.rejects.jsonl")
    assert (rej["id"], rej["reason"], rej["answer"]) == ("p1", "truncated", "This answer is good because it gives")
    assert s["rejects_by_reason"] == {"truncated": 1} and s["tokens"]["output"] > 5  # its tokens were paid


def test_a_key_pasted_with_a_newline_works_or_stays_out_of_the_error(tmp_path, server, monkeypatch, capsys, caplog):
    write_pairs(tmp_path / "pairs.jsonl", [""])
    monkeypatch.setenv("OPENAI_API_KEY", KEY + "\n")  # e.g. read from a file with its final newline
    assert edit_pairs(config(tmp_path, server))["n_edited"] == 1
    monkeypatch.setenv("OPENAI_API_KEY", KEY[:10] + "\n" + KEY[10:])  # no HTTP header can carry it
    with caplog.at_level(logging.DEBUG):
        code = main(["edit", "--backend", "openai", "--model", "gpt-4o-mini", "--base-url", server.url + "/v1",
                     "--data", str(tmp_path / "pairs.jsonl"), "--output", str(tmp_path / "o.jsonl"), "--cache", "none",
                     "--max-retries", "0"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("finegrain"))  # (httpcore's own
    for text in (err, ours):                                                          # DEBUG trace shows the header)
        assert KEY[:10] not in text and KEY[10:] not in text, text


def test_human_edits_of_pairs_with_the_same_texts_stay_with_their_own_pair(tmp_path):
    """Two pairs may share prompt and rejected response (one rejected answer against two chosen ones): each keeps
    the edit its annotator made for it."""
    text = rejected_text(0, "")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"id": i, "prompt": "Q?", "chosen": c, "rejected": text})
                                                  + "\n" for i, c in [("a", "One."), ("b", "Two.")]))
    edits = {"a": text.replace("a bad date", "the right date"), "b": text.replace("a vague list", "a clear list")}
    (tmp_path / "human.jsonl").write_text("".join(json.dumps({"id": i, "edited": e, "annotator": f"ann-{i}"}) + "\n"
                                                  for i, e in edits.items()))
    cfg = build_config(EditConfig, dict(data=str(tmp_path / "pairs.jsonl"), output=str(tmp_path / "e.jsonl"),
                                        backend="file", model=str(tmp_path / "human.jsonl")))
    assert edit_pairs(cfg)["n_edited"] == 2
    rows = read_jsonl(tmp_path / "e.jsonl")
    assert [(r["id"], r["edited"], r["edit_meta"]["annotator"]) for r in rows] == [
        ("a", edits["a"], "ann-a"), ("b", edits["b"], "ann-b")]


def test_timeout_zero_means_no_limit_in_the_sdk_too(tmp_path, server):
    from finegrain.llm.backends import get_editor

    for timeout, expected in ((0, None), (7.5, 7.5)):
        cfg = config(tmp_path, server, timeout=timeout)
        backend = get_editor(cfg.backend, cfg.model, **cfg.backend_kwargs(cfg.backend, cfg.prompt))
        assert cfg.retry_policy().timeout == expected and backend.client.timeout == expected
        assert backend.client._client.timeout == expected  # the SDK's own limit (not its default of 120 s)


@pytest.mark.parametrize("backend", ["anthropic", "openai"])
def test_a_proxys_html_error_page_keeps_the_last_line_one_line(tmp_path, scripted, backend, caplog):
    write_pairs(tmp_path / "pairs.jsonl", ["", ""])
    page = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
            b"</center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")
    scripted.replies = {"p1": [(502, page)] * 3}
    with caplog.at_level("WARNING", logger="finegrain.llm"):
        s = edit_pairs(config(tmp_path, scripted, backend=backend))
    assert s["n_edited"] == 1 and s["n_failed"] == 1 and scripted.count("p1") == 3  # 502 is retried
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("finegrain")]
    assert len(lines) == 3 and all("\n" not in x and "\r" not in x for x in lines), lines  # two retries, the end
    assert lines[-1].startswith("edit: 1 of 2 requested items failed after 3 attempts each (last: HTTP 502"), lines
    (rej,) = read_jsonl(tmp_path / "out" / "edited.rejects.jsonl")
    assert rej["reason"] == "failed" and "\n" not in rej["error"]

