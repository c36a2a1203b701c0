"""The annotation web app over real HTTP (uvicorn in a thread): logins, CSRF, isolation, escaping, concurrency."""
from __future__ import annotations

import json
import logging
import threading

import httpx
import pytest
from annotate_support import PAIRS, XSS, give, http_login, start_live, write_pairs

from finegrain.annotate import store as db
from finegrain.annotate.store import MAX_REVISIONS
from finegrain.annotate.app import SECURITY_HEADERS
from finegrain.annotate.server import NoQueryStrings, log_config


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    pairs = PAIRS + [{"id": "xss", "prompt": "Say hi " + XSS, "chosen": "Hi " + XSS, "rejected": "Hello " + XSS}]
    server = start_live(tmp_path_factory.mktemp("app"), pairs, overlap=8)
    yield server
    server.stop()


def client_for(live, name: str, admin: bool = False) -> tuple[httpx.Client, str]:
    token = live.add(name, admin=admin)
    client = httpx.Client(base_url=live.url, headers={"Origin": live.url}, timeout=30)
    assert http_login(client, live, token).status_code == 200
    return client, token


def csrf_of(client: httpx.Client, path: str = "/progress") -> str:
    html = client.get(path).text
    return html.split('name="csrf-token" content="')[1].split('"')[0]


def data_of(client: httpx.Client, item_id: int) -> dict:
    """The JSON data the item page hands its script."""
    page = client.get(f"/item/{item_id}").text
    return json.loads(page.split('id="fg-data">')[1].split("</script>")[0])


def current(client: httpx.Client) -> int:
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 303
    return int(r.headers["location"].rsplit("/", 1)[1])


def test_login_sets_an_httponly_strict_cookie_and_no_token_in_urls(live):
    token = live.add("cookie-check")
    with httpx.Client(base_url=live.url) as c:
        r = http_login(c, live, token)
        assert r.status_code == 200 and r.json()["next"] == "/"
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        page = c.get("/login").text
        assert token not in page
        assert c.get("/", follow_redirects=False).status_code == 303
        # the cookie is a session of its own, not the login token (other services on the host see the cookies)
        session = next(iter(c.cookies.values()))
        assert token not in r.headers["set-cookie"] and token.split(".", 1)[1] not in session


def test_logout_ends_the_session_and_a_new_token_ends_them_all(live):
    token = live.add("sessions")
    first, second = (httpx.Client(base_url=live.url, headers={"Origin": live.url}) for _ in range(2))
    with first, second:
        for c in (first, second):
            assert http_login(c, live, token).status_code == 200 and c.get("/progress").status_code == 200
        stolen = dict(first.cookies)
        r = first.post("/logout", json={"csrf": csrf_of(first)})
        assert r.status_code == 200 and r.json()["next"] == "/login"
        with httpx.Client(base_url=live.url, cookies=stolen) as replay:  # the logged-out cookie no longer works
            assert replay.get("/progress").status_code == 403
        assert second.get("/progress").status_code == 200  # the other login is still open
        _new_token(live, "sessions")
        assert second.get("/progress").status_code == 403  # a new token closes every session of the old one


def _new_token(live, name: str) -> str:
    with live.store.connect() as conn:
        return db.add_annotator(conn, name, new_token=True)


def test_the_login_cookie_is_secure_behind_a_tls_proxy(tmp_path):
    """With an https --public-url the app sees plain http from the proxy, and still marks the cookie Secure."""
    server = start_live(tmp_path, PAIRS, public_url="https://annot.example")
    try:
        token = server.add("behind-proxy")
        with httpx.Client(base_url=server.url) as c:
            r = c.post("/login", json={"token": token}, headers={"Origin": "https://annot.example",
                                                                  "Host": "annot.example"})
            assert r.status_code == 200, r.text
            assert "secure" in [part.strip() for part in r.headers["set-cookie"].lower().split(";")]
    finally:
        server.stop()


