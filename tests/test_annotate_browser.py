"""`finegrain annotate` in a real browser (Debian's Chromium driven by Playwright), scripted like a person.

- log in with a link, edit a response, see the diff and the ratio update, mark a span, submit
  with the keyboard; reload: the draft and the queue position are kept;
- a second annotator on an overlapping pair; the admin view; export, `finegrain edit --backend
  file`, then `train-rm` on the result;
- the page's edit ratio equals Python's `edit_stats` on hundreds of random texts;
- an XSS payload renders inert (checked in the DOM); a wrong token gets 403;
- kill -9 of the server mid-session: nothing submitted is lost, everyone resumes where they were.

The README's screenshots come from scripts/annotate_screenshots.py (the same browser, more data).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from annotate_support import PAIRS, XSS, browser, free_port, give, login, start_live, watch, write_pairs  # noqa: F401
from test_rm_train import make_base_model

from finegrain.annotate import store as db
from finegrain.annotate.config import ExportConfig
from finegrain.annotate.export import export_annotations
from finegrain.cli import main
from finegrain.config import build_config
from finegrain.edit.distance import edit_stats, opcodes, words

pytestmark = pytest.mark.usefixtures("single_thread")  # one torch thread: tiny models

VIEWPORT = {"width": 1360, "height": 940}


BIKE = PAIRS[5]
LLM_EDIT = BIKE["rejected"].replace("afterwards", "afterwards with a rag")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    pairs = PAIRS + [{"id": "xss", "prompt": "Repeat this: " + XSS, "chosen": "Sure: " + XSS,
                      "rejected": "Here it is " + XSS + " and </textarea><b>bold</b>"}]
    tmp = tmp_path_factory.mktemp("browser")
    prefill = tmp / "llm_edits.jsonl"  # what `finegrain edit` writes
    prefill.write_text(json.dumps(dict(BIKE, edited=LLM_EDIT, edit_meta={"backend": "openai", "model": "llama-x"})))
    server = start_live(tmp, pairs, overlap=2, prefill=str(prefill))
    yield server
    server.stop()


def task_of(live, name: str, pair_id: str):
    with live.store.connect() as conn:
        return conn.execute("SELECT t.* FROM tasks t JOIN annotators a USING (annotator_id) JOIN items i "
                            "USING (item_id) WHERE a.name = ? AND i.pair_id = ?", (name, pair_id)).fetchone()


def select_in_textarea(page, text: str) -> None:
    """Select ``text`` in the edit box, as a double-click or a drag would."""
    page.evaluate("""t => { const box = document.getElementById('edit'); const i = box.value.indexOf(t);
                            box.focus(); box.setSelectionRange(i, i + t.length); }""", text)


def select_in_original(page, text: str) -> None:
    """Select ``text`` in the original response with a DOM range, as dragging the mouse over it would."""
    page.evaluate("""t => { const el = document.getElementById('original');
        const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
        while (walker.nextNode()) { const n = walker.currentNode; const i = n.data.indexOf(t);
          if (i >= 0) { const r = document.createRange(); r.setStart(n, i); r.setEnd(n, i + t.length);
                        const s = window.getSelection(); s.removeAllRanges(); s.addRange(r); return; } }
        throw new Error('not in the original: ' + t); }""", text)


def wait_saved(page) -> None:
    page.wait_for_selector("#save-status[data-saved='1']")


def ratio_of(page) -> float:
    return float(page.get_attribute("#ratio", "data-edit-ratio"))


def submit(page, live) -> None:
    """Ctrl+Enter, then wait for the next page."""
    before = page.url
    page.keyboard.press("Control+Enter")
    page.wait_for_function("u => location.href !== u", arg=before)
    page.wait_for_load_state()


def cli_outside_the_browser_loop(*argv: str) -> int:
    """``finegrain ARGV`` in a thread: Playwright's sync API keeps an event loop running in this one, and
    `finegrain edit` starts its own."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(main(list(argv))))
    thread.start()
    thread.join()
    assert result, "the command raised (see the thread's traceback above)"
    return result[0]


