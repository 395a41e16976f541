// WriteSAE atom dashboard: reads window.WRITESAE_DASHBOARD (data.js), no network.
(function () {
  "use strict";
  const D = window.WRITESAE_DASHBOARD;
  const $ = (sel, root) => (root || document).querySelector(sel);
  const atoms = D ? D.atoms : [];
  const vocab = D ? D.vocab : [];
  const meta = D ? D.meta : {};

  // numbers: 4 significant digits, percentages: 3
  function fmt(x) {
    if (x === null || x === undefined) return "\u2013";
    if (x === 0) return "0";
    return String(Number(x.toPrecision(4)));
  }
  function pct(x) {
    if (x === null || x === undefined) return "\u2013";
    return String(Number((100 * x).toPrecision(3))) + "%";
  }
  function el(tag, attrs, children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") e.textContent = v;
      else e.setAttribute(k, v);
    }
    for (const c of children || []) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    return e;
  }
  function showTok(id) {
    const s = vocab[id] === undefined ? "<" + id + ">" : vocab[id];
    return s.replace(/\n/g, "\u23ce");
  }
  function tokenSet(a) {
    if (a._tokens) return a._tokens;
    const ids = new Set();
    for (const c of a.contexts) ids.add(c.tokens[c.pos - c.start]);
    for (const k of a.key_tokens) ids.add(k.token);
    for (const p of a.promoted) ids.add(p.token);
    a._tokens = Array.from(ids).map((i) => (vocab[i] || "").toLowerCase());
    return a._tokens;
  }
  function firingTokens(a) {
    const seen = [];
    for (const c of a.contexts) {
      const t = showTok(c.tokens[c.pos - c.start]);
      if (!seen.includes(t)) seen.push(t);
      if (seen.length === 4) break;
    }
    return seen;
  }

  // ------------------------------------------------------------------ index
  let sortKey = "fire_rate", sortDesc = true;
  function sortValue(a, key) {
    const v = a[key];
    if (v === null || v === undefined) return -Infinity;
    return typeof v === "boolean" ? Number(v) : v;
  }
  function renderIndex() {
    const q = $("#search").value.trim().toLowerCase();
    const hideDead = $("#hide-dead").checked;
    let rows = atoms.filter((a) => !(hideDead && a.dead) && (!q || tokenSet(a).some((t) => t.includes(q))));
    rows.sort((x, y) => {
      const d = sortValue(x, sortKey) - sortValue(y, sortKey);
      return (sortDesc ? -d : d) || x.atom - y.atom;
    });
    const body = $("#atoms tbody");
    body.textContent = "";
    for (const a of rows) {
      const tr = el("tr", { "data-atom": a.atom, class: a.dead ? "dead" : "" }, [
        el("td", { text: String(a.atom) }),
        el("td", { text: pct(a.fire_rate), "data-field": "fire_rate" }),
        el("td", { text: fmt(a.mean_act), "data-field": "mean_act" }),
        el("td", { text: pct(a.fve_share), "data-field": "fve_share" }),
        el("td", { text: pct(a.win_rate), "data-field": "win_rate" }),
        el("td", { text: a.dead ? "dead" : "alive", class: "text" }),
        el("td", { class: "text" }, firingTokens(a).map((t) => el("span", { class: "tok", text: t + " " }))),
      ]);
      tr.addEventListener("click", () => { location.hash = "#atom-" + a.atom; });
      body.appendChild(tr);
    }
    $("#count").textContent = rows.length + " of " + atoms.length + " atoms";
    for (const th of document.querySelectorAll("#atoms th[data-key]")) {
      th.removeAttribute("data-order");
      if (th.dataset.key === sortKey) th.setAttribute("data-order", sortDesc ? "desc" : "asc");
    }
  }

  // ------------------------------------------------------------------ atom page
  function shade(act, max) {
    const f = max > 0 ? Math.max(0, Math.min(1, act / max)) : 0;
    return "rgba(216, 119, 59, " + (0.85 * f).toFixed(3) + ")";
  }
  function tokenLine(tokens, start, values, mark, markClass, max) {
    return tokens.map((id, j) => {
      const pos = start + j;
      const attrs = { class: "tok" + (pos === mark ? " " + markClass : ""), "data-pos": pos };
      if (values) {
        attrs.style = "background:" + shade(values[j], max);
        attrs.title = "pos " + pos + " \u00b7 act " + fmt(values[j]);
        attrs["data-act"] = String(values[j]);
      } else {
        attrs.title = "pos " + pos;
      }
      attrs.text = showTok(id);
      return el("span", attrs);
    });
  }
  function histogram(a) {
    const W = 420, H = 150, L = 40, B = 28, n = a.hist.length;
    const top = Math.max(1, ...a.hist);
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("width", W);
    svg.setAttribute("height", H);
    svg.setAttribute("id", "histogram");
    const bw = (W - L - 10) / n;
    const mk = (tag, at) => {
      const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
      for (const [k, v] of Object.entries(at)) e.setAttribute(k, v);
      svg.appendChild(e);
      return e;
    };
    a.hist.forEach((c, i) => {
      const h = ((H - B - 8) * c) / top;
      const lo = (a.max_act * i) / n, hi = (a.max_act * (i + 1)) / n;
      const r = mk("rect", { class: "bar", x: L + i * bw, y: H - B - h, width: Math.max(1, bw - 1), height: h, "data-count": c });
      const t = document.createElementNS("http://www.w3.org/2000/svg", "title");
      t.textContent = "[" + fmt(lo) + ", " + fmt(hi) + "): " + c;
      r.appendChild(t);
    });
    mk("line", { x1: L, y1: H - B, x2: W - 10, y2: H - B, stroke: "#888" });
    mk("line", { x1: L, y1: 8, x2: L, y2: H - B, stroke: "#888" });
    const lab = (x, y, s, anchor) => { const t = mk("text", { x: x, y: y, "text-anchor": anchor }); t.textContent = s; };
    lab(L, H - B + 13, "0", "middle");
    lab(W - 10, H - B + 13, fmt(a.max_act), "end");
    lab((L + W) / 2, H - 4, "activation (nonzero codes)", "middle");
    lab(L - 4, 14, String(top), "end");
    lab(L - 4, H - B, "0", "end");
    return svg;
  }
  function panel(title, note, children, id) {
    const kids = [el("h3", { text: title })];
    if (note) kids.push(el("p", { class: "note", text: note }));
    return el("div", { class: "panel", id: id }, kids.concat(children));
  }
  function smallTable(head, rows, id) {
    return el("table", { class: "small", id: id }, [
      el("thead", {}, [el("tr", {}, head.map((h) => el("th", { text: h })))]),
      el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c) => (typeof c === "string" ? el("td", { text: c }) : c))))),
    ]);
  }
  function signed(x) {
    return el("td", { text: fmt(x), class: x > 0 ? "pos" : x < 0 ? "neg" : "" });
  }
  function tokenTable(list, head, id) {
    return smallTable(head, list.map((t) => [el("td", { class: "text" }, [el("span", { class: "tok", text: showTok(t.token) })]), signed(t.value), signed(t.other)]), id);
  }
  function atomLink(n) {
    return el("a", { href: "#atom-" + n.atom }, ["atom " + n.atom]);
  }
  function renderAtom(i) {
    const a = atoms[i];
    const view = $("#atom-view");
    view.textContent = "";
    if (!a) { view.appendChild(el("p", { text: "no atom " + i })); return; }
    const nav = el("div", { class: "nav" }, [
      el("a", { href: "#", text: "\u2190 all atoms" }),
      el("a", { href: "#atom-" + Math.max(0, i - 1), text: "previous" }),
      el("a", { href: "#atom-" + Math.min(atoms.length - 1, i + 1), text: "next" }),
    ]);
    const stat = (label, field, text) => el("span", {}, [label + " ", el("b", { "data-field": field, text: text })]);
    const stats = el("div", { class: "stats", id: "atom-stats" }, [
      stat("fire rate", "fire_rate", pct(a.fire_rate)),
      stat("mean act", "mean_act", fmt(a.mean_act)),
      stat("max act", "max_act", fmt(a.max_act)),
      stat("FVE share", "fve_share", pct(a.fve_share)),
      stat("win rate", "win_rate", pct(a.win_rate)),
      stat("status", "dead", a.dead ? "dead" : "alive"),
    ]);
    view.appendChild(nav);
    view.appendChild(el("h2", { id: "atom-title", text: "Atom " + a.atom }));
    view.appendChild(stats);

    const ctx = a.contexts.map((c, j) => el("div", { class: "context", "data-index": j }, [
      el("span", { class: "val", text: fmt(c.act) }),
      el("span", { class: "line" }, tokenLine(c.tokens, c.start, c.acts, c.pos, "fire", a.max_act)),
    ]));
    view.appendChild(el("div", { class: "row" }, [
      panel("Activation histogram", "Nonzero codes over " + meta.n_tokens + " tokens, " + a.hist.length + " equal bins from 0 to the largest.", [histogram(a)], "hist-panel"),
      panel("Top-activating contexts", "Each token shaded by this atom's code there (hover: position and value); the firing token is outlined. Left: its code.", ctx, "contexts"),
    ]));

    const keyRows = a.key_tokens.map((k) => [el("td", { class: "text" }, [el("span", { class: "tok", text: showTok(k.token) })]), signed(k.cos), String(k.n)]);
    const reads = a.reads.map((r, j) => el("div", { class: "context", "data-index": j }, [
      el("span", { class: "val", text: fmt(r.value) }),
      el("span", { class: "line" }, tokenLine(r.tokens, r.start, null, r.pos, "read", 1)),
    ]));
    view.appendChild(el("div", { class: "row" }, [
      panel("Key side: writes along u", "Tokens whose write key k_t is most aligned with u (mean cosine over their occurrences, n = occurrences).", [smallTable(["token", "cos(k, u)", "n"], keyRows, "key-tokens")], "key-panel"),
      panel("Key side: queries that read u", "Positions with the largest |<u, q_t>| (outlined); the read of this atom there is code \u00d7 <u, q_t> \u00d7 w.", reads, "reads"),
    ]));

    view.appendChild(el("div", { class: "row" }, [
      panel("Value side: first order (through the gated norm and the unembedding)", "Logit change per unit move of the head's read along +w at this atom's top-activating tokens (mean over " + a.value_sites.length + "); right column: the direct path.", [
        el("div", { class: "row" }, [
          tokenTable(a.promoted, ["promoted", "first order", "direct"], "promoted"),
          tokenTable(a.suppressed, ["suppressed", "first order", "direct"], "suppressed"),
        ]),
      ], "value-panel"),
      panel("Value side: direct path", "<W_O w, W_U[token]> (the paper's read-out, no norm or later layers); right column: first order.", [
        el("div", { class: "row" }, [
          tokenTable(a.direct_promoted, ["promoted", "direct", "first order"], "direct-promoted"),
          tokenTable(a.direct_suppressed, ["suppressed", "direct", "first order"], "direct-suppressed"),
        ]),
      ], "direct-panel"),
    ]));

    const lags = meta.memory_lags || [];
    const memRows = lags.map((L, j) => [String(L), pct(a.memory.decay[j]), pct(a.memory.exact[j]), String(a.memory.n[j])]);
    view.appendChild(el("div", { class: "row" }, [
      panel("Memory", "Share of a contribution along u written at this atom's strongest firings that remains L tokens later: ||P u|| / ||u||, P the product of the cell's decays, or of its exact transitions (with the erase).", [smallTable(["after L tokens", "decays", "exact", "firings"], memRows, "memory")], "memory-panel"),
      panel("Nearest atoms", "Largest |cosine| of u (key side) and of w (value side) to other atoms.", [
        el("div", { class: "row" }, [
          smallTable(["by u", "cos"], a.near_u.map((n) => [el("td", {}, [atomLink(n)]), signed(n.cos)]), "near-u"),
          smallTable(["by w", "cos"], a.near_w.map((n) => [el("td", {}, [atomLink(n)]), signed(n.cos)]), "near-w"),
        ]),
      ], "nearest-panel"),
    ]));
  }

  // ------------------------------------------------------------------ routing
  function route() {
    const m = /^#atom-(\d+)$/.exec(location.hash);
    $("#index-view").hidden = !!m;
    $("#atom-view").hidden = !m;
    if (m) { renderAtom(Number(m[1])); window.scrollTo(0, 0); }
  }
  function init() {
    if (!D) {
      document.body.appendChild(el("p", { text: "data.js is missing or did not load." }));
      return;
    }
    $("#meta").textContent = (meta.model ? meta.model + " \u00b7 " : "") + "layer " + meta.layer + ", head " + meta.head +
      " \u00b7 " + meta.n_atoms + " atoms (k = " + meta.k + ", input " + meta.input_kind + ") \u00b7 " + meta.n_tokens +
      " tokens (" + meta.n_seq + " \u00d7 " + meta.context + ") \u00b7 FVE " + fmt(meta.fve);
    for (const th of document.querySelectorAll("#atoms th[data-key]")) {
      th.addEventListener("click", () => {
        if (sortKey === th.dataset.key) sortDesc = !sortDesc;
        else { sortKey = th.dataset.key; sortDesc = th.dataset.key !== "atom"; }
        renderIndex();
      });
    }
    $("#search").addEventListener("input", renderIndex);
    $("#hide-dead").addEventListener("change", renderIndex);
    window.addEventListener("hashchange", route);
    renderIndex();
    route();
  }
  init();
})();