def test_wrong_or_missing_tokens_get_403(live):
    with httpx.Client(base_url=live.url, headers={"Origin": live.url}) as c:
        assert c.post("/login", json={"token": "1.wrongwrongwrongwrongwrongwrongwrongwrongwro"}).status_code == 403
        assert c.post("/login", json={"token": 5}).status_code == 403
        assert c.get("/").status_code == 403
        assert c.get("/item/1").status_code == 403
        assert c.get("/admin").status_code == 403
        assert c.get("/admin/plot.png").status_code == 403
        c.cookies.set(f"finegrain_annotate_{live.url.rsplit(':', 1)[1]}", live.admin_token[:-2] + "xx")
        r = c.get("/progress")
        assert r.status_code == 403 and "open your personal login link" in r.text
        assert c.post("/api/draft", json={"item_id": 1, "text": "x"}).status_code == 403
    assert httpx.get(f"{live.url}/static/annotate.js").status_code == 200  # static files need no login


def test_admin_view_needs_an_admin(live):
    annotator, _ = client_for(live, "not-admin")
    assert annotator.get("/admin").status_code == 403
    assert annotator.get("/admin/report.json").status_code == 403
    admin, _ = client_for(live, "boss", admin=True)
    assert admin.get("/admin").status_code == 200
    r = admin.get("/admin/plot.png")
    assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(admin.get("/admin/report.json").json()) >= {"overview", "annotators", "agreement"}


def test_posts_need_csrf_token_same_origin_and_json(live):
    client, _ = client_for(live, "csrf-check")
    item_id = current(client)
    csrf = csrf_of(client)
    body = {"item_id": item_id, "text": "draft", "csrf": csrf}
    assert client.post("/api/draft", json=body).status_code == 200
    assert client.post("/api/draft", json=dict(body, csrf="0" * 64)).status_code == 403
    assert client.post("/api/draft", json={k: v for k, v in body.items() if k != "csrf"}).status_code == 403
    assert client.post("/api/draft", json=body, headers={"Origin": "http://evil.example"}).status_code == 403
    no_origin = httpx.Client(base_url=live.url, cookies=client.cookies)
    assert no_origin.post("/api/draft", json=body).status_code == 403  # neither Origin nor Referer
    assert no_origin.post("/api/draft", json=body, headers={"Referer": live.url + "/item/1"}).status_code == 200
    form = client.post("/api/draft", data={"item_id": str(item_id), "csrf": csrf})
    assert form.status_code == 400  # a plain form post is no JSON
    huge = client.post("/api/draft", content=b'{"text": "' + b"x" * 2_100_000 + b'"}',
                       headers={"Content-Type": "application/json"})
    assert huge.status_code == 400 and "at most" in huge.json()["error"]
    other, _ = client_for(live, "csrf-other")
    assert other.post("/api/draft", json=body).status_code == 403  # another login's CSRF token


def test_an_annotator_sees_and_changes_only_their_own_items(live):
    alice, _ = client_for(live, "iso-alice")
    bob, _ = client_for(live, "iso-bob")
    item_id = give(live, "iso-alice", "bike")
    assert alice.get(f"/item/{item_id}").status_code == 200
    assert alice.post("/api/draft", json={"item_id": item_id, "text": "alice's draft",
                                          "csrf": csrf_of(alice)}).status_code == 200
    bob_csrf = csrf_of(bob)
    r = bob.get(f"/item/{item_id}")
    assert r.status_code == 404 and "alice's draft" not in r.text and "oil my bike" not in r.text
    assert bob.post("/api/answer", json={"item_id": item_id, "action": "flag", "csrf": bob_csrf}).status_code == 404
    assert bob.post("/api/draft", json={"item_id": item_id, "text": "x", "csrf": bob_csrf}).status_code == 404
    assert bob.get("/item/99999").status_code == 404
    with live.store.connect() as conn:
        alice_id = conn.execute("SELECT annotator_id FROM annotators WHERE name = 'iso-alice'").fetchone()[0]
        assert db.task(conn, alice_id, item_id)["status"] == "open"
        assert db.draft(conn, alice_id, item_id)["text"] == "alice's draft"
        assert conn.execute("SELECT COUNT(*) FROM tasks WHERE item_id = ?", (item_id,)).fetchone()[0] == 1