def test_a_person_annotates_then_a_second_one_overlaps_then_export_and_train(browser, live, tmp_path):
    alice_token, bob_token = live.add("alice"), live.add("bob")
    ctx = browser.new_context(viewport=VIEWPORT)
    requests: list[str] = []
    ctx.on("request", lambda r: requests.append(r.url))
    page = login(ctx, live, alice_token)
    errors = watch(page)
    pan = PAIRS[0]
    assert page.url.endswith("/item/1") and "#token" not in page.url
    assert page.text_content("#prompt") == pan["prompt"] and page.text_content("#chosen") == pan["chosen"]
    assert page.input_value("#edit") == pan["rejected"] and page.text_content("#original") == pan["rejected"]
    assert page.text_content("#ratio") == "0.000" and page.text_content("#ratio-limit") == "0.75"
    for label in ("Ctrl+Enter", "Alt+N", "Alt+S", "Alt+X", "Alt+G"):
        assert label in page.text_content("body")

    # edit like a person: select the unsafe advice and type over it
    select_in_textarea(page, "Soak it in bleach overnight")
    page.keyboard.type("Rinse it with hot water")
    edited = pan["rejected"].replace("Soak it in bleach overnight", "Rinse it with hot water")
    page.wait_for_function("t => document.getElementById('edit').value === t && "
                           "document.querySelectorAll('#diff del').length > 0", arg=edited)
    page.wait_for_timeout(150)  # the diff re-renders 60 ms after the last key
    assert page.eval_on_selector_all("#diff del", "els => els.map(e => e.textContent)") == ["Soak",
                                                                                            "in bleach overnight"]
    assert page.eval_on_selector_all("#diff ins", "els => els.map(e => e.textContent)") == ["Rinse", "with hot water"]
    assert ratio_of(page) == edit_stats(pan["rejected"], edited)["edit_ratio"]
    assert page.text_content("#ratio") == f"{ratio_of(page):.3f}" and page.is_hidden("#ratio-warning")

    # mark the flawed span on the original with an error type
    page.select_option("#error-type", "unsafe")
    select_in_original(page, "bleach")
    page.keyboard.press("Alt+M")
    assert page.text_content("mark.error-span") == "bleach"
    assert page.text_content("#span-list .span-type") == "unsafe"
    page.fill("#note", "bleach ruins the seasoning")
    wait_saved(page)

    # reload: the draft, the span and the queue position are kept
    page.reload()
    page.wait_for_function("window.FG && window.FG.ready")
    assert page.url.endswith("/item/1") and page.input_value("#edit") == edited
    assert page.text_content("mark.error-span") == "bleach"
    assert page.input_value("#note") == "bleach ruins the seasoning"
    assert ratio_of(page) == edit_stats(pan["rejected"], edited)["edit_ratio"]
    page.goto(live.url + "/")  # the queue says the same
    assert page.url.endswith("/item/1")
    page.wait_for_function("window.FG && window.FG.ready")

    # the guidelines are one key away
    page.keyboard.press("Alt+G")
    assert page.is_visible("#guidelines") and "Minimal-editing guidelines" in page.text_content("#guidelines")
    page.keyboard.press("Escape")
    assert page.is_hidden("#guidelines")

    page.click("#edit")
    submit(page, live)
    assert page.url.endswith("/item/2")
    t = task_of(live, "alice", "pan")
    assert t["status"] == "submit" and t["edited"] == edited and json.loads(t["spans"]) == [[11, 17, "unsafe"]]
    assert t["note"] == "bleach ruins the seasoning" and t["active_s"] > 0

    # item 2: fix the number; item 3: skip with its shortcut
    page.wait_for_function("window.FG && window.FG.ready")
    select_in_textarea(page, "9,849")
    page.keyboard.type("8,849")
    page.wait_for_timeout(150)
    submit(page, live)
    page.wait_for_function("window.FG && window.FG.ready")
    assert page.text_content("#prompt") == PAIRS[2]["prompt"]
    before = page.url
    page.keyboard.press("Alt+S")
    page.wait_for_function("u => location.href !== u", arg=before)
    assert task_of(live, "alice", "rude")["status"] == "skip"
    page.goto(live.url + "/progress")
    assert "2 edited" in page.text_content("#progress-summary") and "1 skipped" in page.text_content(
        "#progress-summary")
    assert errors == []

    # a second annotator gets the same first pair (overlap 2) and edits it differently
    ctx_b = browser.new_context(viewport=VIEWPORT)
    page_b = login(ctx_b, live, bob_token)
    assert page_b.url.endswith("/item/1") and page_b.input_value("#edit") == pan["rejected"]  # not alice's draft
    select_in_textarea(page_b, "bleach")
    page_b.keyboard.type("soapy water")
    page_b.select_option("#error-type", "unsafe")
    select_in_original(page_b, "bleach overnight")
    page_b.keyboard.press("Alt+M")
    page_b.wait_for_timeout(150)
    submit(page_b, live)
    assert page_b.url.endswith("/item/2")
    page_b.wait_for_function("window.FG && window.FG.ready")
    select_in_textarea(page_b, "9,849")
    page_b.keyboard.type("8,849")
    page_b.wait_for_timeout(150)
    submit(page_b, live)
    assert page_b.url.endswith("/item/3")  # the pair alice skipped
    assert task_of(live, "bob", "pan")["edited"] == pan["rejected"].replace("bleach", "soapy water")

    # the admin view: counts, agreement table and plot
    ctx_admin = browser.new_context(viewport=VIEWPORT)
    admin = login(ctx_admin, live, live.admin_token, expect="**/admin")
    rows = admin.eval_on_selector_all("#annotator-table tbody tr", "rs => rs.map(r => r.innerText)")
    assert any(r.startswith("alice\t2\t0\t1") for r in rows) and any(r.startswith("bob\t2\t0\t0") for r in rows)
    agreement = admin.eval_on_selector_all("#agreement-table tbody tr", "rs => rs.map(r => r.innerText)")
    assert len(agreement) == 2 and agreement[0].startswith("pan\talice, bob")
    assert agreement[1].startswith("everest") and agreement[1].rstrip().endswith("1.000\t–")
    admin.wait_for_function("document.getElementById('plot').complete && "
                            "document.getElementById('plot').naturalWidth > 0")
    assert all(u.startswith(live.url + "/") for u in requests), "the page fetched something from elsewhere"
    for c in (ctx, ctx_b, ctx_admin):
        c.close()

    # export -> finegrain edit --backend file -> train-rm
    human = tmp_path / "human_edits.jsonl"
    summary = export_annotations(build_config(ExportConfig, dict(db=live.store.path, output=str(human))))
    assert summary["n_rows"] == 2 and summary["answers"] == {"skip": 1, "submit": 4}
    rows = {r["id"]: r for r in map(json.loads, human.read_text().splitlines())}
    assert rows["pan"]["annotator"] == "alice" and rows["pan"]["gold_spans"] == [[11, 17]]
    assert rows["pan"]["edit_meta"]["n_edits_for_pair"] == 2 and rows["everest"]["edit_meta"]["agreement"] == 1.0
    pairs_file = write_pairs(tmp_path / "pairs.jsonl")
    edited_file = tmp_path / "edited.jsonl"
    assert cli_outside_the_browser_loop("edit", "--backend", "file", "--model", str(human), "--data",
                                        str(pairs_file), "--output", str(edited_file)) == 0
    out = tmp_path / "rm"
    assert cli_outside_the_browser_loop("train-rm", "--data", str(edited_file), "--pairs", "edit", "--model",
                                        str(make_base_model(tmp_path / "base")), "--loss", "token_edit", "--output",
                                        str(out), "--epochs", "2", "--batch-size", "2", "--max-length", "64",
                                        "--eval-fraction", "0", "--save-every", "0", "--log-with", "none") == 0
    info = json.loads((out / "finegrain.json").read_text())
    assert (out / "model.safetensors").exists() and info["n_train"] == 2 and info["steps"] == 2, info


