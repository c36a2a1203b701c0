"""A local stand-in for the Anthropic Messages and OpenAI Chat Completions APIs, for tests.

``FakeLLMServer`` listens on 127.0.0.1 (port 0) in a thread and answers ``POST /v1/messages``
and ``POST /v1/chat/completions`` in each API's wire format, so the official SDKs can be
pointed at it with ``base_url``. What it answers is scripted by markers in the texts it is
sent (our prompts put the response to edit inside ``<response>`` tags and the two outputs to
judge inside ``<output_a>`` / ``<output_b>``):

editing (``<response>...</response>`` in the prompt; item name = ``[item:NAME]`` in it)
    default            the response with every "bad" replaced by "good"
    ``[429]``          first request: 429 with ``Retry-After: 0.3``; then default
    ``[500]``          first request: 500; then default
    ``[500-always]``   always 500
    ``[slow]``         first request: sleeps 2 s (longer than the tests' timeout); then default
    ``[malformed]``    first request: a 200 whose body is broken JSON; then default
    ``[refuse]``       "I'm sorry, but I can't help edit this response."
    ``[preamble]``     "Here is the edited response:\\n\\n" + default
    ``[rewrite]``      a whole new text (a non-minimal edit)
    ``[fence]``        default inside a ``` code fence
    ``[same]``         the response unchanged
judging (``<output_a>`` / ``<output_b>``)
    "A" if only output A contains "GOOD", "B" if only B does, else "TIE".

Every request is recorded (``requests``: item name, api, time; ``max_in_flight``: most requests
handled at once); ``delay`` slows every answer;
the API key the SDK sends must equal ``expected_key`` (else 401). Usage: input tokens = words
of the prompt, output tokens = words of the answer.
"""
from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_ITEM_RE = re.compile(r"\[item:([\w.-]+)\]")


def _between(text: str, tag: str) -> str | None:
    m = re.search(rf"<{tag}>\n(.*)\n</{tag}>", text, re.DOTALL)
    return m.group(1) if m else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A client that hung up (it stopped after another request's fatal 401) is not an error."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class FakeLLMServer:
    def __init__(self, expected_key: str = "test-key-not-secret"):
        self.expected_key = expected_key
        self.delay = 0.0
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0  # most requests handled at the same time
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 - http.server's naming
                server._handle(self)

            def log_message(self, *args):  # keep test output clean
                pass

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FakeLLMServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, item: str | None = None) -> int | Counter:
        with self._lock:
            c = Counter(r["item"] for r in self.requests)
        return c if item is None else c[item]

    # ------------------------------------------------------------------ behaviour
    def _attempt(self, item: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r["item"] == item)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self._respond(h)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _respond(self, h: BaseHTTPRequestHandler) -> None:
        body = json.loads(h.rfile.read(int(h.headers.get("content-length", 0))) or b"{}")
        api = "anthropic" if h.path.rstrip("/").endswith("/messages") else "openai"
        key = h.headers.get("x-api-key") or (h.headers.get("authorization") or "").removeprefix("Bearer ").strip()
        if key != self.expected_key:
            return self._send(h, 401, {"error": {"type": "authentication_error", "message": "invalid x-api-key"}})
        if api == "anthropic":
            system = body.get("system") or ""
            user = body["messages"][-1]["content"]
        else:
            msgs = body["messages"]
            system = next((m["content"] for m in msgs if m["role"] == "system"), "")
            user = msgs[-1]["content"]
        m = _ITEM_RE.search(user)
        item = m.group(1) if m else "?"
        with self._lock:
            attempt = sum(1 for r in self.requests if r["item"] == item)
            self.requests.append({"item": item, "api": api, "time": time.monotonic(), "attempt": attempt})
        if self.delay:
            time.sleep(self.delay)
        status, text, headers = self._script(user, attempt)
        if status == "malformed":
            raw = b'{"id": "msg_1", "content": [{"type": "te'
            h.send_response(200)
            h.send_header("content-type", "application/json")
            h.send_header("content-length", str(len(raw)))
            h.end_headers()
            h.wfile.write(raw)
            return
        if status != 200:
            return self._send(h, status, {"error": {"type": "api_error", "message": f"scripted {status}"}}, headers)
        n_in, n_out = len((system + " " + user).split()), len(text.split())
        if api == "anthropic":
            payload = {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                       "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                       "usage": {"input_tokens": n_in, "output_tokens": n_out}}
        else:
            payload = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": text}}],
                       "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}
        self._send(h, 200, payload)

    def _script(self, user: str, attempt: int) -> tuple[Any, str, dict[str, str]]:
        a, b = _between(user, "output_a"), _between(user, "output_b")
        if a is not None and b is not None:
            ga, gb = "GOOD" in a, "GOOD" in b
            return 200, "A" if ga and not gb else "B" if gb and not ga else "TIE", {}
        response = _between(user, "response") or ""
        fixed = response.replace("bad", "good")
        if "[429]" in response and attempt == 0:
            return 429, "", {"retry-after": "0.3"}
        if "[500-always]" in response:
            return 500, "", {}
        if "[500]" in response and attempt == 0:
            return 500, "", {}
        if "[slow]" in response and attempt == 0:
            time.sleep(2.0)
        if "[malformed]" in response and attempt == 0:
            return "malformed", "", {}
        if "[refuse]" in response:
            return 200, "I'm sorry, but I can't help edit this response.", {}
        if "[preamble]" in response:
            return 200, "Here is the edited response:\n\n" + fixed, {}
        if "[rewrite]" in response:
            return 200, "Completely different words now appear in every single position of this long answer.", {}
        if "[fence]" in response:
            return 200, "```\n" + fixed + "\n```", {}
        if "[same]" in response:
            return 200, response, {}
        return 200, fixed, {}

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        raw = json.dumps(payload).encode()
        try:
            h.send_response(status)
            h.send_header("content-type", "application/json")
            h.send_header("content-length", str(len(raw)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass


def serving(monkeypatch, key: str, cls: type = FakeLLMServer):
    """The body of a pytest fixture: a started ``cls`` server that expects ``key``, with both SDKs' key
    variables set to it; stopped when the test ends."""
    srv = cls(expected_key=key).start()
    monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    yield srv
    srv.stop()


def main() -> None:  # pragma: no cover - manual use: python tests/fake_llm_server.py
    srv = FakeLLMServer().start()
    print(srv.url, flush=True)
    srv.thread.join()


if __name__ == "__main__":  # pragma: no cover
    main()