def test_text_is_escaped_in_the_html(live):
    client, _ = client_for(live, "esc")
    xss_item = give(live, "esc", "xss")
    html = client.get(f"/item/{xss_item}").text
    assert "<script>window.__xss" not in html and "<img src=x" not in html
    assert "&lt;script&gt;window.__xss = 1&lt;/script&gt;" in html  # the prompt, autoescaped
    data = json.loads(html.split('<script type="application/json" id="fg-data">')[1].split("</script>")[0])
    assert data["original"] == "Hello " + XSS  # the rejected response, as JSON data (\u003c...)
    admin, _ = client_for(live, "<img src=x onerror=alert(1)>", admin=True)
    page = admin.get("/admin").text
    assert "<img src=x onerror" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


def test_security_headers(live):
    client, _ = client_for(live, "headers")
    for path in ("/progress", "/login", f"/item/{current(client)}"):
        r = client.get(path)
        for k, v in SECURITY_HEADERS.items():
            assert r.headers[k] == v
        assert r.headers["cache-control"] == "no-store"
    assert "script-src 'self'" in SECURITY_HEADERS["content-security-policy"]
    r = httpx.get(f"{live.url}/progress", headers={"Host": "evil.example"})
    assert r.status_code == 400  # DNS-rebinding guard: unknown Host


def test_ipv6_and_upper_case_host_names_are_answered(tmp_path):
    """The Host guard compares lower-cased names and bracketed IPv6 addresses, as browsers send them."""
    from starlette.testclient import TestClient

    from finegrain.annotate.app import create_app
    from finegrain.annotate.config import ServeConfig
    from finegrain.annotate.server import prepare
    from finegrain.config import build_config

    cfg = build_config(ServeConfig, dict(data=str(write_pairs(tmp_path / "pairs.jsonl")), db=str(tmp_path / "a.sqlite"),
                                         host="::1", allowed_hosts=["Annot.Example"]))
    prepared = prepare(cfg)
    assert prepared.summary["url"] == "http://[::1]:8000"
    with TestClient(create_app(prepared.store, prepared.settings)) as c:
        for host in ("[::1]:8000", "annot.example", "ANNOT.example:8000", "localhost:8000"):
            assert c.get("/login", headers={"Host": host}).status_code == 200, host
        assert c.get("/login", headers={"Host": "evil.example"}).status_code == 400


def test_submissions_are_checked_by_the_server(live):
    client, _ = client_for(live, "checks")
    item_id = current(client)
    csrf = csrf_of(client)
    with live.store.connect() as conn:
        original = conn.execute("SELECT rejected FROM items WHERE item_id = ?", (item_id,)).fetchone()[0]
    r = client.post("/api/answer", json={"item_id": item_id, "action": "submit", "text": original, "csrf": csrf})
    assert r.status_code == 400 and "Nothing to fix" in r.json()["error"]
    r = client.post("/api/answer", json={"item_id": "1", "action": "submit", "text": "x", "csrf": csrf})
    assert r.status_code == 400
    # an edit far longer than the original is refused before it is aligned (seconds of work at every admin report)
    r = client.post("/api/answer", json={"item_id": item_id, "action": "submit", "csrf": csrf,
                                         "text": original + " x" * (len(original) + 1001)})
    assert r.status_code == 400 and "an edit should be minimal" in r.json()["error"]
    r = client.post("/api/draft", json={"item_id": item_id, "text": "y" * (3 * len(original) + 2001), "csrf": csrf})
    assert r.status_code == 400 and r.json()["field"] == "text"
    # malformed bodies and ids past SQLite's integers are 400/404, never a server error
    r = client.post("/api/draft", content=b"[" * 100_000 + b"]" * 100_000,
                    headers={"content-type": "application/json", "x-csrf-token": csrf})
    assert r.status_code == 400
    r = client.post("/api/answer", json={"item_id": 10 ** 30, "action": "skip", "csrf": csrf})
    assert r.status_code == 400 and r.json()["field"] == "item_id"
    assert client.get("/item/99999999999999999999999").status_code == 404
    r = client.post("/api/answer", json={"item_id": item_id, "action": "submit", "text": original + " Fixed.",
                                         "spans": [[0, 4, "unsafe"]], "active_s": 12.5, "csrf": csrf})
    assert r.status_code == 200 and r.json()["next"] == "/"
    r = client.post("/api/answer", json={"item_id": item_id, "action": "skip", "csrf": csrf})
    assert r.status_code == 400 and "cannot be skipped" in r.json()["error"]
    with live.store.connect() as conn:
        me = conn.execute("SELECT annotator_id FROM annotators WHERE name = 'checks'").fetchone()[0]
        t = db.task(conn, me, item_id)
    assert t["status"] == "submit" and t["edited"] == original + " Fixed." and json.loads(t["spans"]) == [
        [0, 4, "unsafe"]]
    assert 0 < t["edit_ratio"] < 0.2 and t["guidelines_version"] == "minimal_edit_v1"