def test_a_pre_edit_starts_the_box_and_the_export_says_how_much_the_person_changed(browser, live):
    token = live.add("reviewer")
    give(live, "reviewer", "bike")
    ctx = browser.new_context()
    page = login(ctx, live, token)
    assert page.input_value("#edit") == LLM_EDIT and "llama-x" in page.text_content("#prefill-note")
    assert page.text_content("#original") == BIKE["rejected"]
    assert page.eval_on_selector_all("#diff ins", "els => els.map(e => e.textContent)") == ["with a rag"]
    assert ratio_of(page) == edit_stats(BIKE["rejected"], LLM_EDIT)["edit_ratio"]
    select_in_textarea(page, "a rag")
    page.keyboard.type("a dry cloth")
    page.click("#btn-reset-prefill")  # back to the model's edit ...
    assert page.input_value("#edit") == LLM_EDIT
    select_in_textarea(page, "a rag")
    page.keyboard.type("a dry cloth")  # ... and the person's correction again
    page.wait_for_timeout(150)
    submit(page, live)
    final = LLM_EDIT.replace("a rag", "a dry cloth")
    stats = json.loads(task_of(live, "reviewer", "bike")["stats"])
    assert stats["prefill_changed"] is True and stats["prefill_edit_ratio"] == edit_stats(LLM_EDIT, final)["edit_ratio"]
    assert stats["edit_ratio"] == edit_stats(BIKE["rejected"], final)["edit_ratio"]
    ctx.close()


