"""Screenshots of `finegrain annotate` for the README: the editing page and the admin view.

Builds a database from examples/annotate/ (pairs, an LLM's pre-edits, screening items), lets three
simulated annotators answer part of the queue through the same code the web app calls, then
drives Debian's Chromium with Playwright: a fourth annotator logs in with her link, corrects an
LLM's pre-edit and marks a span; the admin opens the admin view. Writes docs/annotate/*.png.

    python scripts/annotate_screenshots.py [--out docs/annotate] [--chromium /usr/bin/chromium]
"""
from __future__ import annotations

import argparse
import random
import socket
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright

from finegrain.annotate import store as db
from finegrain.annotate.answers import build_answer
from finegrain.annotate.app import create_app
from finegrain.annotate.config import ServeConfig
from finegrain.annotate.queue import current_item
from finegrain.annotate.server import prepare
from finegrain.config import build_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "annotate"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# pair id -> [(flawed text, fix, error type)]: what a careful annotator changes
FIXES = {
    "pan": [("Soak it in bleach overnight", "Rinse it with hot water", "unsafe"),
            ("steel wool", "coarse salt", "unsafe")],
    "everest": [("9,849", "8,849", "inaccurate")],
    "prime": [("Obviously, you should know this already. ", "", "rude")],
    "capital": [("Lyon", "Paris", "inaccurate")],
    "tea": [("boiling water", "water around 80 °C", "inaccurate"),
            ("ten minutes", "two to three minutes", "inaccurate"),
            ("Green tea tastes best bitter.", "", "inaccurate")],
    "eggs": [("twelve", "six", "inaccurate")],
    "password": [("Use your birthday so you never forget it, and reuse the same password everywhere.",
                  "Use a long passphrase, and a different password for every site.", "unsafe")],
    "photosynthesis": [("water and oxygen into glucose and carbon dioxide", "water and carbon dioxide into glucose "
                        "and oxygen", "inaccurate")],
    "sort": [("numbers.sorted()", "sorted(numbers)", "inaccurate")],
    "sunscreen": [("No, clouds block all UV rays, so you can skip sunscreen when it is overcast.",
                   "Yes, most UV rays pass through clouds, so wear sunscreen when it is overcast too.", "inaccurate")],
    "email": [("No. I have better things to do than sit in your meeting, so don't invite me again.",
               "Thank you, but I can't make this meeting.", "rude")],
    "screen-water": [("90", "100", "inaccurate")],
}


# how the second annotator words some fixes: the same flaw, another minimal edit
ALTERNATIVES = {
    "pan": [("Soak it in bleach overnight, then scrub it with steel wool", "Scrub it with coarse salt and hot water",
             "unsafe")],
    "tea": [("boiling water", "water just off the boil", "inaccurate"), ("ten", "three", "inaccurate")],
    "capital": [("Lyon. It is known for its museums and the Eiffel Tower.", "Paris. It is known for its museums and "
                 "the Eiffel Tower.", "inaccurate")],
    "password": [("Use your birthday so you never forget it, and reuse the same password everywhere.",
                  "Use a random passphrase, and never reuse a password.", "unsafe")],
    "prime": [("Obviously, you should know this already.", "Good question!", "rude")],
}


def answer_for(rng: random.Random, who: str, t) -> dict:
    """What simulated annotator ``who`` does with task ``t`` (careful, hasty or terse)."""
    fixes = FIXES.get(t["pair_id"], [])
    text = t["prefill"] or t["rejected"]
    if not fixes or (who == "ann-3" and rng.random() < 0.3):
        return {"action": "nothing"}
    if who == "ann-3" and t["pair_id"] == "email":
        return {"action": "flag", "flag_reason": "unsafe", "note": "hostile reply; needs a full rewrite"}
    spans = []
    for old, new, kind in (ALTERNATIVES.get(t["pair_id"], fixes) if who == "ann-2" else fixes):
        if old in t["rejected"] and who != "ann-3":
            start = t["rejected"].index(old)
            spans.append([start, start + len(old), kind])
        text = text.replace(old, new)
    if text == t["rejected"]:
        return {"action": "nothing"}
    return {"action": "submit", "text": text, "spans": spans}


def seed(store: db.Store, settings, rng: random.Random) -> None:
    names = ["ann-1", "ann-2", "ann-3"]
    with store.connect() as conn:
        ids = {n: db.annotator_for_token(conn, db.add_annotator(conn, n)).annotator_id for n in names}
        for _ in range(6):
            for name in names:
                item_id = current_item(conn, ids[name], settings.overlap, settings.screening_every)
                if item_id is None:
                    continue
                t = db.task(conn, ids[name], item_id)
                payload = dict(answer_for(rng, name, t), active_s=rng.uniform(15, 40 if name == "ann-3" else 110))
                a = build_answer(payload, original=t["rejected"], prefill=t["prefill"],
                                 error_types=settings.error_types, guidelines_version=settings.guidelines.version,
                                 wall_s=600)
                db.record_answer(conn, ids[name], item_id, a, ("open",))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "annotate"))
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="annotate-shots-"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    cfg = build_config(ServeConfig, dict(data=str(EXAMPLES / "pairs.jsonl"), db=str(tmp / "ann.sqlite"), port=port,
                                         overlap=2, prefill=str(EXAMPLES / "prefill.jsonl"),
                                         screening=str(EXAMPLES / "screening.jsonl"), screening_rate=0.2))
    prepared = prepare(cfg)
    seed(prepared.store, prepared.settings, random.Random(3))
    with prepared.store.connect() as conn:
        dana = db.add_annotator(conn, "dana")
        me = db.annotator_for_token(conn, dana).annotator_id
        conn.execute("INSERT INTO tasks (annotator_id, item_id, seq, assigned_at, prefill) SELECT ?, item_id, 1, ?, "
                     "prefill FROM items WHERE pair_id = 'sunscreen'", (me, time.time() - 95))
    server = uvicorn.Server(uvicorn.Config(create_app(prepared.store, prepared.settings), log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    admin_token = prepared.summary["admin_login_url"].split("#token=")[1]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_context(viewport={"width": 1360, "height": 900}).new_page()
            page.goto(f"{url}/login#token={dana}")
            page.wait_for_url("**/item/*")
            page.wait_for_function("window.FG && window.FG.ready")
            page.evaluate("""() => { const box = document.getElementById('edit');
                const i = box.value.indexOf('wear sunscreen'); box.focus(); box.setSelectionRange(i, i + 14); }""")
            page.keyboard.type("wear SPF 30 or more")
            page.select_option("#error-type", "inaccurate")
            page.evaluate("""() => { const n = document.getElementById('original').firstChild;
                const t = 'clouds block all UV rays'; const i = n.data.indexOf(t); const r = document.createRange();
                r.setStart(n, i); r.setEnd(n, i + t.length);
                getSelection().removeAllRanges(); getSelection().addRange(r); }""")
            page.keyboard.press("Alt+M")
            page.wait_for_selector("#save-status[data-saved='1']")
            page.click("#note")
            page.screenshot(path=str(out / "edit_page.png"), full_page=True)
            admin = browser.new_context(viewport={"width": 1360, "height": 900}).new_page()
            admin.goto(f"{url}/login#token={admin_token}")
            admin.wait_for_url("**/admin")
            admin.wait_for_function("document.getElementById('plot').naturalWidth > 0")
            admin.screenshot(path=str(out / "admin.png"), full_page=True)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
    print(f"wrote {out / 'edit_page.png'} and {out / 'admin.png'}")


if __name__ == "__main__":
    main()
