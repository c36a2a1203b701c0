/* finegrain annotate: the editing page.
 *
 * Model and user text only ever reaches the page through textContent and text nodes (never
 * innerHTML), so a response holding <script> or onerror= shows as text.
 * Drafts: every change is kept in localStorage at once and posted to the server (debounced);
 * on load a draft the server never acknowledged wins over the server's copy. A draft carries the
 * task's version the page was opened at: the server refuses (409) one from before an answer, and
 * a local one from before an answer is not restored (the answer wins).
 */
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("fg-data").textContent);
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const tokenizer = FGDiff.makeTokenizer(data.word_class, data.space_class);
  const $ = function (id) { return document.getElementById(id); };
  const box = $("edit"), note = $("note"), original = $("original"), diffView = $("diff");
  const ratioEl = $("ratio"), warnEl = $("ratio-warning"), statusEl = $("save-status"), errorEl = $("action-error");
  const localKey = "finegrain-annotate:draft:" + data.draft_key;
  const IDLE_MS = 120000, SAVE_DELAY_MS = 600, RETRY_MS = 5000;

  let spans = data.start_spans.map(function (s) { return s.slice(); });  // [start, end, type], code points
  let activeS = data.active_s || 0;
  let lastInput = Date.now(), lastTick = performance.now();
  let saveTimer = null, dirty = false, inFlight = false, busy = false, answered = false, overLimitConfirmed = false;
  let current = null;  // the latest edit stats

  /* ------------------------------------------------------------ code points <-> UTF-16 */
  function cpToUnit(text, cp) {  // UTF-16 index of code point offset cp
    let unit = 0;
    for (let n = 0; n < cp && unit < text.length; n++) unit += text.codePointAt(unit) > 0xffff ? 2 : 1;
    return unit;
  }
  function unitToCp(text, unit) { return Array.from(text.slice(0, unit)).length; }

  /* ------------------------------------------------------------ the original, with marked spans */
  function renderOriginal() {
    const text = data.original;
    const cuts = new Set([0, text.length]);
    const units = spans.map(function (s) { return [cpToUnit(text, s[0]), cpToUnit(text, s[1]), s[2]]; });
    units.forEach(function (u) { cuts.add(u[0]); cuts.add(u[1]); });
    const points = Array.from(cuts).sort(function (p, q) { return p - q; });
    original.replaceChildren();
    for (let k = 0; k + 1 < points.length; k++) {
      const lo = points[k], hi = points[k + 1];
      const piece = document.createTextNode(text.slice(lo, hi));
      const types = units.filter(function (u) { return u[0] <= lo && hi <= u[1]; }).map(function (u) { return u[2]; });
      if (types.length) {
        const mark = document.createElement("mark");
        mark.className = "error-span";
        mark.title = types.join(", ");
        mark.appendChild(piece);
        original.appendChild(mark);
      } else {
        original.appendChild(piece);
      }
    }
    const list = $("span-list");
    list.replaceChildren();
    spans.forEach(function (s, n) {
      const li = document.createElement("li");
      const quote = document.createElement("q");
      quote.textContent = Array.from(text).slice(s[0], s[1]).join("");
      const kind = document.createElement("span");
      kind.className = "span-type";
      kind.textContent = s[2];
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "link";
      remove.textContent = "remove";
      remove.addEventListener("click", function () { spans.splice(n, 1); renderOriginal(); changed(); });
      li.append(kind, " ", quote, " ", remove);
      list.appendChild(li);
    });
  }

  /* The selection inside the original as [start, end) code points, whitespace trimmed; null if none. */
  function selectedSpan() {
    const sel = window.getSelection();
    if (!sel || !sel.rangeCount || sel.isCollapsed) return null;
    const r = sel.getRangeAt(0);
    if (!original.contains(r.startContainer) || !original.contains(r.endContainer)) return null;
    const before = document.createRange();
    before.selectNodeContents(original);
    before.setEnd(r.startContainer, r.startOffset);
    let lo = before.toString().length, hi = lo + r.toString().length;
    const text = data.original;
    while (lo < hi && /\s/u.test(text[lo])) lo++;
    while (hi > lo && /\s/u.test(text[hi - 1])) hi--;
    if (lo >= hi) return null;
    return [unitToCp(text, lo), unitToCp(text, hi)];
  }

  function markSelection() {
    const span = selectedSpan();
    if (!span) { showError("Select the flawed words in the original response first."); return; }
    spans.push([span[0], span[1], $("error-type").value]);
    spans.sort(function (p, q) { return p[0] - q[0] || p[1] - q[1]; });
    window.getSelection().removeAllRanges();
    hideError();
    renderOriginal();
    changed();
  }

  /* ------------------------------------------------------------ live diff and edit ratio */
  function renderDiff() {
    const aText = data.original, bText = box.value;
    const A = tokenizer.spans(aText), B = tokenizer.spans(bText);
    const ops = new FGDiff.SequenceMatcher(A.map(function (t) { return t.text; }),
                                           B.map(function (t) { return t.text; })).getOpcodes();
    const frag = document.createDocumentFragment();
    let pos = 0;  // how far into the edited text the view has got
    function plain(upto) { if (upto > pos) frag.appendChild(document.createTextNode(bText.slice(pos, upto))); pos = Math.max(pos, upto); }
    function tagged(name, text) { const el = document.createElement(name); el.textContent = text; frag.appendChild(el); }
    for (const [tag, i1, i2, j1, j2] of ops) {
      if (tag === "equal") { plain(B[j2 - 1].end); continue; }
      if (j2 > j1) plain(B[j1].start);
      if (i2 > i1) tagged("del", aText.slice(A[i1].start, A[i2 - 1].end));
      if (j2 > j1) { tagged("ins", bText.slice(B[j1].start, B[j2 - 1].end)); pos = B[j2 - 1].end; }
    }
    plain(bText.length);
    diffView.replaceChildren(frag);
  }

  function renderRatio() {
    current = FGDiff.editStats(tokenizer, data.original, box.value);
    const r = current.edit_ratio, limit = data.max_edit_ratio;
    ratioEl.textContent = r.toFixed(3);
    ratioEl.dataset.editRatio = String(r);
    ratioEl.classList.toggle("over", r > limit);
    $("ratio-bar").style.width = Math.min(100, r * 100) + "%";
    $("ratio-bar").classList.toggle("over", r > limit);
    $("ratio-limit-mark").style.left = (limit * 100) + "%";
    $("ratio-counts").textContent = current.tokens_deleted + " words deleted, " + current.tokens_inserted +
      " inserted, of " + current.original_tokens;
    warnEl.hidden = !(r > limit);
    if (!(r > limit)) overLimitConfirmed = false;
  }

  function render() { renderDiff(); renderRatio(); }

  /* ------------------------------------------------------------ drafts */
  function draftRecord(pending) {
    return { text: box.value, spans: spans, note: note.value, active_s: activeS, pending: pending,
             version: data.version, t: Date.now() };
  }
  function keepLocally(pending) {
    if (answered) return;  // the answer is stored: a draft kept now would outlive it
    try { localStorage.setItem(localKey, JSON.stringify(draftRecord(pending))); } catch (e) { /* storage full or off */ }
  }
  function setStatus(text, cls) { statusEl.textContent = text; statusEl.className = "muted " + (cls || ""); }

  function changed() {
    dirty = true;
    keepLocally(true);
    setStatus("Saving…");
    clearTimeout(saveTimer);
    saveTimer = setTimeout(saveDraft, SAVE_DELAY_MS);
  }

  function post(url, body) {
    body.csrf = csrf;
    return fetch(url, { method: "POST", credentials: "same-origin", keepalive: true,
                        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
                        body: JSON.stringify(body) });
  }

  function saveDraft() {  // never while an answer is being posted (busy): the answer drops the draft
    if (inFlight || busy) { clearTimeout(saveTimer); saveTimer = setTimeout(saveDraft, SAVE_DELAY_MS); return; }
    if (!dirty) return;
    dirty = false;
    inFlight = true;
    const record = draftRecord(false);
    post("/api/draft", { item_id: data.item_id, text: record.text, spans: record.spans, note: record.note,
                         active_s: activeS, version: data.version })
      .then(function (r) {
        if (r.status === 409) {  // answered since this page was opened: nothing stored, retrying cannot help
          return r.json().then(function (body) { if (!busy) setStatus("Not saved: " + body.error, "unsaved"); });
        }
        if (!r.ok) throw new Error("HTTP " + r.status);
        if (!dirty) keepLocally(false);
        setStatus("Draft saved " + new Date().toLocaleTimeString(), "saved");
        statusEl.dataset.saved = "1";
      })
      .catch(function () {
        dirty = true;
        setStatus("Not saved on the server yet (kept in this browser; retrying)", "unsaved");
        clearTimeout(saveTimer);
        saveTimer = setTimeout(saveDraft, RETRY_MS);
      })
      .finally(function () { inFlight = false; });
  }

  function restore() {
    let text = data.start_text, noteText = data.note || "";
    let local = null;
    try { local = JSON.parse(localStorage.getItem(localKey) || "null"); } catch (e) { local = null; }
    if (local && local.pending && typeof local.text === "string" && local.version === data.version) {
      // the server never got it, and the task was not answered since it was written
      text = local.text;
      spans = Array.isArray(local.spans) ? local.spans : spans;
      noteText = typeof local.note === "string" ? local.note : noteText;
      activeS = Math.max(activeS, Number(local.active_s) || 0);
      dirty = true;
      setTimeout(saveDraft, 0);
      setStatus("Restored an unsaved draft from this browser", "unsaved");
    } else if (data.server_draft) {
      setStatus("Draft restored", "saved");
    }
    box.value = text;
    note.value = noteText;
  }

  /* ------------------------------------------------------------ answers */
  function showError(text) { errorEl.textContent = text; errorEl.hidden = false; }
  function hideError() { errorEl.hidden = true; errorEl.textContent = ""; }

  function act(action) {
    if (busy) return;
    hideError();
    if (action === "submit") {
      renderRatio();
      if (current.edit_ratio > data.max_edit_ratio && !overLimitConfirmed) {
        overLimitConfirmed = true;
        warnEl.hidden = false;
        showError("This edit is past the limit (" + current.edit_ratio.toFixed(3) + " > " + data.max_edit_ratio +
                  "). Press Submit again to keep it anyway.");
        return;
      }
    }
    busy = true;
    clearTimeout(saveTimer);
    setButtons(true);
    post("/api/answer", { item_id: data.item_id, action: action, text: box.value, spans: spans, note: note.value,
                          flag_reason: $("flag-reason").value, active_s: activeS })
      .then(function (r) {
        return r.json().then(function (body) {
          if (!r.ok) throw new Error(body.error || ("HTTP " + r.status));
          answered = true;
          try { localStorage.removeItem(localKey); } catch (e) { /* ignore */ }
          location.assign(body.next || "/");
        });
      })
      .catch(function (e) {
        busy = false;
        setButtons(false);
        showError("Not saved: " + e.message);
      });
  }

  function setButtons(disabled) {
    document.querySelectorAll(".actions button").forEach(function (b) { b.disabled = disabled; });
  }

  /* ------------------------------------------------------------ guidelines, keys, time */
  function toggleGuidelines(show) {
    const g = $("guidelines");
    g.hidden = show === undefined ? !g.hidden : !show;
    if (!g.hidden) $("guidelines-close").focus();
  }

  function typing(target) { return target && (target.tagName === "TEXTAREA" || target.tagName === "INPUT" ||
                                              target.tagName === "SELECT"); }

  document.addEventListener("keydown", function (e) {
    lastInput = Date.now();
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); act("submit"); return; }
    if (e.altKey && !e.ctrlKey && !e.metaKey) {
      const keys = { KeyN: function () { act("nothing"); }, KeyS: function () { if ($("btn-skip")) act("skip"); },
                     KeyX: function () { act("flag"); }, KeyM: markSelection, KeyG: function () { toggleGuidelines(); } };
      if (keys[e.code]) { e.preventDefault(); keys[e.code](); return; }
    }
    if (e.key === "Escape") { toggleGuidelines(false); return; }
    if (e.key === "?" && !typing(e.target)) { e.preventDefault(); toggleGuidelines(); }
  });
  ["mousemove", "scroll", "pointerdown"].forEach(function (ev) {
    document.addEventListener(ev, function () { lastInput = Date.now(); }, { passive: true });
  });
  setInterval(function () {
    const now = performance.now();
    if (document.visibilityState === "visible" && Date.now() - lastInput < IDLE_MS) activeS += (now - lastTick) / 1000;
    lastTick = now;
  }, 1000);
  document.addEventListener("visibilitychange", function () {
    lastTick = performance.now();
    if (document.visibilityState === "hidden" && dirty) saveDraft();
  });

  /* ------------------------------------------------------------ wiring */
  let renderTimer = null;
  box.addEventListener("input", function () {
    changed();
    clearTimeout(renderTimer);
    renderTimer = setTimeout(render, 60);
  });
  note.addEventListener("input", changed);
  document.querySelectorAll(".actions button[data-action]").forEach(function (b) {
    b.addEventListener("click", function () { act(b.dataset.action); });
  });
  $("btn-mark").addEventListener("click", markSelection);
  $("btn-reset-original").addEventListener("click", function () { box.value = data.original; render(); changed(); });
  if ($("btn-reset-prefill")) {
    $("btn-reset-prefill").addEventListener("click", function () { box.value = data.prefill; render(); changed(); });
  }
  $("guidelines-close").addEventListener("click", function () { toggleGuidelines(false); });
  const link = $("guidelines-link");
  if (link) link.addEventListener("click", function (e) { e.preventDefault(); toggleGuidelines(true); });

  restore();
  renderOriginal();
  render();
  box.focus();
  window.FG = { tokenizer: tokenizer, editStats: function (a, b) { return FGDiff.editStats(tokenizer, a, b); },
                opcodes: function (a, b) {
                  return new FGDiff.SequenceMatcher(tokenizer.words(a), tokenizer.words(b)).getOpcodes();
                },
                words: tokenizer.words, ready: true };
})();