def test_past_the_limit_the_page_warns_and_asks_twice(browser, live):
    token = live.add("rewriter")
    give(live, "rewriter", "tea")
    ctx = browser.new_context()
    page = login(ctx, live, token)
    page.click("#edit")
    page.keyboard.press("Control+A")
    page.keyboard.type("Brew it gently.")
    page.wait_for_timeout(150)
    assert ratio_of(page) == edit_stats(PAIRS[4]["rejected"], "Brew it gently.")["edit_ratio"] > 0.75
    assert page.is_visible("#ratio-warning")
    url = page.url
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#action-error:not([hidden])")
    assert "Press Submit again" in page.text_content("#action-error") and page.url == url
    assert task_of(live, "rewriter", "tea")["status"] == "open"
    submit(page, live)  # the second press keeps it
    assert task_of(live, "rewriter", "tea")["edit_ratio"] > 0.75
    ctx.close()



def test_a_tab_left_open_over_an_answer_brings_back_no_stale_draft(browser, live):
    """One tab answers; the other, opened before that answer, is edited after it: the server stores no draft and
    says so, and reopening the item shows the answer. A page opened after the answer saves a revision's draft."""
    token = live.add("two-tabs")
    item_id = give(live, "two-tabs", "everest")
    ctx = browser.new_context()
    stale = login(ctx, live, token)
    assert stale.url.endswith(f"/item/{item_id}")
    fresh = ctx.new_page()
    fresh.goto(stale.url)
    fresh.wait_for_function("window.FG && window.FG.ready")
    select_in_textarea(fresh, "9,849")
    fresh.keyboard.type("8,849")
    fresh.wait_for_timeout(150)
    submit(fresh, live)
    answered = PAIRS[1]["rejected"].replace("9,849", "8,849")
    assert task_of(live, "two-tabs", "everest")["edited"] == answered

    stale.click("#edit")
    stale.keyboard.press("Control+End")
    stale.keyboard.type(" Late.")
    stale.wait_for_selector("#save-status:has-text('reload the page')")
    with live.store.connect() as conn:
        assert conn.execute("SELECT COUNT(*) FROM drafts WHERE item_id = ? AND annotator_id = ?",
                            (item_id, task_of(live, "two-tabs", "everest")["annotator_id"])).fetchone()[0] == 0
    stale.reload()
    stale.wait_for_function("window.FG && window.FG.ready")
    assert stale.input_value("#edit") == answered and "estored" not in stale.text_content("#save-status")

    stale.click("#edit")
    stale.keyboard.press("Control+End")
    stale.keyboard.type(" Revised.")
    wait_saved(stale)
    with live.store.connect() as conn:
        assert db.draft(conn, task_of(live, "two-tabs", "everest")["annotator_id"], item_id)["text"] == \
            answered + " Revised."
    ctx.close()


