"""Shared by the `finegrain annotate` tests: example pairs, a live server in a thread, Chromium.

Chromium is Debian's (/usr/bin/chromium, installed by .ci/run with apt-get when missing), driven
by Playwright's Python package: no browser is ever downloaded. Playwright gives each launch a
fresh, empty profile directory.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Realistic pairs: the rejected responses hold local flaws a person fixes with a small edit.
PAIRS = [
    {"id": "pan", "prompt": "How do I clean a cast-iron pan?",
     "chosen": "Rinse it with hot water, scrub with coarse salt, dry it on the stove and rub in a thin coat of oil.",
     "rejected": "Soak it in bleach overnight, then scrub it with steel wool. Dry it on the stove and rub in a thin "
                 "coat of oil so it does not rust."},
    {"id": "everest", "prompt": "How tall is Mount Everest? Answer in one sentence.",
     "chosen": "Mount Everest is about 8,849 metres (29,032 feet) tall.",
     "rejected": "Mount Everest is about 9,849 metres tall, which makes it the highest mountain on Earth."},
    {"id": "rude", "prompt": "Can you explain what a prime number is?",
     "chosen": "A prime number is a whole number greater than 1 whose only divisors are 1 and itself.",
     "rejected": "Obviously, you should know this already. A prime number is a whole number greater than 1 whose "
                 "only divisors are 1 and itself, like 2, 3, 5 and 7."},
    {"id": "paris", "prompt": "What is the capital of France?",
     "chosen": "The capital of France is Paris.",
     "rejected": "The capital of France is Lyon. It is known for its museums and the Eiffel Tower."},
    {"id": "tea", "prompt": "Give me three tips for brewing green tea.",
     "chosen": "Use water around 80 °C, steep for two to three minutes, and use about 2 g of leaves per cup.",
     "rejected": "Use boiling water, steep for ten minutes, and add plenty of sugar. Green tea tastes best bitter."},
    {"id": "bike", "prompt": "How often should I oil my bike chain?",
     "chosen": "Every 150-300 km, or after riding in the rain.",
     "rejected": "Oil it every 150-300 km, or after riding in the rain; wipe off the extra oil afterwards."},
]

XSS = "<script>window.__xss = 1</script><img src=x onerror=\"window.__xss = 2\">"


def write_pairs(path: Path, pairs: list[dict] | None = None) -> Path:
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in (pairs or PAIRS)), encoding="utf-8")
    return path


def free_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


def free_port() -> int:
    with free_socket() as s:
        return s.getsockname()[1]


@dataclass
class Live:
    """A running app: its URL, database and admin token."""

    url: str
    store: Any
    settings: Any
    admin_token: str
    server: Any
    thread: threading.Thread

    def add(self, name: str, admin: bool = False) -> str:
        """A new annotator's login token."""
        from finegrain.annotate import store as db

        with self.store.connect() as conn:
            return db.add_annotator(conn, name, admin=admin)

    def link(self, token: str) -> str:
        return f"{self.url}/login#token={token}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def start_live(tmp_path: Path, pairs: list[dict] | None = None, **options: Any) -> Live:
    """Prepare a database from ``pairs`` and serve it from a thread on a free port."""
    import uvicorn

    from finegrain.annotate.app import create_app
    from finegrain.annotate.config import ServeConfig
    from finegrain.annotate.server import prepare
    from finegrain.config import build_config

    sock = free_socket()
    port = sock.getsockname()[1]
    data = write_pairs(tmp_path / "pairs.jsonl", pairs)
    cfg = build_config(ServeConfig, dict(data=str(data), db=str(tmp_path / "ann.sqlite"), port=port, **options))
    prepared = prepare(cfg)
    admin_token = prepared.summary["admin_login_url"].split("#token=")[1]
    app = create_app(prepared.store, prepared.settings)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return Live(f"http://127.0.0.1:{port}", prepared.store, prepared.settings, admin_token, server, thread)


def give(live: Live, name: str, pair_id: str) -> int:
    """Put pair ``pair_id`` into annotator ``name``'s queue directly (as their next item); returns its item id."""
    with live.store.connect() as conn:
        item_id = conn.execute("SELECT item_id FROM items WHERE pair_id = ?", (pair_id,)).fetchone()[0]
        me = conn.execute("SELECT annotator_id FROM annotators WHERE name = ?", (name,)).fetchone()[0]
        conn.execute("INSERT INTO tasks (annotator_id, item_id, seq, assigned_at, prefill) SELECT ?, ?, "
                     "(SELECT COALESCE(MAX(seq), 0) + 1 FROM tasks WHERE annotator_id = ?), ?, prefill FROM items "
                     "WHERE item_id = ?", (me, item_id, me, time.time(), item_id))
    return item_id


def http_login(client, live: Live, token: str):
    """Log an httpx client in as the page does; returns the response."""
    return client.post(f"{live.url}/login", json={"token": token}, headers={"Origin": live.url})


# ---------------------------------------------------------------- the browser

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    """FINEGRAIN_CHROMIUM, else chromium on PATH, else /usr/bin/chromium; None when none exists."""
    path = os.environ.get("FINEGRAIN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    return path if os.path.isfile(path) else None


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, driven by Playwright; skipped with the reason when absent."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the browser tests need Playwright's Python package: pip install -e '.[dev]'")
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium (FINEGRAIN_CHROMIUM, PATH, /usr/bin/chromium): apt-get install -y chromium "
                    "chromium-driver (.ci/run does this where apt-get works)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def watch(page) -> list[str]:
    """JavaScript errors and console errors of ``page``, collected for assertions."""
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    return errors


def login(context, live: Live, token: str, expect: str = "**/item/*"):
    """Open the login link in a new page of ``context`` as a person would; returns the page."""
    page = context.new_page()
    page.goto(live.link(token))
    page.wait_for_url(expect)
    page.wait_for_function("window.FG && window.FG.ready") if "item" in expect else None
    return page