def test_a_lone_surrogate_in_a_post_is_a_400_not_a_server_error(live):
    """JSON can carry "\\ud800" (a browser's JSON.stringify writes one for half an emoji); SQLite cannot store it."""
    client, _ = client_for(live, "surrogate")
    item_id = current(client)
    csrf = csrf_of(client)
    for path, fields in (("/api/draft", '"text": "half \\ud83d of an emoji"'),
                         ("/api/draft", '"text": "fine", "note": "\\udc00"'),
                         ("/api/answer", '"action": "submit", "text": "half \\ud83d of an emoji"')):
        body = f'{{"item_id": {item_id}, {fields}, "csrf": "{csrf}"}}'.encode()
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "lone surrogate" in r.json()["error"], (path, r.status_code, r.text)
    assert client.post("/api/draft", json={"item_id": item_id, "text": "ok 😀", "csrf": csrf}).status_code == 200


def test_an_answer_can_be_changed_and_every_version_is_kept(live):
    client, _ = client_for(live, "reviser")
    item_id = give(live, "reviser", "everest")
    csrf = csrf_of(client)
    original = PAIRS[1]["rejected"]
    first = original.replace("9,849", "8,849")
    assert client.post("/api/answer", json={"item_id": item_id, "action": "submit", "text": first,
                                            "csrf": csrf}).status_code == 200
    page = client.get(f"/item/{item_id}").text
    assert 'id="revising"' in page and 'id="btn-skip"' not in page
    data = json.loads(page.split('id="fg-data">')[1].split("</script>")[0])
    assert data["start_text"] == first and data["status"] == "submit"
    assert "change</a>" in client.get("/progress").text
    second = first.replace(", which makes it the highest mountain on Earth", "")
    assert client.post("/api/answer", json={"item_id": item_id, "action": "submit", "text": second,
                                            "csrf": csrf}).status_code == 200
    with live.store.connect() as conn:
        me = conn.execute("SELECT annotator_id FROM annotators WHERE name = 'reviser'").fetchone()[0]
        t = db.task(conn, me, item_id)
        log = conn.execute("SELECT edited FROM submissions WHERE annotator_id = ? ORDER BY submission_id",
                           (me,)).fetchall()
    assert t["edited"] == second and t["revisions"] == 1 and [r[0] for r in log] == [first, second]
    # every version is kept, so the number of changes is bounded
    with live.store.connect() as conn, db.write(conn):
        conn.execute("UPDATE tasks SET revisions = ? WHERE annotator_id = ? AND item_id = ?",
                     (MAX_REVISIONS, me, item_id))
    r = client.post("/api/answer", json={"item_id": item_id, "action": "submit", "text": first, "csrf": csrf})
    assert r.status_code == 400 and f"at most {MAX_REVISIONS} times" in r.json()["error"]
    with live.store.connect() as conn:
        assert db.task(conn, me, item_id)["edited"] == second
        assert conn.execute("SELECT COUNT(*) FROM submissions WHERE annotator_id = ?", (me,)).fetchone()[0] == 2