# ---------------------------------------------------------------- the page's edit ratio == Python's

VOCAB = ["the", "The", "cat", "sat", "on", "mat", "a", "a", "a", "café", "naïve", "Straße", "中文", "日本語",
         "😀", "👍🏽", "हिन्दी", "١٢٣", "x²", "½", "Ⅻ", "①", "_under_", "don't", "e.g.", "3.14", "ﬁne", "e\u0301",
         "Ωmega", "!", "?!", "...", "—", "«", "»", "(", ")", "<b>", "&amp;", "$5", "100%", "#tag", "@you", "\\"]
SEPARATORS = [" ", " ", " ", "", "\n", "\t", "\u00a0", "\u2028", "\x1c", "\u3000", ", ", "  "]


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(VOCAB) + rng.choice(SEPARATORS) for _ in range(n)).strip(" ") if n else ""


def mutate(rng: random.Random, text: str) -> str:
    parts = text.split(" ")
    for _ in range(rng.randint(0, 6)):
        op = rng.random()
        i = rng.randrange(len(parts) + 1)
        if op < 0.3:
            parts.insert(i, rng.choice(VOCAB))
        elif op < 0.55 and parts:
            parts.pop(min(i, len(parts) - 1))
        elif op < 0.8 and parts:
            parts[min(i, len(parts) - 1)] = rng.choice(VOCAB)
        elif parts:
            j = min(i, len(parts) - 1)
            parts[j:j] = parts[j:j + rng.randint(1, 3)]  # repeated words
    return " ".join(parts)


def ratio_cases(n: int = 240) -> list[tuple[str, str]]:
    rng = random.Random(17)
    cases = [("", ""), ("", "new words"), ("old words", ""), ("   ", "\n\t"), ("same", "same"),
             ("a a a a", "a a"), ("a b a b a b", "b a b a"), ("x " * 30, "x " * 29 + "y"),
             ("The cat sat.", "The dog sat."), ("naïve café", "naive cafe"), ("e\u0301t\u00e9", "été"),
             ("A\x1cB", "A B"), ("1\u00a02", "1 2"), ("😀😀", "😀"), ("中文字", "中文"),
             ("x" * 50, "y" * 50)]
    # edit ratios that are exact odd multiples of 1/128 (ties for rounding to 6 decimals)
    cases += [("w " * 128, "w " * 127 + "z"), ("w " * 128, "w " * 125 + "z z z"), ("v " * 200, "v " * 56)]
    while len(cases) < n:
        a = random_text(rng, rng.randint(0, 40))
        cases.append((a, mutate(rng, a) if rng.random() < 0.85 else random_text(rng, rng.randint(0, 30))))
    return cases


def test_page_edit_ratio_equals_python_on_random_texts(browser, live):
    token = live.add("ratio-check")
    ctx = browser.new_context()
    page = login(ctx, live, token)
    cases = ratio_cases()
    got = page.evaluate("cases => cases.map(([a, b]) => [FG.editStats(a, b), FG.opcodes(a, b), FG.words(a)])",
                        cases)
    for (a, b), (stats, ops, toks) in zip(cases, got):
        assert toks == words(a), (a, toks)
        assert [tuple(op) for op in ops] == opcodes(words(a), words(b)), (a, b)
        assert stats == edit_stats(a, b), (a, b)
    ties = [(a, b) for a, b in cases if edit_stats(a, b)["edit_ratio"] in (0.007812, 0.023438)]
    assert len(ties) == 2  # 1/128 and 3/128: exactly halfway, rounded half to even as Python does
    # the rounding itself, on every p/q with q <= 300 (Python's round(x, 6): ties to even)
    fractions = [(p, q) for q in range(1, 301) for p in range(q + 1)]
    rounded = page.evaluate("fs => fs.map(([p, q]) => FGDiff.round6(p / q))", fractions)
    assert rounded == [round(p / q, 6) for p, q in fractions]
    ctx.close()


