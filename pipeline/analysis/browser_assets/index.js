// saepipe feature browser: the index table. All features' columns arrive as base64 typed arrays in index-data.js
// (a <script src>, since browsers refuse fetch() on file://); only the rows in view are in the DOM, and sorting
// permutes a Uint32Array of row numbers over typed-array keys.
"use strict";
(function () {
  const data = window.SAEPIPE_INDEX;
  const ROW_H = 26, OVERSCAN = 10;
  const KINDS = { f64: Float64Array, f32: Float32Array, i32: Int32Array };

  function decode(col) {
    const bin = atob(col.b64), bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new KINDS[col.dtype](bytes.buffer);
  }

  const n = data.n;
  const cols = {};
  for (const key of Object.keys(data.cols)) cols[key] = decode(data.cols[key]);
  cols.feature = new Int32Array(n);
  for (let i = 0; i < n; i++) cols.feature[i] = i;
  const top = data.top;
  const topLower = top.map((t) => t.join("\u0001").toLowerCase());
  // labels-data.js (saepipe label): scores are -1 where a feature has none, so that they sort below every score
  const labels = window.SAEPIPE_LABELS || { features: [] };
  const labelText = new Array(n).fill("");
  cols.detection_accuracy = new Float64Array(n).fill(-1);
  cols.fuzzing_accuracy = new Float64Array(n).fill(-1);
  labels.features.forEach((f, j) => {
    if (f < 0 || f >= n) return;
    labelText[f] = labels.explanation[j] || (labels.status[j] === "ok" ? "" : labels.status[j]);
    cols.detection_accuracy[f] = labels.detection_accuracy[j] ?? -1;
    cols.fuzzing_accuracy[f] = labels.fuzzing_accuracy[j] ?? -1;
  });
  const labelLower = labelText.map((t) => t.toLowerCase());

  const state = { key: "feature", dir: 1, filter: "all", q: "" };
  let order = new Uint32Array(0);

  const $ = (id) => document.getElementById(id);
  const viewport = $("viewport"), spacer = $("spacer"), rowsBox = $("rows");
  const search = $("search"), filterSel = $("filter"), shown = $("shown");

  function fmt(v, digits) {
    if (v === 0) return "0";
    const a = Math.abs(v);
    return a >= 1e-3 && a < 1e5 ? v.toPrecision(digits) : v.toExponential(digits - 1);
  }

  function matches(i, q, qId) {
    const f = state.filter;
    if (f === "dead" && cols.count[i] !== 0) return false;
    if (f === "alive" && cols.count[i] === 0) return false;
    if (f === "dense" && !(cols.density[i] > data.dense_threshold)) return false;
    if (q === "") return true;
    if (qId !== null && i === qId) return true;
    return topLower[i].includes(q) || labelLower[i].includes(q);
  }

  function applyFilter() {
    // a number finds that feature id, and also tokens containing the digits ("2019")
    const q = state.q.trim().toLowerCase();
    const qId = /^#?\d+$/.test(q) ? parseInt(q.replace("#", ""), 10) : null;
    const text = q.replace(/^#(?=\d+$)/, "");
    const buf = new Uint32Array(n);
    let m = 0;
    for (let i = 0; i < n; i++) if (matches(i, text, qId)) buf[m++] = i;
    order = buf.slice(0, m);
  }

  function applySort() {
    const k = cols[state.key], d = state.dir;
    order.sort((a, b) => (k[a] - k[b]) * d || a - b);
  }

  // A pool of row elements, refilled on scroll; text goes in through textContent only (tokens are untrusted).
  const pool = [];
  function makeRow() {
    const row = document.createElement("div");
    row.className = "frow grid";
    const link = document.createElement("a");
    const cells = [link];
    const first = document.createElement("div");
    first.appendChild(link);
    row.appendChild(first);
    for (let c = 0; c < 9; c++) {
      const cell = document.createElement("div");
      if (c < 7) cell.className = "num";
      if (c === 8) cell.className = "label";
      row.appendChild(cell);
      cells.push(cell);
    }
    row.addEventListener("click", (ev) => { if (ev.target.tagName !== "A") link.click(); });
    return { row, cells };
  }

  function fill(entry, i) {
    const c = entry.cells;
    entry.row.dataset.feature = i;
    entry.row.classList.toggle("dead", cols.count[i] === 0);
    c[0].textContent = String(i);
    c[0].href = "features/" + i + ".html";
    c[1].textContent = fmt(cols.density[i], 3);
    c[2].textContent = String(cols.count[i]);
    c[3].textContent = fmt(cols.max_act[i], 3);
    c[4].textContent = fmt(cols.mean_act[i], 3);
    c[5].textContent = fmt(cols.selectivity[i], 3);
    c[6].textContent = cols.detection_accuracy[i] < 0 ? "—" : cols.detection_accuracy[i].toFixed(2);
    c[7].textContent = cols.fuzzing_accuracy[i] < 0 ? "—" : cols.fuzzing_accuracy[i].toFixed(2);
    c[9].textContent = labelText[i];
    c[9].title = labelText[i];
    const cell = c[8];
    cell.textContent = "";
    for (const t of top[i]) {
      const chip = document.createElement("span");
      chip.className = "chip";
      chip.textContent = t;
      cell.appendChild(chip);
    }
  }

  function render() {
    spacer.style.height = order.length * ROW_H + "px";
    const first = Math.max(0, Math.floor(viewport.scrollTop / ROW_H) - OVERSCAN);
    const count = Math.min(order.length - first, Math.ceil(viewport.clientHeight / ROW_H) + 2 * OVERSCAN);
    while (pool.length < count) {
      const e = makeRow();
      pool.push(e);
      rowsBox.appendChild(e.row);
    }
    for (let r = 0; r < pool.length; r++) {
      const e = pool[r];
      if (r < count) {
        fill(e, order[first + r]);
        e.row.style.display = "";
      } else {
        e.row.style.display = "none";
      }
    }
    rowsBox.style.transform = "translateY(" + first * ROW_H + "px)";
    shown.textContent = order.length.toLocaleString("en") + " of " + n.toLocaleString("en") + " features";
    for (const h of document.querySelectorAll(".thead > div")) {
      h.classList.toggle("sorted-asc", h.dataset.key === state.key && state.dir > 0);
      h.classList.toggle("sorted-desc", h.dataset.key === state.key && state.dir < 0);
    }
  }

  function saveHash() {
    const p = new URLSearchParams({ sort: state.key, dir: state.dir > 0 ? "asc" : "desc" });
    if (state.filter !== "all") p.set("filter", state.filter);
    if (state.q) p.set("q", state.q);
    history.replaceState(null, "", "#" + p.toString());
  }

  function loadHash() {
    const p = new URLSearchParams(location.hash.slice(1));
    if (p.get("sort") in cols) state.key = p.get("sort");
    state.dir = p.get("dir") === "desc" ? -1 : 1;
    if (["all", "alive", "dead", "dense"].includes(p.get("filter"))) state.filter = p.get("filter");
    state.q = p.get("q") || "";
  }

  function update(refilter) {
    const t0 = performance.now();
    if (refilter) applyFilter();
    applySort();
    render();
    document.body.dataset.sortMs = (performance.now() - t0).toFixed(1);
  }

  for (const h of document.querySelectorAll(".thead > div")) {
    if (!(h.dataset.key in cols)) continue;
    h.addEventListener("click", () => {
      const key = h.dataset.key;
      // numbers read best largest first; feature ids in order
      state.dir = key === state.key ? -state.dir : (key === "feature" ? 1 : -1);
      state.key = key;
      update(false);
      saveHash();
    });
  }
  search.addEventListener("input", () => { state.q = search.value; viewport.scrollTop = 0; update(true); saveHash(); });
  search.addEventListener("keydown", (ev) => {  // Enter on a feature id opens its page
    const m = /^#?(\d+)$/.exec(search.value.trim());
    if (ev.key === "Enter" && m && +m[1] < n) location.href = "features/" + m[1] + ".html";
  });
  filterSel.addEventListener("change", () => { state.filter = filterSel.value; viewport.scrollTop = 0; update(true); saveHash(); });
  viewport.addEventListener("scroll", () => render(), { passive: true });
  window.addEventListener("resize", () => render());

  loadHash();
  search.value = state.q;
  filterSel.value = state.filter;
  update(true);
  document.body.dataset.readyMs = performance.now().toFixed(1);
})();
