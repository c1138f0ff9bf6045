"""A self-contained HTML report of a BIF over text (no external assets).

Scores are shown as the posterior correlation of the losses, the negative of the normalised BIF: positive
(red) for a proponent, a training example whose loss moves with the query's, so that upweighting it lowers
the query's loss; negative (blue) for an opponent. For every query: its top proponents; per token, each
token coloured by its summed correlation with the query. Then what a user needs to decide whether to trust
the run (``diagnostics_rows``): diverged and escaped chains, whether the loss traces settled, the
Monte-Carlo error against the size of the BIF, what the calibration chose and why; and the per-chain loss
traces, with labelled axes.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch

__all__ = ["diagnostics_rows", "explorer_data", "write_report"]

_PROPONENT, _OPPONENT = "214,39,40", "31,119,180"
_COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f"]
# A chain's loss trace has settled when, after its first 10% of draws, the means of the two halves of the rest
# differ by at most this many of its standard deviations.
SETTLED_DRIFT = 0.5
# The Monte-Carlo error against the BIF's size (median standard error over the RMS of the BIF).
PRECISE, RANKABLE = 0.1, 0.3
# The per-token explorer embeds, per query, the token x token blocks of its strongest proponent and opponent
# passages (at most EXPLORER_PASSAGES of each, fewer while the blocks exceed EXPLORER_MAX_CELLS int8 cells in
# all), and each query token's EXPLORER_TOP_TOKENS strongest training tokens over the whole training set.
EXPLORER_PASSAGES, EXPLORER_TOP_TOKENS, EXPLORER_MAX_CELLS = 5, 8, 4_000_000


def _color(v: float, vmax: float) -> str:
    a = min(1.0, abs(v) / vmax) if vmax > 0 else 0.0
    return f"rgba({_PROPONENT if v > 0 else _OPPONENT},{a:.2f})"


def _tokens_html(pieces: str | list[str], values: dict[int, float], vmax: float) -> str:
    """Each piece of a text (a byte-level character or a token) coloured by the value of the position that
    predicts it (the loss at position t is the prediction of piece t + 1)."""
    out = []
    for pos, piece in enumerate(pieces):
        v = values.get(pos - 1)
        style = f' style="background:{_color(v, vmax)}" title="{v:+.3f}"' if v is not None else ""
        out.append(f"<span{style}>{html.escape(piece)}</span>")
    return "".join(out)


def _joined(text: str | list[str]) -> str:
    """A text given as a string or as its token pieces."""
    return text if isinstance(text, str) else "".join(text)


def _drift(trace: list[float]) -> float | None:
    """How far a loss trace's level moves after its start, in its own standard deviations (None: too short)."""
    rest = [x for x in trace[len(trace) // 10 :] if math.isfinite(x)]
    if len(rest) < 8:
        return None
    half = len(rest) // 2
    spread = statistics.pstdev(rest) or 1e-12 * (abs(statistics.fmean(rest)) + 1e-30)
    return abs(statistics.fmean(rest[half:]) - statistics.fmean(rest[:half])) / spread


def diagnostics_rows(diagnostics: dict[str, Any], bif: torch.Tensor,
                     stderr: torch.Tensor | None) -> list[tuple[str, str, str, bool]]:  # fmt: skip
    """``(check, value, verdict, ok)`` rows that say in plain words whether a run can be trusted."""
    rows = []
    diverged = diagnostics.get("diverged", [])
    n_div = sum(bool(x) for x in diverged)
    rows.append(("Diverged chains (non-finite weights)", f"{n_div} of {len(diverged)}",
                 "none" if n_div == 0 else "left out of the result; if many, lower the step size", n_div == 0))
    escaped = diagnostics.get("escaped", {})
    rows.append(("Chains that left w*'s basin", f"{len(escaped)}",
                 "none" if not escaped else "left out of the result: " + "; ".join(map(str, escaped.values())),
                 not escaped))  # fmt: skip
    traces = diagnostics.get("chain_mean_train_loss", [])
    drifts = [d for d in (_drift(t) for t in traces) if d is not None]
    if drifts:
        worst = max(drifts)
        ok = worst <= SETTLED_DRIFT
        rows.append(("Loss traces settled after the start", f"largest drift {worst:.2f} sd",
                     "settled: the chains sample one level" if ok else
                     "still drifting: take more burn-in steps or more draws before trusting the ranking", ok))
    else:
        rows.append(("Loss traces settled after the start", "too few draws", "cannot tell from so few draws", False))
    if stderr is None:
        rows.append(("Monte-Carlo error", "not computed", "run with compute_stderr=True to know it", False))
    else:
        size = float(bif.double().square().mean().sqrt())
        rel = float(stderr.double().flatten().median()) / size if size > 0 else math.inf
        verdict = ("precise" if rel <= PRECISE else "good enough to rank the strongest examples" if rel <= RANKABLE
                   else "noisy: more draws or chains before reading single entries")  # fmt: skip
        rows.append(("Monte-Carlo error / size of the BIF", f"{rel:.2f}", verdict, rel <= RANKABLE))
    used = f"{diagnostics.get('num_chains_used', '?')} chains, {diagnostics.get('num_draws_used', '?')} draws"
    rows.append(("Draws pooled", used, "", True))
    rows += _calibration_rows(diagnostics.get("calibration"))
    return rows


def _calibration_rows(cal: dict[str, Any] | None) -> list[tuple[str, str, str, bool]]:
    if not cal:
        return [("Sampler settings", "given by the caller", "no calibration ran", True)]
    rows = []
    for key, label in (("nbeta", "Inverse temperature nbeta"), ("damping", "Damping (localization / nbeta)")):
        item = cal.get(key, {})
        if "value" in item:
            rows.append((f"Calibrated: {label}", f"{item['value']:.3g}", str(item.get("rule", "")), True))
    sampler = cal.get("sampler", {})
    if "lr" in sampler:
        rows.append(("Calibrated: step size, friction", f"{sampler['lr']:.3g}, {sampler.get('friction', 0):.3g}",
                     str(sampler.get("rule", "")), True))  # fmt: skip
    length = cal.get("length", {})
    if "draws" in length:
        rows.append(("Calibrated: run length", f"{length.get('chains')} chains x {length['draws']} draws",
                     str(length.get("rule", "")), True))  # fmt: skip
    return rows


def _table_html(rows: list[tuple[str, str, str, bool]]) -> str:
    body = "".join(f"<tr class='{'ok' if ok else 'warn'}'><td>{html.escape(check)}</td><td>{html.escape(value)}</td>"
                   f"<td>{'✓' if ok else '⚠'} {html.escape(verdict)}</td></tr>" for check, value, verdict, ok in rows)
    return f"<table id='diagnostics'><tr><th>check</th><th>value</th><th>verdict</th></tr>{body}</table>"


def _trace_svg(traces: list[list[float]], width: int = 600, height: int = 200) -> str:
    """Mean training loss per draw, one line per chain, with labelled axes."""
    finite = [x for t in traces for x in t if math.isfinite(x)]
    if not finite:
        return "<p>no finite loss trace</p>"
    lo, hi = min(finite), max(finite)
    span = hi - lo or 1.0
    left, bottom, top, right = 70, 40, 10, 10
    w, h = width - left - right, height - top - bottom
    lines = []
    for c, t in enumerate(traces):
        pts = " ".join(f"{left + i * w / max(1, len(t) - 1):.1f},{top + h - (x - lo) / span * h:.1f}"
                       for i, x in enumerate(t) if math.isfinite(x))  # fmt: skip
        color = _COLORS[c % len(_COLORS)]
        lines.append(f'<polyline class="trace" fill="none" stroke="{color}" stroke-width="1.5" points="{pts}">'
                     f"<title>chain {c}</title></polyline>")  # fmt: skip
    n = max(len(t) for t in traces)
    axes = (f'<line x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" stroke="#333"/>'
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + h}" stroke="#333"/>'
            f'<text x="{left}" y="{top + h + 15}" font-size="11">0</text>'
            f'<text x="{left + w}" y="{top + h + 15}" font-size="11" text-anchor="end">{n - 1}</text>'
            f'<text x="{left + w / 2}" y="{height - 5}" font-size="12" text-anchor="middle">draw</text>'
            f'<text x="{left - 5}" y="{top + 10}" font-size="11" text-anchor="end">{hi:.4g}</text>'
            f'<text x="{left - 5}" y="{top + h}" font-size="11" text-anchor="end">{lo:.4g}</text>'
            f'<text x="14" y="{top + h / 2}" font-size="12" text-anchor="middle" '
            f'transform="rotate(-90 14 {top + h / 2})">mean training loss</text>')  # fmt: skip
    legend = " ".join(f"<span style='color:{_COLORS[c % len(_COLORS)]}'>━ chain {c}</span>" for c in range(len(traces)))
    svg = f'<svg id="traces" width="{width}" height="{height}">{axes}{"".join(lines)}</svg>'
    return f'{svg}<div class="small">{legend}</div>'


def _intro(tokens: bool) -> str:
    unit = "token" if tokens else "example"
    how = ("Each training passage is scored by the correlation averaged over its token pairs with the query; "
           "tokens are coloured by the summed correlation of the position predicting them with the query.") if tokens \
        else "Each training example is scored by the correlation of its loss with the query's."  # fmt: skip
    return f"""<h1>Bayesian influence per {unit}</h1>
<p>Scores are the <b>posterior correlation</b> of the losses over the localised posterior, the negative of the
normalised BIF: <span style="background:rgba({_PROPONENT},.6)">positive: a proponent</span> (its loss moves with
the query's, so upweighting it lowers the query's loss), <span style="background:rgba({_OPPONENT},.6)">negative:
an opponent</span>. {how}</p>"""


def _units_by_sequence(index: torch.Tensor) -> dict[int, torch.Tensor]:
    """The unit indices of each sequence (rows or columns of the per-token matrix), in position order."""
    seq = index[:, 0]
    order = torch.argsort(seq, stable=True)
    counts = torch.bincount(seq, minlength=int(seq.max()) + 1 if seq.numel() else 0).tolist()
    return {s: part for s, part in enumerate(torch.split(order, counts)) if part.numel()}


def _rounded(values: torch.Tensor) -> list[float]:
    return [round(v, 4) for v in values.tolist()]


def _block(corr: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, train_index, query_index, i: int,
           score: float) -> dict[str, Any]:  # fmt: skip
    block = corr[rows][:, cols].float()
    scale = float(block.abs().max()) or 1.0
    cells = torch.round(block / scale * 127).to(torch.int8).contiguous()
    return {"i": i, "score": round(score, 4), "rows": train_index[rows, 1].tolist(),
            "cols": query_index[cols, 1].tolist(), "scale": scale,
            "rowSum": _rounded(block.sum(1)), "colSum": _rounded(block.sum(0)),
            "data": base64.b64encode(cells.numpy().tobytes()).decode("ascii")}  # fmt: skip


def _chosen_passages(order: list[int], per_side: int) -> list[int]:
    """The strongest proponents, then the strongest opponents, from passages ranked by score (descending)."""
    return order[:per_side] + [i for i in reversed(order[-per_side:]) if i not in order[:per_side]]


def explorer_data(result, train_texts: list, query_texts: list, *, passages: int = EXPLORER_PASSAGES,
                  top_tokens: int = EXPLORER_TOP_TOKENS,
                  max_cells: int = EXPLORER_MAX_CELLS) -> dict[str, Any]:  # fmt: skip
    """The per-token explorer's data: pieces, per-query blocks of chosen passages, top training tokens.

    ``note`` says what was left out to stay within ``max_cells`` embedded block cells."""
    corr = torch.nan_to_num(-result.bif_normalized.float().cpu(), nan=0.0, posinf=0.0, neginf=0.0)
    tidx, qidx = result.train_index.cpu(), result.query_index.cpu()
    rows_of, cols_of = _units_by_sequence(tidx), _units_by_sequence(qidx)
    scores = -result.aggregate(train="sequence", query="sequence", normalized=True, reduce="mean").double().cpu()
    scores = torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)
    per_side = max(1, min(passages, scores.shape[0]))
    # Per query, the passages with units ranked by score: ranked once, sliced per candidate size.
    ranked = {j: [i for i in torch.argsort(scores[:, j], descending=True).tolist() if i in rows_of] for j in cols_of}
    size = lambda p: sum(rows_of[i].numel() * cols_of[j].numel()  # noqa: E731
                         for j in cols_of for i in _chosen_passages(ranked[j], p))  # fmt: skip
    while per_side > 1 and size(per_side) > max_cells:
        per_side -= 1
    note, budget, blocks = [], max_cells, []
    if per_side < min(passages, scores.shape[0]):
        note.append(f"{per_side} proponent and opponent passages per query (of {passages}) to stay within "
                    f"{max_cells:,} embedded cells")  # fmt: skip
    k = min(top_tokens, corr.shape[0])
    queries = []
    for j in range(len(query_texts)):
        cols = cols_of.get(j, torch.empty(0, dtype=torch.long))
        mine = []
        for i in _chosen_passages(ranked[j], per_side) if j in ranked else []:
            cells = rows_of[i].numel() * cols.numel()
            if cells > budget:
                note.append(f"query {j}: passage {i} and later blocks left out (cell cap)")
                break
            budget -= cells
            mine.append(_block(corr, rows_of[i], cols, tidx, qidx, i, float(scores[i, j])))
        blocks.append(mine)
        queries.append({"pieces": list(query_texts[j]), "positions": qidx[cols, 1].tolist(),
                        "top": _top_tokens(corr[:, cols], tidx, k)})  # fmt: skip
    return {"train": [list(t) for t in train_texts], "queries": queries, "blocks": blocks,
            "topTokens": top_tokens, "note": "; ".join(note)}  # fmt: skip