# ---------------------------------------------------------------- escaping, wrong tokens

def test_xss_payloads_render_inert_in_the_dom(browser, live):
    token = live.add("xss-reader")
    item_id = give(live, "xss-reader", "xss")
    ctx = browser.new_context()
    page = login(ctx, live, token)
    errors = watch(page)
    page.goto(f"{live.url}/item/{item_id}")
    page.wait_for_function("window.FG && window.FG.ready")
    page.click("#edit")
    page.keyboard.press("Control+End")
    page.keyboard.type(' <img src=y onerror="window.__xss = 5"><script>window.__xss = 6</script>')
    page.wait_for_timeout(200)
    page.select_option("#error-type", "unsafe")
    select_in_original(page, "<img src=x")
    page.keyboard.press("Alt+M")
    state = page.evaluate("""() => ({
        xss: window.__xss,
        imgs: document.querySelectorAll('img').length,
        bolds: document.querySelectorAll('main b').length,
        inline_scripts: Array.from(document.scripts).filter(s => !s.src && s.type !== 'application/json').length,
        prompt: document.getElementById('prompt').textContent,
        chosen: document.getElementById('chosen').textContent,
        original: document.getElementById('original').textContent,
        diff: document.getElementById('diff').textContent,
        spans: document.getElementById('span-list').textContent })""")
    assert state["xss"] is None and state["imgs"] == 0 and state["bolds"] == 0 and state["inline_scripts"] == 0
    assert state["prompt"] == "Repeat this: " + XSS and state["chosen"] == "Sure: " + XSS
    assert state["original"] == "Here it is " + XSS + " and </textarea><b>bold</b>"
    assert '<script>window.__xss = 6</script>' in state["diff"] and "<img src=x" in state["spans"]
    # a submitted note and an annotator name holding markup, on the admin page
    page.fill("#note", "<img src=z onerror=\"window.__xss = 7\">")
    before = page.url
    page.keyboard.press("Alt+X")
    page.wait_for_function("u => location.href !== u", arg=before)
    assert task_of(live, "xss-reader", "xss")["status"] == "flag"
    admin_token = live.add("<img src=q onerror=\"window.__xss = 8\">", admin=True)
    admin = login(ctx, live, admin_token, expect="**/admin")
    body = admin.text_content("body")
    assert "window.__xss = 7" in body and "window.__xss = 8" in body
    assert admin.evaluate("window.__xss") is None
    assert admin.evaluate("document.querySelectorAll('img').length") == 1  # the plot only
    assert errors == []
    ctx.close()


def test_a_wrong_token_gets_403(browser, live):
    ctx = browser.new_context()
    page = ctx.new_page()
    with page.expect_response(lambda r: r.url.endswith("/login") and r.request.method == "POST") as resp:
        page.goto(live.link("1.thisisnotthetokenthisisnotthetokenthisisnot"))
    assert resp.value.status == 403
    page.wait_for_function("document.getElementById('login-status').textContent.includes('not valid')")
    assert page.url == live.url + "/login"  # the fragment is gone from the address bar
    r = page.goto(live.url + "/item/1")
    assert r.status == 403 and "open your personal login link" in page.text_content("#error-message")
    assert page.goto(live.url + "/admin").status == 403
    ctx.close()


# ---------------------------------------------------------------- kill -9

