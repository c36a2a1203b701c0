/* finegrain annotate: what every page does (log out). */
(function () {
  "use strict";
  const button = document.getElementById("logout");
  if (!button) return;
  button.addEventListener("click", function () {
    const csrf = document.querySelector('meta[name="csrf-token"]').content;
    fetch("/logout", { method: "POST", credentials: "same-origin",
                       headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
                       body: JSON.stringify({ csrf: csrf }) })
      .then(function () { location.assign("/login"); });
  });
})();
