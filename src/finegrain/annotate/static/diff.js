/* finegrain annotate: the word diff and edit ratio of finegrain.edit.distance, in the browser.
 *
 * A line-by-line port of what Python runs for edit_stats(original, edited):
 *   - words: the regex \w+|[^\w\s] with Python's own \w and \s character sets (the server hands
 *     them over, see finegrain/annotate/wordclass.py);
 *   - difflib.SequenceMatcher(None, a, b, autojunk=False): find_longest_match (same loops, same
 *     tie-breaking: the first longest block in a, then in b), get_matching_blocks (the same LIFO
 *     queue, sort and merge of adjacent blocks) and get_opcodes;
 *   - edit_ratio = (deleted + inserted) / (len(a) + len(b)), rounded like Python's round(x, 6).
 * A browser test compares editStats here with Python's on hundreds of random texts.
 */
(function (global) {
  "use strict";

  function makeTokenizer(wordClass, spaceClass) {
    const re = new RegExp("[" + wordClass + "]+|[^" + wordClass + spaceClass + "]", "gu");
    return {
      /* the words of text, as Python's distance.words(text) */
      words: function (text) {
        return Array.from(text.matchAll(re), function (m) { return m[0]; });
      },
      /* the words with their [start, end) offsets in UTF-16 units of text */
      spans: function (text) {
        return Array.from(text.matchAll(re), function (m) {
          return { text: m[0], start: m.index, end: m.index + m[0].length };
        });
      },
    };
  }

  function SequenceMatcher(a, b) {
    this.a = a;
    this.b = b;
    const b2j = new Map();  // element -> increasing indices in b (no junk: autojunk=False, isjunk=None)
    for (let i = 0; i < b.length; i++) {
      let indices = b2j.get(b[i]);
      if (indices === undefined) { indices = []; b2j.set(b[i], indices); }
      indices.push(i);
    }
    this.b2j = b2j;
  }

  /* difflib.SequenceMatcher.find_longest_match: [i, j, size] */
  SequenceMatcher.prototype.findLongestMatch = function (alo, ahi, blo, bhi) {
    const a = this.a, b = this.b, b2j = this.b2j;
    let besti = alo, bestj = blo, bestsize = 0;
    let j2len = new Map();
    for (let i = alo; i < ahi; i++) {
      const newj2len = new Map();
      const indices = b2j.get(a[i]);
      if (indices !== undefined) {
        for (let n = 0; n < indices.length; n++) {
          const j = indices[n];
          if (j < blo) continue;
          if (j >= bhi) break;
          const k = (j2len.get(j - 1) || 0) + 1;
          newj2len.set(j, k);
          if (k > bestsize) { besti = i - k + 1; bestj = j - k + 1; bestsize = k; }
        }
      }
      j2len = newj2len;
    }
    // extend by equal elements on each end (no-ops without junk, kept to match difflib)
    while (besti > alo && bestj > blo && a[besti - 1] === b[bestj - 1]) {
      besti--; bestj--; bestsize++;
    }
    while (besti + bestsize < ahi && bestj + bestsize < bhi && a[besti + bestsize] === b[bestj + bestsize]) {
      bestsize++;
    }
    return [besti, bestj, bestsize];
  };

  /* difflib.SequenceMatcher.get_matching_blocks: [[i, j, size], ..., [la, lb, 0]] */
  SequenceMatcher.prototype.getMatchingBlocks = function () {
    const la = this.a.length, lb = this.b.length;
    const queue = [[0, la, 0, lb]];
    const blocks = [];
    while (queue.length) {
      const [alo, ahi, blo, bhi] = queue.pop();
      const x = this.findLongestMatch(alo, ahi, blo, bhi);
      const [i, j, k] = x;
      if (k) {
        blocks.push(x);
        if (alo < i && blo < j) queue.push([alo, i, blo, j]);
        if (i + k < ahi && j + k < bhi) queue.push([i + k, ahi, j + k, bhi]);
      }
    }
    blocks.sort(function (p, q) { return p[0] - q[0] || p[1] - q[1] || p[2] - q[2]; });
    let i1 = 0, j1 = 0, k1 = 0;
    const out = [];
    for (const [i2, j2, k2] of blocks) {
      if (i1 + k1 === i2 && j1 + k1 === j2) {
        k1 += k2;
      } else {
        if (k1) out.push([i1, j1, k1]);
        i1 = i2; j1 = j2; k1 = k2;
      }
    }
    if (k1) out.push([i1, j1, k1]);
    out.push([la, lb, 0]);
    return out;
  };

  /* difflib.SequenceMatcher.get_opcodes: [[tag, i1, i2, j1, j2], ...] */
  SequenceMatcher.prototype.getOpcodes = function () {
    let i = 0, j = 0;
    const answer = [];
    for (const [ai, bj, size] of this.getMatchingBlocks()) {
      let tag = "";
      if (i < ai && j < bj) tag = "replace";
      else if (i < ai) tag = "delete";
      else if (j < bj) tag = "insert";
      if (tag) answer.push([tag, i, ai, j, bj]);
      i = ai + size;
      j = bj + size;
      if (size) answer.push(["equal", ai, i, bj, j]);
    }
    return answer;
  };

  /* Python's round(x, 6) for 0 <= x <= 1. toFixed rounds the exact binary value half up; Python
   * rounds it half to even. They differ only on exact ties, and a double in [0, 1] is exactly
   * halfway between two 6-decimal numbers only when it is an odd multiple of 1/128. */
  function round6(x) {
    const t = x * 128;  // exact: a power of two
    if (Number.isInteger(t) && t % 2 === 1) {
      const lo = Math.floor(x * 1e6);  // exact: j * 7812.5 for x = j/128
      return (lo % 2 === 0 ? lo : lo + 1) / 1e6;
    }
    return Number(x.toFixed(6));
  }

  /* finegrain.edit.distance.edit_stats(original, edited), same keys */
  function editStats(tokenizer, original, edited) {
    const a = tokenizer.words(original), b = tokenizer.words(edited);
    let deleted = 0, inserted = 0, changed = 0, blocks = 0;
    for (const [tag, i1, i2, j1, j2] of new SequenceMatcher(a, b).getOpcodes()) {
      if (tag === "equal") continue;
      blocks++;
      deleted += i2 - i1;
      inserted += j2 - j1;
      changed += Math.max(i2 - i1, j2 - j1);
    }
    const denom = a.length + b.length;
    return {
      original_tokens: a.length,
      edited_tokens: b.length,
      tokens_deleted: deleted,
      tokens_inserted: inserted,
      changed_tokens: changed,
      changed_blocks: blocks,
      edit_ratio: denom ? round6((deleted + inserted) / denom) : 0.0,
    };
  }

  global.FGDiff = { makeTokenizer: makeTokenizer, SequenceMatcher: SequenceMatcher, round6: round6,
                    editStats: editStats };
})(window);