def _top_tokens(columns: torch.Tensor, train_index: torch.Tensor, k: int) -> list:
    """Per column, its k largest entries as ``[passage, position, value]``."""
    if columns.shape[1] == 0:
        return []
    top = torch.topk(columns, k, dim=0)
    where = train_index[top.indices.T]  # [columns, k, 2]
    return [[[int(i), int(t), round(v, 4)] for (i, t), v in zip(w.tolist(), vals, strict=True)]
            for w, vals in zip(where, top.values.T.tolist(), strict=True)]  # fmt: skip


def _explorer_html(data: dict[str, Any]) -> str:
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    script = (Path(__file__).with_name("report_explorer.js")).read_text(encoding="utf-8")
    note = f"<p class='small' id='explorer-note'>Capped: {html.escape(data['note'])}.</p>" if data["note"] else ""
    return f"""<h2>Explore token by token</h2>
<p class="small">Choose a query and one of its strongest proponent or opponent passages. The query's tokens are
coloured by their summed correlation with the passage's tokens, the passage's tokens by their summed correlation
with the query's; the heat map is the token x token block (rows: passage tokens, columns: query tokens). Click a
token to see the tokens it moves with most.</p>{note}
<div><select id="query-select"></select> <select id="passage-select"></select> <span id="pair-score"
class="small"></span></div>
<h4>query, coloured by the passage's influence</h4><div id="query-view" class="text"></div>
<h4>passage, coloured by its influence on the query</h4><div id="passage-view" class="text"></div>
<div id="token-info" class="small"></div>
<h4>token x token block</h4><div id="heat-scale" class="small"></div><canvas id="heatmap"></canvas>
<div id="heat-info" class="small"></div>
<script type="application/json" id="bif-data">{payload}</script>
<script>{script}</script>"""


