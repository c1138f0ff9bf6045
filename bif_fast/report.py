"""A self-contained HTML report of a BIF over text (no external assets).

For every query: the training passages with the most negative normalised BIF (proponents: their losses
move with the query's); per token, each token coloured by its summed influence on the query (red:
proponent, blue: opponent), as in the paper's per-token figures; plus the per-chain loss traces and the
run's diagnostics.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import torch

__all__ = ["write_report"]


def _color(v: float, vmax: float) -> str:
    a = min(1.0, abs(v) / vmax) if vmax > 0 else 0.0
    return f"rgba(214,39,40,{a:.2f})" if v < 0 else f"rgba(31,119,180,{a:.2f})"


def _tokens_html(text: str, values: dict[int, float], vmax: float) -> str:
    """Each character of an ASCII text, coloured by the value of the token that predicts it."""
    out = []
    for pos, ch in enumerate(text):
        v = values.get(pos - 1)  # the loss at position t is the prediction of character t + 1
        style = f' style="background:{_color(v, vmax)}" title="{v:+.3f}"' if v is not None else ""
        out.append(f"<span{style}>{html.escape(ch)}</span>")
    return "".join(out)


def _intro(tokens: bool) -> str:
    if not tokens:
        return """<h1>Bayesian influence per example</h1>
<p>Each training example is scored by its normalised BIF with the query (−correlation of the two losses over
the localised posterior); the most negative are the proponents (upweighting them lowers the query's loss).</p>"""
    return """<h1>Per-token Bayesian influence</h1>
<p>Rows: training tokens; columns: query tokens. Each training passage is scored by the normalised BIF
(−correlation of losses over the localised posterior) averaged over its token pairs with the query;
the most negative are the proponents. Tokens are coloured by the summed influence of the position
predicting them on the query: <span style="background:rgba(214,39,40,.6)">proponent</span>,
<span style="background:rgba(31,119,180,.6)">opponent</span>.</p>"""


def _joined(text: str | list[str]) -> str:
    """A text given as a string or as its token pieces."""
    return text if isinstance(text, str) else "".join(text)


def _trace_svg(traces: list[list[float]], width: int = 560, height: int = 140) -> str:
    finite = [x for t in traces for x in t if x == x]
    if not finite:
        return "<p>no finite loss trace</p>"
    lo, hi = min(finite), max(finite)
    span = hi - lo or 1.0
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    lines = []
    for c, t in enumerate(traces):
        pts = " ".join(
            f"{i * (width - 10) / max(1, len(t) - 1) + 5:.1f},{height - 5 - (x - lo) / span * (height - 10):.1f}"
            for i, x in enumerate(t)
            if x == x
        )
        lines.append(f'<polyline fill="none" stroke="{colors[c % len(colors)]}" stroke-width="1.5" points="{pts}"/>')
    return (
        f'<svg width="{width}" height="{height}" style="border:1px solid #ccc">{"".join(lines)}</svg>'
        f"<div class='small'>mean training loss per draw, one line per chain ({lo:.3f} to {hi:.3f})</div>"
    )


def write_report(result, train_texts: list, query_texts: list, out_dir: str | Path, k: int = 3) -> Path:
    """Write ``out_dir/index.html`` for a BIF over ``train_texts`` × ``query_texts``: per token, each text is a
    string of byte-level tokens or the list of its token pieces (one per token, as the model read them), each
    coloured by its influence; per sequence, plain texts ranked by their score."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    m = result.bif_normalized.double().cpu()
    tokens = result.train_index is not None
    if tokens:  # each passage's normalised BIF averaged over its token pairs with the query (see the page's text)
        scores = result.aggregate(train="sequence", query="sequence", normalized=True, reduce="mean").double().cpu()
        rows, pos = result.train_index[:, 0], result.train_index[:, 1]
        qrows = result.query_index[:, 0]
    else:
        scores = m
    sections = []
    for j, q in enumerate(query_texts):
        order = torch.argsort(scores[:, j])[:k].tolist()
        if tokens:
            per_token = m[:, qrows == j].sum(dim=1)  # each training token's summed influence on query j
            vmax = float(per_token.abs().max()) or 1.0
        items = []
        for i in order:
            if tokens:
                sel = rows == i
                values = dict(zip(pos[sel].tolist(), per_token[sel].tolist(), strict=True))
                text = _tokens_html(train_texts[i], values, vmax)
            else:
                text = html.escape(_joined(train_texts[i]))
            items.append(f"<li><span class='score'>{scores[i, j]:+.3f}</span> <code>{text}</code></li>")
        sections.append(f"<h3>query {j}: <code>{html.escape(_joined(q))}</code></h3><ol>{''.join(items)}</ol>")
    d = result.diagnostics
    diag = {k_: d[k_] for k_ in ("num_chains_used", "num_draws_used", "diverged", "n_train_units", "n_query_units",
                                 "seconds", "sampler_backend") if k_ in d}  # fmt: skip
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>bif_fast report</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}}code{{font-size:1.05em}}
.score{{display:inline-block;width:4.5em;color:#555}}.small{{color:#666;font-size:.85em}}</style></head><body>
{_intro(tokens)}
{"".join(sections)}
<h2>Sampling</h2>{_trace_svg(d.get("chain_mean_train_loss", []))}
<pre class="small">{html.escape(json.dumps(diag, indent=1))}</pre>
<pre class="small">{html.escape(json.dumps(result.config.to_dict(), indent=1))}</pre>
</body></html>"""
    path = out_dir / "index.html"
    path.write_text(page)
    return path
