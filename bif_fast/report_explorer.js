// The per-token explorer of bif_fast's HTML report (the paper's Figure 16, both directions), with no
// network access: the data is the JSON in <script id="bif-data">, written by bif_fast/report.py.
//
// Values are posterior correlations (the negative of the normalised BIF): positive (red) for a proponent.
// The loss at position t of a text predicts its piece t + 1, so a unit (t) colours piece t + 1.
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("bif-data").textContent);
  const $ = (id) => document.getElementById(id);
  const PRO = [214, 39, 40], OPP = [31, 119, 180];

  function color(v, vmax) {
    const a = vmax > 0 ? Math.min(1, Math.abs(v) / vmax) : 0;
    const c = v > 0 ? PRO : OPP;
    return `rgba(${c[0]},${c[1]},${c[2]},${a.toFixed(2)})`;
  }

  function decode(b64) {
    const bin = atob(b64);
    const out = new Int8Array(bin.length);
    for (let k = 0; k < bin.length; k++) out[k] = (bin.charCodeAt(k) << 24) >> 24;
    return out;
  }

  function fmt(v) {
    return (v >= 0 ? "+" : "") + v.toFixed(3);
  }

  // Pieces of a text as spans; values[t] colours piece t + 1; onClick(t) for the positions with a value.
  function renderPieces(el, pieces, positions, values, onClick, side) {
    el.textContent = "";
    const byPos = new Map();
    positions.forEach((t, k) => byPos.set(t, values[k]));
    let vmax = 0;
    for (const v of values) vmax = Math.max(vmax, Math.abs(v));
    pieces.forEach((piece, k) => {
      const span = document.createElement("span");
      span.textContent = piece;
      const t = k - 1;
      if (byPos.has(t)) {
        const v = byPos.get(t);
        span.style.background = color(v, vmax);
        span.title = fmt(v);
        span.className = "tok";
        span.dataset.side = side;
        span.dataset.pos = String(t);
        span.addEventListener("click", () => onClick(t, span));
      }
      el.appendChild(span);
    });
  }

  function context(pieces, t, width) {
    const k = t + 1;
    const lo = Math.max(0, k - width), hi = Math.min(pieces.length, k + width + 1);
    const left = pieces.slice(lo, k).join(""), mid = pieces[k] === undefined ? "" : pieces[k];
    const right = pieces.slice(k + 1, hi).join("");
    return [left, mid, right];
  }

  function contextItem(label, v, pieces, t) {
    const li = document.createElement("li");
    const [l, m, r] = context(pieces, t, 12);
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = fmt(v);
    const code = document.createElement("code");
    code.append(document.createTextNode(l));
    const mark = document.createElement("mark");
    mark.textContent = m;
    code.append(mark, document.createTextNode(r));
    li.append(score, document.createTextNode(" " + label + " "), code);
    return li;
  }

  let state = { query: 0, block: 0 };

  function currentBlock() {
    return D.blocks[state.query][state.block];
  }

  function showQueryToken(t, span) {
    const info = $("token-info");
    info.textContent = "";
    const q = D.queries[state.query];
    const k = q.positions.indexOf(t);
    const head = document.createElement("div");
    head.className = "small";
    head.textContent = `Query ${state.query}, token ${t + 1} (${JSON.stringify(q.pieces[t + 1])}): ` +
      `its top training tokens over the whole training set`;
    const ol = document.createElement("ol");
    ol.id = "token-top";
    for (const [i, ti, v] of q.top[k]) ol.append(contextItem(`passage ${i}`, v, D.train[i], ti));
    info.append(head, ol);
    document.querySelectorAll(".tok.selected").forEach((s) => s.classList.remove("selected"));
    span.classList.add("selected");
  }

  function showPassageToken(t, span) {
    const info = $("token-info");
    info.textContent = "";
    const b = currentBlock(), q = D.queries[state.query];
    const r = b.rows.indexOf(t), cells = decode(b.data), ncol = b.cols.length;
    const items = b.cols.map((c, k) => [c, (cells[r * ncol + k] / 127) * b.scale]);
    items.sort((x, y) => y[1] - x[1]);
    const head = document.createElement("div");
    head.className = "small";
    head.textContent = `Passage ${b.i}, token ${t + 1} (${JSON.stringify(D.train[b.i][t + 1])}): ` +
      `the query tokens it moves with most`;
    const ol = document.createElement("ol");
    ol.id = "token-top";
    for (const [c, v] of items.slice(0, D.topTokens)) ol.append(contextItem(`query ${state.query}`, v, q.pieces, c));
    info.append(head, ol);
    document.querySelectorAll(".tok.selected").forEach((s) => s.classList.remove("selected"));
    span.classList.add("selected");
  }

  function drawHeatmap(b) {
    const canvas = $("heatmap");
    const nrow = b.rows.length, ncol = b.cols.length;
    const cell = Math.max(2, Math.min(14, Math.floor(560 / Math.max(nrow, ncol))));
    canvas.width = ncol * cell;
    canvas.height = nrow * cell;
    canvas.dataset.rows = String(nrow);
    canvas.dataset.cols = String(ncol);
    const ctx = canvas.getContext("2d");
    const cells = decode(b.data);
    for (let r = 0; r < nrow; r++) {
      for (let c = 0; c < ncol; c++) {
        const v = cells[r * ncol + c] / 127;
        ctx.fillStyle = "#fff";
        ctx.fillRect(c * cell, r * cell, cell, cell);
        ctx.fillStyle = color(v, 1);
        ctx.fillRect(c * cell, r * cell, cell, cell);
      }
    }
    canvas.onmousemove = (ev) => {
      const c = Math.floor(ev.offsetX / cell), r = Math.floor(ev.offsetY / cell);
      if (r < 0 || r >= nrow || c < 0 || c >= ncol) return;
      const v = (cells[r * ncol + c] / 127) * b.scale;
      const tp = D.train[b.i][b.rows[r] + 1], qp = D.queries[state.query].pieces[b.cols[c] + 1];
      $("heat-info").textContent = `passage token ${b.rows[r] + 1} ${JSON.stringify(tp)} x query token ` +
        `${b.cols[c] + 1} ${JSON.stringify(qp)}: ${fmt(v)}`;
    };
    $("heat-scale").textContent = `colour scale: ±${b.scale.toFixed(3)} (this block's largest |correlation|)`;
  }

  function renderPair() {
    const b = currentBlock(), q = D.queries[state.query];
    renderPieces($("query-view"), q.pieces, b.cols, b.colSum, showQueryToken, "query");
    renderPieces($("passage-view"), D.train[b.i], b.rows, b.rowSum, showPassageToken, "passage");
    $("pair-score").textContent = `passage ${b.i}: mean correlation ${fmt(b.score)}`;
    drawHeatmap(b);
    $("token-info").textContent = "Click a token above to see the tokens it moves with most.";
  }

  function fillPassages() {
    const sel = $("passage-select");
    sel.textContent = "";
    D.blocks[state.query].forEach((b, k) => {
      const opt = document.createElement("option");
      opt.value = String(k);
      opt.textContent = `passage ${b.i} (${fmt(b.score)})`;
      sel.append(opt);
    });
    state.block = 0;
    sel.value = "0";
  }

  function init() {
    const qs = $("query-select");
    D.queries.forEach((q, j) => {
      const opt = document.createElement("option");
      opt.value = String(j);
      opt.textContent = `query ${j}: ${q.pieces.join("").slice(0, 60)}`;
      qs.append(opt);
    });
    qs.addEventListener("change", () => {
      state.query = Number(qs.value);
      fillPassages();
      renderPair();
    });
    $("passage-select").addEventListener("change", () => {
      state.block = Number($("passage-select").value);
      renderPair();
    });
    fillPassages();
    renderPair();
    document.body.dataset.explorer = "ready";
  }

  init();
})();
