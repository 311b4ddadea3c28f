// seedance-batch night page: cards drawn a page at a time from the embedded JSON rows.
// Every value from the results table goes into the DOM as text (textContent) or as an
// attribute of an element we create: never as markup.
"use strict";
(function () {
  const rows = JSON.parse(document.getElementById("rows").textContent);
  const pageSize = Number(document.body.dataset.pageSize) || 60;
  const $ = (id) => document.getElementById(id);
  const grid = $("grid"), shown = $("shown"), pager = $("pager");
  const filters = { st: $("f-status"), m: $("f-model"), sg: $("f-source") };
  const search = $("f-search");
  let hay = null; // lower-cased search text per row, built on the first search
  let matches = rows, page = 0;

  function options(select, key, label) {
    const counts = new Map();
    for (const r of rows) { const v = r[key] || ""; counts.set(v, (counts.get(v) || 0) + 1); }
    const all = document.createElement("option");
    all.value = "*"; all.textContent = "all " + label;
    select.appendChild(all);
    if (key === "st") {
      const bad = document.createElement("option");
      bad.value = "!problems"; bad.textContent = "failed & invalid (" + rows.filter((r) => r.x).length + ")";
      select.appendChild(bad);
    }
    for (const [v, n] of [...counts.entries()].sort((a, b) => b[1] - a[1])) {
      const o = document.createElement("option");
      o.value = v; o.textContent = (v || "(none)") + " (" + n + ")";
      select.appendChild(o);
    }
  }
  options(filters.st, "st", "states"); options(filters.m, "m", "models"); options(filters.sg, "sg", "sources");

  function text(tag, cls, value) {
    const el = document.createElement(tag);
    if (cls) el.className = cls;
    el.textContent = value == null ? "" : String(value);
    return el;
  }

  function play(event) {
    event.preventDefault();
    const link = event.currentTarget;
    const video = document.createElement("video");
    video.controls = true; video.autoplay = true; video.muted = true; video.loop = true;
    video.playsInline = true; video.preload = "auto";
    video.src = link.getAttribute("href");
    link.replaceWith(video);
  }

  function card(r) {
    const el = document.createElement("article");
    el.className = "card" + (r.x ? " bad" : "");
    el.dataset.id = r.id || "";
    el.dataset.state = r.st || "";
    if (r.v) {
      const a = document.createElement("a");
      a.className = "poster"; a.href = r.v; a.title = "play";
      if (r.po) {
        const img = document.createElement("img");
        img.loading = "lazy"; img.decoding = "async"; img.alt = "poster frame"; img.src = r.po;
        a.appendChild(img);
      } else {
        a.appendChild(text("span", "noposter", r.pe || "no poster"));
      }
      a.addEventListener("click", play);
      el.appendChild(a);
    } else {
      el.appendChild(text("div", "poster none", r.pe || (r.x ? "no video" : "not downloaded")));
    }
    const head = document.createElement("div");
    head.className = "head";
    head.appendChild(text("span", "badge s-" + (r.st || "").replace(/[^a-z_]/g, ""), r.st));
    if (r.k && r.s !== r.st) head.appendChild(text("span", "sub", r.s));
    head.appendChild(text("span", "model", r.m));
    if (r.t) head.appendChild(text("span", "tier", r.t));
    el.appendChild(head);
    el.appendChild(text("p", "prompt", r.p == null ? "(no prompt)" : r.p));
    if (r.a) {
      const params = Object.entries(r.a).map(([k, v]) => k + "=" + (typeof v === "object" ? JSON.stringify(v) : v));
      el.appendChild(text("p", "params", params.join("  ")));
    }
    const own = r.c ? Object.entries(r.c).map(([k, v]) => k + "=" + v).join("  ") : "";
    const meta = text("p", "meta", r.src + (own ? "  ·  " + own : ""));
    meta.title = "source row";
    el.appendChild(meta);
    if (r.tid) el.appendChild(text("p", "tid", r.tid));
    if (r.e) el.appendChild(text("p", "error", r.e));
    return el;
  }

  function draw() {
    const pages = Math.max(1, Math.ceil(matches.length / pageSize));
    page = Math.min(page, pages - 1);
    const frag = document.createDocumentFragment();
    for (const r of matches.slice(page * pageSize, (page + 1) * pageSize)) frag.appendChild(card(r));
    grid.replaceChildren(frag);
    shown.textContent = matches.length + " of " + rows.length + " requests";
    $("page-no").textContent = "page " + (page + 1) + " of " + pages;
    $("prev").disabled = page === 0;
    $("next").disabled = page >= pages - 1;
    pager.hidden = pages < 2;
  }

  function apply() {
    const want = { st: filters.st.value, m: filters.m.value, sg: filters.sg.value };
    const q = search.value.trim().toLowerCase();
    if (q && hay === null) {
      hay = rows.map((r) => [r.p, r.id, r.tid, r.e, r.src, r.m, r.st, r.s, r.t,
        r.c ? Object.values(r.c).join("\n") : ""].join("\n").toLowerCase());
    }
    matches = rows.filter((r, i) =>
      (want.st === "*" || (want.st === "!problems" ? r.x : (r.st || "") === want.st)) &&
      (want.m === "*" || (r.m || "") === want.m) &&
      (want.sg === "*" || (r.sg || "") === want.sg) &&
      (!q || hay[i].includes(q)));
    page = 0;
    draw();
  }

  for (const f of Object.values(filters)) f.addEventListener("change", apply);
  let pending = 0;
  search.addEventListener("input", () => { clearTimeout(pending); pending = setTimeout(apply, 120); });
  $("prev").addEventListener("click", () => { page -= 1; draw(); window.scrollTo(0, grid.offsetTop); });
  $("next").addEventListener("click", () => { page += 1; draw(); window.scrollTo(0, grid.offsetTop); });
  for (const b of document.querySelectorAll("[data-state]")) {
    if (b.tagName !== "BUTTON") continue;
    b.addEventListener("click", () => { filters.st.value = b.dataset.state; apply(); });
  }

  draw();
  // When the first page of cards is in the DOM (and, below, painted): for the scale test.
  document.body.dataset.renderedMs = performance.now().toFixed(1);
  requestAnimationFrame(() => { document.body.dataset.paintedMs = performance.now().toFixed(1); });
})();
