"""The leakage report as one self-contained HTML file: inline CSS and SVG, no scripts, no fetches.
Every piece of corpus text passes through html.escape: a corpus is untrusted input."""

from __future__ import annotations

from html import escape

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;width:100%;margin:.5em 0}td,th{border:1px solid #ddd;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:1em}.pair pre{white-space:pre-wrap;word-break:break-word;
background:#fafafa;border:1px solid #ddd;padding:8px;margin:0;font-size:12px}mark{background:#ffd54f}
.kpi{display:inline-block;margin-right:2em}.kpi b{font-size:1.4em;display:block}.muted{color:#777}
"""


def _svg_histogram(edges: list[float], counts: list[int], alpha: float, width=640, height=220) -> str:
    pad_l, pad_b, pad_t = 48, 32, 10
    plot_w, plot_h = width - pad_l - 10, height - pad_b - pad_t
    top = max(counts) or 1
    bar_w = plot_w / len(counts)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="histogram of r(C)">']
    for i, c in enumerate(counts):
        h = plot_h * c / top
        x = pad_l + i * bar_w
        color = "#e57373" if edges[i] >= alpha else "#64b5f6"
        parts.append(f'<rect x="{x:.1f}" y="{pad_t + plot_h - h:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" '
                     f'fill="{color}"><title>{edges[i]:.2f}–{edges[i + 1]:.2f}: {c}</title></rect>')
    ax = pad_l + plot_w * alpha
    parts.append(f'<line x1="{ax:.1f}" x2="{ax:.1f}" y1="{pad_t}" y2="{pad_t + plot_h}" stroke="#333" '
                 f'stroke-dasharray="4 3"/><text x="{ax + 4:.1f}" y="{pad_t + 12}" font-size="11">α={alpha:g}</text>')
    for frac in (0, 0.25, 0.5, 0.75, 1.0):
        x = pad_l + plot_w * frac
        parts.append(f'<text x="{x:.1f}" y="{height - 12}" font-size="11" text-anchor="middle">{frac:g}</text>')
    parts.append(f'<text x="{pad_l - 6}" y="{pad_t + 10}" font-size="11" text-anchor="end">{top}</text>')
    parts.append(f'<text x="{pad_l - 6}" y="{pad_t + plot_h}" font-size="11" text-anchor="end">0</text>')
    parts.append(f'<text x="{pad_l + plot_w / 2}" y="{height - 1}" font-size="11" text-anchor="middle">'
                 f'r(C) = longest shared run / chunk length</text></svg>')
    return "".join(parts)


def _svg_curve(points: list[tuple[float, float]], width=640, height=220) -> str:
    pad_l, pad_b, pad_t = 48, 32, 10
    plot_w, plot_h = width - pad_l - 10, height - pad_b - pad_t
    ys = [y for _, y in points]
    lo, hi = min(ys), max(ys)
    span = (hi - lo) or 1.0
    coords = " ".join(f"{pad_l + plot_w * x:.1f},{pad_t + plot_h * (1 - (y - lo) / span):.1f}" for x, y in points)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="bpb(alpha)"><polyline points="{coords}" fill="none" stroke="#1e88e5" stroke-width="2"/>'
            f'<text x="{pad_l - 6}" y="{pad_t + 10}" font-size="11" text-anchor="end">{hi:.3f}</text>'
            f'<text x="{pad_l - 6}" y="{pad_t + plot_h}" font-size="11" text-anchor="end">{lo:.3f}</text>'
            f'<text x="{pad_l + plot_w / 2}" y="{height - 1}" font-size="11" text-anchor="middle">α</text></svg>')


def _highlighted(parts: list[str]) -> str:
    before, shared, after = (escape(p) for p in parts)
    return f"<pre>{before}<mark>{shared}</mark>{after}</pre>"


def render_html(report: dict) -> str:
    """`report` is LeakageReport.to_json()."""
    e = escape
    rows = []
    rows.append("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>")
    rows.append("<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'; "
                "img-src data:\">")
    rows.append(f"<title>retro leakage report</title><style>{CSS}</style></head><body>")
    rows.append("<h1>Test-set leakage report</h1>")
    rows.append(f"<p class='muted'>DB <code>{e(report['db'])}</code> · test "
                f"<code>{e(', '.join(report['test_inputs']))}</code> · k={report['k']} neighbours with continuations"
                f" · α={report['alpha']:g}</p>")
    rows.append("<div>")
    for label, value in (("test documents", f"{report['num_test_docs']:,}"),
                         ("test chunks", f"{report['num_test_chunks']:,}"),
                         (f"leaking chunks (r &gt; {report['alpha']:g})",
                          f"{report['leaking_chunks']:,} ({100 * report['leaking_fraction']:.1f}%)"),
                         ("mean r(C)", f"{report['mean_r']:.3f}"),
                         ("near-duplicate DB docs", f"{len({p['db_doc'] for p in report['near_duplicates']}):,}")):
        rows.append(f"<span class='kpi'><b>{value}</b>{label}</span>")
    rows.append("</div><h2>Chunk overlap r(C) (paper §2.6)</h2>")
    hist = report["histogram"]
    rows.append(_svg_histogram(hist["edges"], hist["counts"], report["alpha"]))
    if report.get("bpb"):
        rows.append("<h2>bpb(α): bits per byte over chunks with r(C) ≤ α</h2>")
        # α buckets holding no chunk have no bpb; plot the others
        points = [(p["alpha"], p["bpb"]) for p in report["bpb"]["curve"] if p["bpb"] is not None]
        rows.append(_svg_curve(points) if points else "<p>No chunk in any α bucket.</p>")
    rows.append("<h2>Most-leaking chunks, test vs DB (shared run highlighted)</h2>")
    if not report["examples"]:
        rows.append("<p>No chunk above α.</p>")
    for ex in report["examples"]:
        rows.append(f"<h3>r = {ex['r']:.3f} ({ex['shared_tokens']} tokens) · test "
                    f"<code>{e(ex['test_source'])}</code> · DB <code>{e(ex['db_source'])}</code> "
                    f"chunk {ex['db_chunk']}</h3>")
        rows.append(f"<div class='pair'>{_highlighted(ex['test_text'])}{_highlighted(ex['db_text'])}</div>")
    rows.append(f"<h2>Near-duplicate documents (≥ {report['jaccard_threshold']:g} {report['ngram']}-gram Jaccard, "
                "paper §2.1)</h2>")
    if report["near_duplicates"]:
        rows.append("<table><tr><th>DB document</th><th>duplicates test document</th>"
                    "<th class='num'>Jaccard</th><th class='num'>MinHash estimate</th></tr>")
        for p in report["near_duplicates"]:
            rows.append(f"<tr><td>{e(p['db_source'])}</td><td>{e(p['test_source'])}</td>"
                        f"<td class='num'>{p['jaccard']:.3f}</td><td class='num'>{p['estimated']:.3f}</td></tr>")
        rows.append("</table>")
    else:
        rows.append("<p>None found.</p>")
    rows.append("<h2>Per test document</h2><table><tr><th>document</th><th class='num'>chunks</th>"
                "<th class='num'>max r</th><th class='num'>mean r</th><th class='num'>leaking chunks</th></tr>")
    for d in report["documents"]:
        rows.append(f"<tr><td>{e(d['source'])}</td><td class='num'>{d['chunks']}</td>"
                    f"<td class='num'>{d['max_r']:.3f}</td><td class='num'>{d['mean_r']:.3f}</td>"
                    f"<td class='num'>{d['leaking_chunks']}</td></tr>")
    rows.append("</table><p class='muted'>Generated by retrocli.</p></body></html>")
    return "\n".join(rows)