def test_a_change_racing_past_the_revision_cap_is_a_clear_400(live, monkeypatch):
    """Another post takes the last allowed change between the app's check and its UPDATE: the database refuses
    this one, and the page is told why (not "changed in another tab")."""
    client, _ = client_for(live, "racer")
    item_id = give(live, "racer", "tea")
    csrf = csrf_of(client)
    first = PAIRS[4]["rejected"].replace("boiling water", "water at 80 °C")
    assert client.post("/api/answer", json={"item_id": item_id, "action": "submit", "text": first,
                                            "csrf": csrf}).status_code == 200
    record = db.record_answer

    def other_tab_first(conn, annotator_id, *args):
        with live.store.connect() as other, db.write(other):
            other.execute("UPDATE tasks SET revisions = ? WHERE annotator_id = ? AND item_id = ?",
                          (MAX_REVISIONS, annotator_id, item_id))
        return record(conn, annotator_id, *args)

    monkeypatch.setattr(db, "record_answer", other_tab_first)
    r = client.post("/api/answer", json={"item_id": item_id, "action": "submit", "text": first + " Enjoy.",
                                         "csrf": csrf})
    assert r.status_code == 400 and f"at most {MAX_REVISIONS} times" in r.json()["error"]
    with live.store.connect() as conn:
        me = conn.execute("SELECT annotator_id FROM annotators WHERE name = 'racer'").fetchone()[0]
        assert db.task(conn, me, item_id)["edited"] == first


def test_a_draft_posted_from_before_an_answer_is_refused(live):
    """A draft in flight when the answer lands (or posted by another tab) must not come back when the item is
    reopened; a page opened after the answer still saves drafts of a revision."""
    client, _ = client_for(live, "late-draft")
    item_id = give(live, "late-draft", "paris")
    csrf = csrf_of(client)
    edited = PAIRS[3]["rejected"].replace("Lyon", "Paris")
    opened = data_of(client, item_id)
    draft = {"item_id": item_id, "text": edited, "version": opened["version"], "csrf": csrf}
    assert client.post("/api/draft", json=draft).status_code == 200
    assert client.post("/api/answer", json={"item_id": item_id, "action": "submit", "text": edited,
                                            "csrf": csrf}).status_code == 200
    r = client.post("/api/draft", json=dict(draft, text=edited + " Late."))
    assert r.status_code == 409 and r.json()["error"] == "this item changed in another tab: reload the page"
    reopened = data_of(client, item_id)
    assert not reopened["server_draft"] and reopened["start_text"] == edited
    assert reopened["version"] != opened["version"]
    revising = dict(draft, text=edited + " Revised.", version=reopened["version"])
    assert client.post("/api/draft", json=revising).status_code == 200
    assert data_of(client, item_id)["start_text"] == edited + " Revised."
    r = client.post("/api/draft", json=dict(revising, version="1"))
    assert r.status_code == 400 and r.json()["field"] == "version"


def test_two_databases_at_one_origin_have_different_draft_keys(tmp_path):
    """The page keeps unsent drafts in localStorage, one per origin: a pending draft of one database must not
    be restored into the same annotator and item ids of another one served later at the same address."""
    keys = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        server = start_live(tmp_path / name, PAIRS)
        try:
            client, _ = client_for(server, "same-name")
            keys.append(data_of(client, current(client))["draft_key"])
            client.close()
        finally:
            server.stop()
    assert keys[0].endswith(":2:1") and keys[1].endswith(":2:1")  # annotator 2 (after the admin), item 1
    assert keys[0] != keys[1]


def test_two_annotators_submitting_at_once_lose_nothing(live):
    """Six annotators post their answers at the same instant; all six land, in one transaction each."""
    clients = [client_for(live, f"burst{i}") for i in range(6)]
    jobs = []
    for c, _ in clients:
        item_id = current(c)
        jobs.append((c, item_id, csrf_of(c)))
    barrier = threading.Barrier(len(jobs))
    codes: list[int] = []

    def post(c, item_id, csrf):
        barrier.wait()
        r = c.post("/api/answer", json={"item_id": item_id, "action": "submit", "text": f"edited by {id(c)}",
                                        "csrf": csrf})
        codes.append(r.status_code)

    threads = [threading.Thread(target=post, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 6
    with live.store.connect() as conn:
        n = conn.execute("SELECT COUNT(*) FROM tasks t JOIN annotators a USING (annotator_id) "
                         "WHERE a.name LIKE 'burst%' AND t.status = 'submit'").fetchone()[0]
    assert n == 6


def test_access_log_drops_query_strings():
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/login?token=1.secret", "1.1", 200), None)
    assert NoQueryStrings().filter(record)
    assert "secret" not in record.getMessage() and "/login?[query removed]" in record.getMessage()
    config = log_config()
    assert config["handlers"]["access"]["filters"] == ["no_query"]
    assert config["handlers"]["access"]["stream"] == "ext://sys.stderr"
