/* finegrain annotate: log in with the token in the link's fragment (#token=...).
 * The fragment never reaches the server's logs; it is dropped from the address bar and the
 * history at once, posted once, and the server answers with an HttpOnly cookie. */
(function () {
  "use strict";
  const status = document.getElementById("login-status");
  const match = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  history.replaceState(null, "", location.pathname);
  if (!match) {
    status.textContent = "Open your personal login link (it ends in #token=...). Ask your admin for one.";
    return;
  }
  fetch("/login", { method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
                    body: JSON.stringify({ token: decodeURIComponent(match[1]) }) })
    .then(function (r) {
      if (!r.ok) {
        document.title = "Not allowed · finegrain annotate";
        status.textContent = "This login link is not valid (HTTP " + r.status + "). Ask your admin for a new one.";
        status.className = "error";
        return;
      }
      return r.json().then(function (body) { location.replace(body.next || "/"); });
    })
    .catch(function () { status.textContent = "The server cannot be reached. Is finegrain annotate serve running?"; });
})();
