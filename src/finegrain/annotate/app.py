"""The Starlette app of ``finegrain annotate serve``: pages, a small JSON API, security headers.

Pages (HTML, Jinja2 with autoescaping on; model and user text reaches the page's JavaScript only
as JSON data and is put into the page with ``textContent``, never as HTML):

- ``/login``: reads the token from the link's fragment and posts it (see :mod:`.auth`);
- ``/``: the annotator's current item (``/item/N``), or ``/done``;
- ``/item/N``: the editing page, for an item of the annotator's own queue (404 otherwise);
- ``/progress``: the annotator's own items; ``/guidelines``: the guidelines;
- ``/admin`` (+ ``/admin/plot.png``, ``/admin/report.json``): counts, times, agreement; admins only.

API (JSON POSTs, each checked for the login cookie, the CSRF token and the Origin):
``/api/draft`` (autosave), ``/api/answer`` (submit / nothing / skip / flag), ``/logout``.
A draft carries the task's version the page was opened at: one posted from before an answer
(in flight, another tab) is refused with 409 instead of outliving the answer.

Every page and API call checks the login cookie; only ``/static`` (the same CSS and JavaScript
for everybody) and the login page are served without it. A missing or wrong token gets 403.
"""
from __future__ import annotations

import json
import time
from typing import Any, Callable

from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from . import auth
from . import report as reports
from . import store as db
from .answers import FLAG_REASONS, MAX_NOTE, AnswerError, build_answer, parse_seconds, parse_spans, parse_text
from .config import AppSettings
from .queue import current_item, remaining_pairs
from .wordclass import char_classes

SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}
COOKIE_MAX_AGE = 90 * 24 * 3600
MAX_BODY = 2_000_000  # bytes of a JSON post (an edit is at most 200,000 characters)


