// saepipe feature browser: a feature page's explanation and scores from `saepipe label`, read from the page's
// labels/<block>.js. Text goes in through textContent only: an explanation is an LLM's untrusted output.
"use strict";
(function () {
  const box = document.getElementById("label");
  const labels = window.SAEPIPE_FEATURE_LABELS || {};
  const rec = box && labels[document.body.dataset.feature];
  if (!rec) return;
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const pct = (v) => (v === null || v === undefined ? "—" : (100 * v).toFixed(0) + "%");
  box.appendChild(el("h2", "", "Explanation"));
  const text = rec.status === "ok" ? rec.explanation : rec.status === "polysemantic" ? "POLYSEMANTIC" : "(no explanation)";
  box.appendChild(el("p", "explanation", text));
  const dl = el("dl", "stats");
  const rows = [
    ["detection", pct(rec.detection_accuracy) + " accuracy, F1 " + pct(rec.detection_f1) + " (" + rec.detection_n + " excerpts)"],
    ["fuzzing", pct(rec.fuzzing_accuracy) + " accuracy, F1 " + pct(rec.fuzzing_f1) + " (" + rec.fuzzing_n + " excerpts)"],
    ["malformed answers", String(rec.malformed_answers)],
    ["explained by", rec.model],
  ];
  for (const [k, v] of rows) {
    dl.appendChild(el("dt", "", k));
    dl.appendChild(el("dd", "", v));
  }
  box.appendChild(dl);
  box.dataset.status = rec.status;
  box.hidden = false;
})();