def start_server(tmp_path: Path, port: int, run: int) -> tuple[subprocess.Popen, Path, Path]:
    out, err = tmp_path / f"serve{run}.out", tmp_path / f"serve{run}.err"
    proc = subprocess.Popen([sys.executable, "-m", "finegrain", "annotate", "serve", "--data",
                             str(tmp_path / "pairs.jsonl"), "--db", str(tmp_path / "ann.sqlite"), "--port", str(port)],
                            stdout=out.open("w"), stderr=err.open("w"), env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/login", timeout=1).status_code == 200:
                return proc, out, err
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {err.read_text()}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not start")


def test_kill_9_loses_nothing_and_everyone_resumes(browser, tmp_path):
    write_pairs(tmp_path / "pairs.jsonl")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc, out1, err1 = start_server(tmp_path, port, 1)
    admin_token = json.loads(out1.read_text())["admin_login_url"].split("#token=")[1]
    store = db.Store(tmp_path / "ann.sqlite")
    with store.connect() as conn:  # add-annotator works beside the running server
        alice, bob = db.add_annotator(conn, "alice"), db.add_annotator(conn, "bob")
    ctx_a, ctx_b = browser.new_context(), browser.new_context()
    try:
        page = ctx_a.new_page()
        page.goto(f"{url}/login#token={alice}")
        page.wait_for_url("**/item/1")
        page.wait_for_function("window.FG && window.FG.ready")
        select_in_textarea(page, "Soak it in bleach overnight")
        page.keyboard.type("Rinse it with hot water")
        page.wait_for_timeout(150)
        page.keyboard.press("Control+Enter")
        page.wait_for_url("**/item/2")
        page.wait_for_function("window.FG && window.FG.ready")
        select_in_textarea(page, "9,849")
        page.keyboard.type("8,849")
        wait_saved(page)  # alice's draft of item 2 reached the server
        page_b = ctx_b.new_page()
        page_b.goto(f"{url}/login#token={bob}")
        page_b.wait_for_url("**/item/3")
        page_b.wait_for_function("window.FG && window.FG.ready")
        select_in_textarea(page_b, "Obviously, you should know this already. ")
        page_b.keyboard.press("Delete")
        wait_saved(page_b)

        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        with store.connect() as conn:
            rows = conn.execute("SELECT a.name, i.pair_id, t.status, t.edited FROM tasks t JOIN annotators a "
                                "USING (annotator_id) JOIN items i USING (item_id) ORDER BY a.name, t.seq").fetchall()
            assert [tuple(r)[:3] for r in rows] == [("alice", "pan", "submit"), ("alice", "everest", "open"),
                                                    ("bob", "rude", "open")]
            assert rows[0]["edited"] == PAIRS[0]["rejected"].replace("Soak it in bleach overnight",
                                                                     "Rinse it with hot water")
            assert conn.execute("SELECT COUNT(*) FROM drafts").fetchone()[0] == 2

        proc, out2, err2 = start_server(tmp_path, port, 2)
        assert "admin_login_url" not in out2.read_text()  # the admin exists: no new link
        page.reload()
        page.wait_for_function("window.FG && window.FG.ready")
        assert page.url.endswith("/item/2") and "8,849 metres" in page.input_value("#edit")
        page_b.goto(url + "/")
        page_b.wait_for_function("window.FG && window.FG.ready")
        assert page_b.url.endswith("/item/3") and page_b.input_value("#edit").startswith("A prime number")
        page.click("#edit")
        submit(page, None)
        assert page.url.endswith("/item/4")
    finally:
        ctx_a.close()
        ctx_b.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    human = tmp_path / "human.jsonl"
    export_annotations(build_config(ExportConfig, dict(db=str(tmp_path / "ann.sqlite"), output=str(human))))
    assert [json.loads(x)["id"] for x in human.read_text().splitlines()] == ["pan", "everest"]
    logs = "".join(p.read_text() for p in (out1, err1, out2, err2))
    assert "POST /api/answer" in logs  # the access log is on
    for token in (alice, bob):
        assert token not in logs and token.split(".")[1] not in logs
    assert admin_token.split(".")[1] in out1.read_text()  # printed once, in the startup summary only
    assert admin_token.split(".")[1] not in err1.read_text() + err2.read_text() + out2.read_text()