def write_report(result, train_texts: list, query_texts: list, out_dir: str | Path, k: int = 3) -> Path:
    """Write ``out_dir/index.html`` for a BIF over ``train_texts`` × ``query_texts``: per token, each text is a
    string of byte-level tokens or the list of its token pieces (one per token, as the model read them), each
    coloured by its correlation with the query; per sequence, plain texts ranked by their score."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corr = -result.bif_normalized.double().cpu()
    tokens = result.train_index is not None
    if tokens:
        scores = -result.aggregate(train="sequence", query="sequence", normalized=True, reduce="mean").double().cpu()
        rows, pos = result.train_index[:, 0], result.train_index[:, 1]
        qrows = result.query_index[:, 0]
    else:
        scores = corr
    sections = []
    for j, q in enumerate(query_texts):
        order = torch.argsort(scores[:, j], descending=True)[:k].tolist()
        if tokens:
            per_token = corr[:, qrows == j].sum(dim=1)  # each training token's summed correlation with query j
            vmax = float(per_token.abs().max()) or 1.0
        items = []
        for i in order:
            if tokens:
                sel = rows == i
                text = _tokens_html(train_texts[i], dict(zip(pos[sel].tolist(), per_token[sel].tolist(), strict=True)),
                                    vmax)  # fmt: skip
            else:
                text = html.escape(_joined(train_texts[i]))
            items.append(f"<li><span class='score'>{scores[i, j]:+.3f}</span> <code>{text}</code></li>")
        sections.append(f"<h3>query {j}: <code>{html.escape(_joined(q))}</code></h3><ol>{''.join(items)}</ol>")
    d = result.diagnostics
    table = _table_html(diagnostics_rows(d, result.bif, result.stderr))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>bif_fast report</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}}code{{font-size:1.05em}}
.score{{display:inline-block;width:4.5em;color:#555}}.small{{color:#666;font-size:.85em}}
table{{border-collapse:collapse}}.text{{font-family:monospace;white-space:pre-wrap;line-height:1.6}}
.tok{{cursor:pointer}}.tok.selected{{outline:2px solid #000}}mark{{background:#ffe08a}}canvas{{border:1px solid #ccc}}
td,th{{border:1px solid #ccc;padding:.2em .5em;text-align:left;font-size:.9em}}
tr.warn td{{background:#fff3cd}}</style></head><body>
{_intro(tokens)}
{"".join(sections)}
{_explorer_html(explorer_data(result, train_texts, query_texts)) if tokens else ""}
<h2>Can this run be trusted?</h2>{table}
<h2>Sampling</h2>{_trace_svg(d.get("chain_mean_train_loss", []))}
<details><summary>config</summary><pre class="small">{html.escape(json.dumps(result.config.to_dict(), indent=1))}
</pre></details>
</body></html>"""
    path = out_dir / "index.html"
    path.write_text(page)
    return path