class SecurityHeadersMiddleware:
    """Adds :data:`SECURITY_HEADERS` to every response, and ``Cache-Control: no-store`` outside /static."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    headers.setdefault(k, v)
                if not static:
                    headers["cache-control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


def item_id_of(body: dict) -> int:
    """The ``item_id`` of a post, an integer."""
    value = body.get("item_id")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2 ** 63:
        raise AnswerError("item_id must be a positive integer below 2^63 (SQLite's)", "item_id")
    return value


def version_of(body: dict) -> int | None:
    """The task version a draft was written at (see :func:`.store.task_version`); None from a page without one."""
    value = body.get("version")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63):
        raise AnswerError("version must be a non-negative integer: reload the page", "version")
    return value


def cookie_name(request: Request) -> str:
    """One cookie per port: browsers share cookies between ports of a host."""
    return f"finegrain_annotate_{request.url.port or (443 if request.url.scheme == 'https' else 80)}"


class AnnotateApp:
    """The handlers, bound to one database and its settings."""

    def __init__(self, store: db.Store, settings: AppSettings):
        self.store, self.settings = store, settings
        self.env = Environment(loader=PackageLoader("finegrain.annotate", "templates"), autoescape=True,
                               undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        with store.connect() as conn:
            self.secret_key = db.get_meta(conn, "secret_key")
            self.db_id = db.get_meta(conn, "db_id")  # in the pages' localStorage keys: databases share an origin
        self.classes = char_classes()

    # ------------------------------------------------------------ helpers

    def db_call(self, fn: Callable, *args: Any) -> Any:
        """Run ``fn(conn, *args)`` on a fresh connection in the thread pool."""
        def call():
            with self.store.connect() as conn:
                return fn(conn, *args)
        return run_in_threadpool(call)

    def page(self, request: Request, name: str, status: int = 200, who: db.Annotator | None = None,
             **ctx: Any) -> HTMLResponse:
        csrf = auth.csrf_token(self.secret_key, who.token_hash) if who else ""
        html = self.env.get_template(name).render(who=who, csrf=csrf, guidelines=self.settings.guidelines, **ctx)
        return HTMLResponse(html, status_code=status)

    def forbidden(self, request: Request, message: str, api: bool = False) -> Response:
        if api:
            return JSONResponse({"error": message}, status_code=403)
        return self.page(request, "error.html", 403, title="Not allowed", message=message)

    def not_found(self, request: Request, who: db.Annotator, api: bool = False) -> Response:
        message = "This item is not in your queue."
        if api:
            return JSONResponse({"error": message}, status_code=404)
        return self.page(request, "error.html", 404, who=who, title="Not found", message=message)

    async def annotator(self, request: Request) -> db.Annotator | None:
        return await self.db_call(db.annotator_for_session, request.cookies.get(cookie_name(request)))

    def same_origin(self, request: Request) -> bool:
        """The Origin (or, lacking it, the Referer) must be this server as the browser reached it."""
        host = request.headers.get("host", "")
        allowed = {f"http://{host}", f"https://{host}"}
        if self.settings.public_url:
            allowed.add(self.settings.public_url.rstrip("/"))
        origin = request.headers.get("origin")
        if origin is not None:
            return origin in allowed
        referer = request.headers.get("referer", "")
        return any(referer.startswith(a + "/") for a in allowed)

    async def json_body(self, request: Request) -> dict | None:
        """The posted JSON object, or None (not JSON, not an object, or more than MAX_BODY bytes)."""
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return None
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_BODY:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():  # bounded even when the length is not declared
            size += len(chunk)
            if size > MAX_BODY:
                return None
            chunks.append(chunk)
        body = b"".join(chunks)
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: arrays nested past Python's depth
            return None
        return data if isinstance(data, dict) else None

    async def post_guard(self, request: Request) -> tuple[db.Annotator | None, dict | None, Response | None]:
        """``(annotator, body, None)`` for a well-formed, same-origin, CSRF-checked POST, else an error response."""
        if not self.same_origin(request):
            return None, None, self.forbidden(request, "cross-site request refused (Origin check)", api=True)
        who = await self.annotator(request)
        if who is None:
            return None, None, self.forbidden(request, "not logged in: open your personal login link", api=True)
        body = await self.json_body(request)
        if body is None:
            return None, None, JSONResponse({"error": f"expected a JSON object of at most {MAX_BODY} bytes"},
                                            status_code=400)
        presented = body.get("csrf") or request.headers.get("x-csrf-token")
        if not auth.csrf_ok(self.secret_key, who.token_hash, presented):
            return None, None, self.forbidden(request, "missing or wrong CSRF token: reload the page", api=True)
        return who, body, None

    # ------------------------------------------------------------ login

    async def login_page(self, request: Request) -> Response:
        return self.page(request, "login.html")

    async def login(self, request: Request) -> Response:
        if not self.same_origin(request):
            return self.forbidden(request, "cross-site request refused (Origin check)", api=True)
        body = await self.json_body(request)
        token = body.get("token") if body else None
        who = await self.db_call(db.annotator_for_token, token if isinstance(token, str) else None)
        if who is None:
            return self.forbidden(request, "this login link is not valid (ask for a new one)", api=True)
        session = await self.db_call(db.open_session, who, COOKIE_MAX_AGE)
        response = JSONResponse({"next": "/admin" if who.is_admin else "/", "name": who.name})
        response.set_cookie(cookie_name(request), session, max_age=COOKIE_MAX_AGE, httponly=True, samesite="strict",
                            secure=self.https(request), path="/")
        return response

    def https(self, request: Request) -> bool:
        """Whether browsers reach the app over HTTPS: directly, or through a TLS proxy at an https --public-url
        (the app then sees plain http; the login cookie must still be Secure)."""
        return request.url.scheme == "https" or (self.settings.public_url or "").lower().startswith("https://")

    async def logout(self, request: Request) -> Response:
        who, _, error = await self.post_guard(request)
        if error:
            return error
        await self.db_call(db.close_session, request.cookies.get(cookie_name(request)))  # the cookie stops working
        response = JSONResponse({"next": "/login"})
        response.delete_cookie(cookie_name(request), path="/", httponly=True, samesite="strict")
        return response

    # ------------------------------------------------------------ annotator pages

    async def home(self, request: Request) -> Response:
        who = await self.annotator(request)
        if who is None:
            return self.forbidden(request, "Not logged in: open your personal login link.")
        s = self.settings
        item_id = await self.db_call(current_item, who.annotator_id, s.overlap, s.screening_every)
        return RedirectResponse(f"/item/{item_id}" if item_id is not None else "/done", status_code=303)

    def _item_context(self, conn, who: db.Annotator, item_id: int) -> dict | None:
        t = db.task(conn, who.annotator_id, item_id)
        if t is None or t["status"] == "skip":
            return None
        d = db.draft(conn, who.annotator_id, item_id)
        note = t["note"] or ""
        if d is not None:
            text, spans, active, note = d["text"], json.loads(d["spans"]), d["active_s"], d["note"] or ""
        elif t["status"] == "submit":
            text, spans, active = t["edited"], json.loads(t["spans"]), t["active_s"]
        else:
            text, spans, active = t["prefill"] or t["rejected"], json.loads(t["spans"]), t["active_s"]
        prefill_meta = json.loads(t["prefill_meta"]) if t["prefill_meta"] else {}
        n_done = conn.execute("SELECT COUNT(*) FROM tasks WHERE annotator_id = ? AND status != 'open'",
                              (who.annotator_id,)).fetchone()[0]
        remaining = remaining_pairs(conn, who.annotator_id, self.settings.overlap)
        data = {"item_id": item_id, "original": t["rejected"], "start_text": text, "start_spans": spans,
                "prefill": t["prefill"], "active_s": active, "status": t["status"], "note": note,
                "draft_key": f"{self.db_id}:{who.annotator_id}:{item_id}", "server_draft": d is not None,
                "version": db.task_version(t),
                "max_edit_ratio": self.settings.max_edit_ratio, "error_types": self.settings.error_types,
                "word_class": self.classes["word"], "space_class": self.classes["space"]}
        return {"t": t, "data": data, "prefill_meta": prefill_meta, "n_done": n_done, "remaining": remaining,
                "flag_reasons": FLAG_REASONS, "flag_reason": t["flag_reason"]}

    async def item_page(self, request: Request) -> Response:
        who = await self.annotator(request)
        if who is None:
            return self.forbidden(request, "Not logged in: open your personal login link.")
        item_id = request.path_params["item_id"]
        ctx = await self.db_call(self._item_context, who, item_id) if 0 < item_id < 2 ** 63 else None
        if ctx is None:
            return self.not_found(request, who)
        return self.page(request, "item.html", who=who, **ctx)

    async def done(self, request: Request) -> Response:
        who = await self.annotator(request)
        if who is None:
            return self.forbidden(request, "Not logged in: open your personal login link.")
        return self.page(request, "done.html", who=who)

    async def progress_page(self, request: Request) -> Response:
        who = await self.annotator(request)
        if who is None:
            return self.forbidden(request, "Not logged in: open your personal login link.")

        def load(conn):
            return reports.progress(conn, who.annotator_id), remaining_pairs(conn, who.annotator_id,
                                                                              self.settings.overlap)
        rows, remaining = await self.db_call(load)
        counts = {s: sum(r["status"] == s for r in rows) for s in db.STATUSES}
        return self.page(request, "progress.html", who=who, rows=rows, counts=counts, remaining=remaining)

    async def guidelines_page(self, request: Request) -> Response:
        who = await self.annotator(request)
        if who is None:
            return self.forbidden(request, "Not logged in: open your personal login link.")
        return self.page(request, "guidelines.html", who=who)

    # ------------------------------------------------------------ API

    async def save_draft(self, request: Request) -> Response:
        who, body, error = await self.post_guard(request)
        if error:
            return error

        def save(conn):
            t = db.task(conn, who.annotator_id, item_id_of(body))
            if t is None or t["status"] == "skip":
                return "missing"
            text = parse_text(body.get("text"), original=t["rejected"])
            spans = parse_spans(body.get("spans"), t["rejected"], self.settings.error_types)
            note = parse_text(body.get("note") or "", "note")[:MAX_NOTE]
            active = parse_seconds(body.get("active_s"), time.time() - t["assigned_at"])
            saved_at = db.save_draft(conn, who.annotator_id, t["item_id"], text, spans, note, active,
                                     version_of(body))
            return "stale" if saved_at is None else saved_at
        try:
            outcome = await self.db_call(save)
        except AnswerError as e:
            return JSONResponse({"error": str(e), "field": e.field}, status_code=400)
        if outcome == "missing":
            return self.not_found(request, who, api=True)
        if outcome == "stale":
            return JSONResponse({"error": "this item changed in another tab: reload the page"}, status_code=409)
        return JSONResponse({"saved_at": outcome})

    async def answer(self, request: Request) -> Response:
        who, body, error = await self.post_guard(request)
        if error:
            return error

        def record(conn):
            t = db.task(conn, who.annotator_id, item_id_of(body))
            if t is None or t["status"] == "skip":
                return "missing"
            if body.get("action") == "skip" and t["status"] != "open":
                raise AnswerError("an answered item cannot be skipped (answer it again instead)", "action")
            answer = build_answer(body, original=t["rejected"], prefill=t["prefill"],
                                  error_types=self.settings.error_types,
                                  guidelines_version=self.settings.guidelines.version,
                                  wall_s=time.time() - t["assigned_at"])
            allowed = ("open",) if answer.action == "skip" else ("open", "submit", "nothing", "flag")
            try:
                recorded = db.record_answer(conn, who.annotator_id, t["item_id"], answer, allowed)
            except db.RevisionLimitError as e:  # the cap is checked in the UPDATE itself: racing posts cannot pass it
                raise AnswerError(str(e), "action") from e
            return "ok" if recorded else "stale"
        try:
            outcome = await self.db_call(record)
        except AnswerError as e:
            return JSONResponse({"error": str(e), "field": e.field}, status_code=400)
        if outcome == "missing":
            return self.not_found(request, who, api=True)
        if outcome == "stale":
            return JSONResponse({"error": "this item changed in another tab: reload the page"}, status_code=409)
        return JSONResponse({"ok": True, "next": "/"})

    # ------------------------------------------------------------ admin

    async def admin_guard(self, request: Request) -> tuple[db.Annotator | None, Response | None]:
        who = await self.annotator(request)
        if who is None:
            return None, self.forbidden(request, "Not logged in: open your personal login link.")
        if not who.is_admin:
            return None, self.forbidden(request, "The admin view needs an admin login "
                                                 "(finegrain annotate add-annotator --admin NAME).")
        return who, None

    def _report(self, conn) -> dict:
        return reports.admin_report(conn, self.settings.overlap, self.settings.max_edit_ratio)

    async def admin(self, request: Request) -> Response:
        who, error = await self.admin_guard(request)
        if error:
            return error
        rep = await self.db_call(self._report)
        return self.page(request, "admin.html", who=who, report=rep, settings=self.settings)

    async def admin_plot(self, request: Request) -> Response:
        who, error = await self.admin_guard(request)
        if error:
            return error
        rep = await self.db_call(self._report)
        png = await run_in_threadpool(reports.plot_png, rep)
        return Response(png, media_type="image/png")

    async def admin_json(self, request: Request) -> Response:
        who, error = await self.admin_guard(request)
        if error:
            return error
        rep = await self.db_call(self._report)
        return JSONResponse(rep)


def create_app(store: db.Store, settings: AppSettings) -> Starlette:
    """The ASGI app serving ``store`` with ``settings``."""
    h = AnnotateApp(store, settings)
    routes = [
        Route("/", h.home),
        Route("/login", h.login_page, methods=["GET"]),
        Route("/login", h.login, methods=["POST"]),
        Route("/logout", h.logout, methods=["POST"]),
        Route("/item/{item_id:int}", h.item_page),
        Route("/done", h.done),
        Route("/progress", h.progress_page),
        Route("/guidelines", h.guidelines_page),
        Route("/api/draft", h.save_draft, methods=["POST"]),
        Route("/api/answer", h.answer, methods=["POST"]),
        Route("/admin", h.admin),
        Route("/admin/plot.png", h.admin_plot),
        Route("/admin/report.json", h.admin_json),
        Mount("/static", StaticFiles(packages=[("finegrain.annotate", "static")]), name="static"),
    ]
    hosts = list(settings.allowed_hosts) or ["*"]
    middleware = [Middleware(SecurityHeadersMiddleware), Middleware(TrustedHostMiddleware, allowed_hosts=hosts)]
    return Starlette(routes=routes, middleware=middleware)


__all__ = ["AppSettings", "SECURITY_HEADERS", "cookie_name", "create_app"]
