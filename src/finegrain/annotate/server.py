"""``finegrain annotate serve``: read the inputs, bring the database up to date, run the web app.

Everything is checked before the server starts (the same one-line errors as the other verbs):
the pairs, the pre-edits, the screening items, the guidelines. The first start of a database
creates an admin login and prints its link once (only its hash is stored). The startup summary
is one JSON object on stdout; the server's own log (without query strings, and tokens never
travel in a URL the server sees) goes to stderr.
"""
from __future__ import annotations

import copy
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .config import AppSettings, ServeConfig
from .store import Store, ensure_admin, set_meta, sync_items

WEB_MODULES = ("starlette", "jinja2", "uvicorn")
EXTRA_HINT = "pip install 'finegrain[annotate]' (or, in a clone, pip install -e '.[annotate]')"


def require_web_extra() -> None:
    """Refuse with one line naming the extra when the web stack is not installed."""
    missing = []
    for name in WEB_MODULES:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"the web app needs {', '.join(missing)}: {EXTRA_HINT}")


def base_url(cfg: ServeConfig) -> str:
    if cfg.public_url:
        return cfg.public_url.rstrip("/")
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{cfg.port}"


def login_url(base: str, token: str) -> str:
    """The personal login link: the token rides in the fragment, which browsers never send."""
    return f"{base.rstrip('/')}/login#token={token}"


def allowed_hosts(cfg: ServeConfig) -> list[str]:
    """Host header values the app answers (DNS-rebinding guard); any host when bound to all interfaces
    without --allowed-hosts."""
    if cfg.host in ("0.0.0.0", "::", "") and not cfg.allowed_hosts:
        return ["*"]
    hosts = {cfg.host, "localhost", "127.0.0.1", *cfg.allowed_hosts}
    if cfg.public_url:
        from urllib.parse import urlsplit

        hosts.add(urlsplit(cfg.public_url).hostname or "")
    # compared as the Host header is: lower-cased, an IPv6 address in brackets ("[::1]:8000")
    hosts = {h.strip("[]").lower() for h in hosts}
    return sorted(f"[{h}]" if ":" in h else h for h in hosts if h)


@dataclass
class Prepared:
    store: Store
    settings: AppSettings
    summary: dict[str, Any]


def prepare(cfg: ServeConfig) -> Prepared:
    """Check every input, create or update the database, make the first admin; nothing served yet."""
    from ..data.loaders import load_pairs_report
    from .inputs import attach_prefill, items_from_pairs, load_guidelines, load_screening
    from .queue import screening_every

    guidelines = load_guidelines(cfg.guidelines)
    report = load_pairs_report(cfg.data, "preference", skip_invalid=cfg.skip_invalid)
    items = items_from_pairs(report.pairs)
    prefill = attach_prefill(items, cfg.prefill) if cfg.prefill else None
    screening = load_screening(cfg.screening, {it.pair_id for it in items}) if cfg.screening else []
    store = Store(cfg.db, create=True)
    every = screening_every(cfg.screening_rate) if screening else 0
    settings = AppSettings(overlap=cfg.overlap, screening_every=every, guidelines=guidelines,
                           max_edit_ratio=cfg.max_edit_ratio, error_types=list(cfg.error_types),
                           allowed_hosts=allowed_hosts(cfg), public_url=cfg.public_url)
    with store.connect() as conn:
        synced = sync_items(conn, items, cfg.data)
        synced_screening = sync_items(conn, screening, cfg.screening) if screening else {"added": 0, "kept": 0}
        admin_token = ensure_admin(conn)
        set_meta(conn, "public_url", base_url(cfg))
        set_meta(conn, "settings", json.dumps({"overlap": cfg.overlap, "screening_every": every,
                                               "guidelines_version": guidelines.version,
                                               "max_edit_ratio": cfg.max_edit_ratio}))
    summary: dict[str, Any] = {
        "url": base_url(cfg), "db": cfg.db, "data": report.summary(), "pairs_added": synced["added"],
        "pairs_known": synced["kept"], "screening_items": len(screening), "screening_every": every,
        "screening_added": synced_screening["added"], "overlap": cfg.overlap,
        "guidelines_version": guidelines.version, "max_edit_ratio": cfg.max_edit_ratio,
    }
    if prefill is not None:
        summary["prefill"] = {"path": cfg.prefill, "n_records": prefill.n_records, "n_matched": prefill.n_matched,
                              "n_unmatched": len(prefill.unmatched_ids)}
    if admin_token is not None:
        summary["admin_login_url"] = login_url(base_url(cfg), admin_token)
        summary["admin_note"] = "shown once: only its hash is stored (finegrain annotate add-annotator --admin " \
                                "NAME makes another)"
    return Prepared(store, settings, summary)


class NoQueryStrings(logging.Filter):
    """Drops query strings from uvicorn's access log lines (nothing secret should be in one, and
    nothing will be logged if someone puts it there)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) >= 3 and isinstance(record.args[2], str):
            path = record.args[2]
            if "?" in path:
                record.args = record.args[:2] + (path.split("?", 1)[0] + "?[query removed]",) + record.args[3:]
        return True


def log_config() -> dict[str, Any]:
    """uvicorn's logging config with the access log on stderr (stdout holds the JSON summary) and
    :class:`NoQueryStrings` on it."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["no_query"] = {"()": f"{__name__}.NoQueryStrings"}
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    config["handlers"]["access"]["filters"] = ["no_query"]
    return config


def serve(cfg: ServeConfig) -> None:
    """Prepare, print the startup summary, and serve until interrupted."""
    require_web_extra()
    import uvicorn

    from .app import create_app

    prepared = prepare(cfg)
    print(json.dumps(prepared.summary, indent=2), flush=True)
    app = create_app(prepared.store, prepared.settings)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_config=log_config(), log_level=cfg.log_level,
                server_header=False, proxy_headers=False)
    sys.stdout.flush()


__all__ = ["EXTRA_HINT", "NoQueryStrings", "Prepared", "allowed_hosts", "base_url", "log_config", "login_url",
           "prepare", "require_web_extra", "serve"]
