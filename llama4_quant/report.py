"""Render an `l4q eval` report dict as JSON, Markdown, PNG plots and one self-contained HTML page.

`evaluate.py` computes the numbers; this module only presents them. Everything here is a pure
function of the report dict, so the same report gives byte-identical files (plots are drawn with
matplotlib's Agg renderer under the default style, without a timestamp or version in the PNG).

Files written by `write_reports(report, out_dir)` (returned by kind):

    json               report.json            the dict itself, `json.dumps(report, indent=2)`
    md                 report.md              summary table for a model card, then per-candidate details
    html               report.html            one page: summary, plots as data: URIs, details; no network
    kld_distribution   kld_distribution.png   per-token KLD histogram per candidate (log x)
    layer_error        layer_error.png        per-layer relative weight error per candidate and component
    expert_heatmap     expert_heatmap.png     MoE layer x expert weight error, one panel per candidate
    routing_agreement  routing_agreement.png  per-layer router top-k agreement per candidate

A plot that no candidate has data for is not written (and a stale copy from an earlier report in the
same directory is removed, so the directory never mixes two reports). Every file is written to a
hidden temporary sibling and renamed into place once all of them are complete.

The report dict (the contract with `evaluate.py`; optional parts may be None or absent)::

    {
      "l4q_version": "0.1.0",
      "created_by": "l4q eval",
      "base": {"source": "tiny", "path": "/abs/path", "size_bytes": 30590000, "perplexity": 40.3},
      "data": {"description": "built-in held-out text of the tiny models", "tokens": 65536, "ctx": 256,
               "windows": 256, "token_ids_sha256": "ab12..."},
      "kld_method": "KL(base || candidate) per predicted token over the base's top-256 tokens plus one
                     bucket for the remaining mass",
      "candidates": [
        {
          "name": "tiny-int4", "path": "/abs/path", "kind": "safetensors" | "gguf",
          "scheme": "int4" | "Q4_K_M" | ...,
          "size_bytes": 9580000,
          "windows": {"count": 256, "length": 256, "scored_positions_per_window": 255,
                      "tokens_scored": 65280, "note": "why fewer positions were scored" | None},
          "token_ids_sha256": "ab12...",           # of the ids the model received: data.token_ids_sha256
                                                   # when windows.length == data.ctx, else of each window's prefix
          "base_perplexity": 40.3,                 # the base on exactly this candidate's scored positions
          "perplexity": 40.9, "perplexity_ratio": 1.0149, "perplexity_diff": 0.6,
          "kld": {"mean": 0.0055, "stderr": 0.0001, "median": 0.002, "p90": 0.01, "p99": 0.07,
                  "p999": 0.2, "max": 0.9,
                  "histogram": {"edges": [1e-8, ..., 10.0], "counts": [...]}},
                  # log-spaced edges, len(counts) == len(edges) - 1; values below the first edge
                  # are counted in the first bin
          "top1_agreement": 0.948,
          "top_prob_change": {"mean": -0.002, "rms": 0.03},  # candidate minus base prob of base's top token
          "rest_mass_mean": 0.001,
          "routing_agreement": {"mean": 0.97, "per_layer": [{"layer": 0, "agreement": 0.98}, ...]} | None,
          "weight_error": {"metric": "relative Frobenius error ||W_q - W|| / ||W||",
                           "per_layer": [{"layer": 0, "attention": 0.08, "shared_expert": 0.08,
                                          "dense_mlp": None, "experts": 0.081}, ...],
                           "expert_layers": [0, 1, 2, 3],
                           "experts": [[...one value per expert...], ...one row per expert layer...]} | None
        }, ...
      ]
    }

Fractions (agreements) are in [0, 1]; KLD is in nats; sizes are bytes (shown in decimal MB/GB).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import ReportFormatError

JSON_NAME = "report.json"
MD_NAME = "report.md"
HTML_NAME = "report.html"

# plot kind -> (file name, caption); the order is the order on the page
PLOTS: dict[str, tuple[str, str]] = {
    "kld_distribution": (
        "kld_distribution.png",
        "Distribution of the per-token KL divergence from the base (log-spaced bins; "
        "dashed lines mark each candidate's mean).",
    ),
    "layer_error": (
        "layer_error.png",
        "Relative weight error per decoder layer: colour is the candidate, line style the component.",
    ),
    "expert_heatmap": (
        "expert_heatmap.png",
        "Relative weight error of every routed expert (rows: MoE layers, columns: experts); "
        "the outlined cell is the worst expert.",
    ),
    "routing_agreement": (
        "routing_agreement.png",
        "Per-layer router agreement: the fraction of tokens routed to the same experts as in the base.",
    ),
}

COMPONENTS = ("attention", "shared_expert", "dense_mlp", "experts")
_COMPONENT_STYLE = {
    "attention": ("-", "o"),
    "shared_expert": ("--", "s"),
    "dense_mlp": (":", "^"),
    "experts": ("-.", "D"),
}
DPI = 110
_FIG_WIDTH = 10.0  # inches: 1100 px at DPI, fits the HTML page's content width


# ----------------------------------------------------------------------------- entry points


def write_reports(report: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write report.json, report.md, report.html and the plots that have data into `out_dir`.

    Returns the final path of every written file by kind ("json", "md", "html" and the plot kinds
    of `PLOTS`). All files are staged as hidden temporaries and renamed into place at the end, so
    an interrupted call leaves either the previous report or the new one, never half a file.
    """
    validate_report(report)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    plots = render_plots(report)
    contents: dict[str, tuple[str, bytes]] = {
        kind: (PLOTS[kind][0], png) for kind, png in plots.items()
    }
    contents["md"] = (MD_NAME, render_markdown(report, plot_files=[PLOTS[k][0] for k in plots]).encode())
    contents["html"] = (HTML_NAME, render_html(report, plots).encode())
    contents["json"] = (JSON_NAME, (json.dumps(report, indent=2) + "\n").encode())

    staged: list[tuple[str, Path, Path]] = []
    try:
        for kind, (name, data) in contents.items():
            # Not mkstemp: its files are private (0600); these get the usual umask permissions.
            tmp = out_dir / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            with open(tmp, "xb") as f:
                staged.append((kind, tmp, out_dir / name))
                f.write(data)
        written: dict[str, Path] = {}
        for kind, tmp, final in staged:
            os.replace(tmp, final)
            written[kind] = final
    finally:
        for _, tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    for kind, (name, _) in PLOTS.items():
        if kind not in written:
            (out_dir / name).unlink(missing_ok=True)
    return written


def load_report(path: Path) -> dict[str, Any]:
    """Read and validate a report.json (or a directory holding one), e.g. to re-render it."""
    path = Path(path)
    if path.is_dir():
        path = path / JSON_NAME
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportFormatError(f"{path}: no such report; run `l4q eval` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportFormatError(f"{path}: not a JSON report ({e})") from None
    validate_report(report, where=str(path))
    return report


def validate_report(report: Any, where: str = "report") -> None:
    """Raise ReportFormatError naming the first field that breaks the schema the renderers rely on."""

    def fail(field: str, what: str) -> None:
        raise ReportFormatError(f"{where}: {field}: {what}")

    if not isinstance(report, Mapping):
        fail("top level", f"expected an object, got {type(report).__name__}")
    for key in ("base", "data"):
        if not isinstance(report.get(key), Mapping):
            fail(key, "missing or not an object")
    candidates = report.get("candidates")
    if not isinstance(candidates, list):
        fail("candidates", "missing or not a list")
    for i, c in enumerate(candidates):
        at = f"candidates[{i}]"
        if not isinstance(c, Mapping):
            fail(at, "not an object")
        if not isinstance(c.get("name"), str) or not c["name"]:
            fail(f"{at}.name", "missing or empty")
        kld = c.get("kld")
        if not isinstance(kld, Mapping) or not _is_num(kld.get("mean")):
            fail(f"{at}.kld.mean", "missing or not a number")
        hist = kld.get("histogram")
        if hist is not None:
            edges, counts = (hist.get("edges"), hist.get("counts")) if isinstance(hist, Mapping) else (0, 0)
            if not isinstance(edges, list) or not isinstance(counts, list) or len(counts) != len(edges) - 1:
                fail(f"{at}.kld.histogram", "needs lists `edges` and `counts` with len(counts) == len(edges) - 1")
            if any(not _is_num(e) or e <= 0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
                fail(f"{at}.kld.histogram.edges", "must be positive and strictly increasing (log-spaced)")
        routing = c.get("routing_agreement")
        per_layer = routing.get("per_layer", []) if isinstance(routing, Mapping) else None
        if routing is not None and not isinstance(per_layer, list):
            fail(f"{at}.routing_agreement.per_layer", "not a list")
        werr = c.get("weight_error")
        if werr is not None:
            if not isinstance(werr, Mapping) or not isinstance(werr.get("per_layer", []), list):
                fail(f"{at}.weight_error.per_layer", "not a list")
            experts, layers = werr.get("experts"), werr.get("expert_layers")
            if experts is not None:
                if not isinstance(experts, list) or not isinstance(layers, list) or len(experts) != len(layers):
                    fail(f"{at}.weight_error.experts", "needs one row per entry of expert_layers")
                if len({len(row) for row in experts}) > 1:
                    fail(f"{at}.weight_error.experts", "rows have different numbers of experts")


# ----------------------------------------------------------------------------- formatting


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _finite(x: Any) -> bool:
    return _is_num(x) and math.isfinite(x)


def _decimals(x: float, sig: int) -> int | None:
    """Decimals that show `sig` significant digits of x in fixed notation, None if it wants e-notation."""
    if x == 0:
        return sig - 1
    mag = math.floor(math.log10(abs(x)))
    if mag < -3 or mag >= 5:
        return None
    return max(0, sig - 1 - mag)


def fmt_num(x: Any, sig: int = 3) -> str:
    """A number with `sig` significant digits: 0.00550, 40.9, 1.23e-05; "n/a" when missing."""
    if not _is_num(x):
        return "n/a"
    if not math.isfinite(x):
        return str(x)
    d = _decimals(x, sig)
    return f"{x:.{sig - 1}e}" if d is None else f"{x:.{d}f}"


def fmt_kld(mean: Any, stderr: Any = None) -> str:
    """Mean KLD, with its standard error in the same decimals: 0.00550 ± 0.00010."""
    if not _is_num(mean):
        return "n/a"
    text = fmt_num(mean)
    if not _finite(stderr):
        return text
    d = _decimals(mean, 3) if _finite(mean) else None
    err = f"{stderr:.{d}f}" if d is not None and stderr >= 10 ** -d else fmt_num(stderr, 2)
    return f"{text} ± {err}"


def fmt_pct(x: Any, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%" if _finite(x) else "n/a"


def fmt_size(nbytes: Any) -> str:
    """Decimal units, as model hubs show them: 9.58 MB, 218.4 GB."""
    if not _finite(nbytes):
        return "n/a"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{fmt_num(nbytes / scale)} {unit}"
    return f"{int(nbytes)} B"


def _fmt_fixed(x: Any, decimals: int, sign: bool = False) -> str:
    if not _is_num(x):
        return "n/a"
    return f"{x:+.{decimals}f}" if sign else f"{x:.{decimals}f}"


def _fmt_int(x: Any) -> str:
    return f"{x:,}" if _is_num(x) and float(x).is_integer() else fmt_num(x)


def _size_cell(c: Mapping[str, Any], base: Mapping[str, Any]) -> str:
    size, base_size = c.get("size_bytes"), base.get("size_bytes")
    text = fmt_size(size)
    if _finite(size) and _finite(base_size) and base_size > 0:
        text += f" ({100 * size / base_size:.1f}%)"
    return text


def _ratio(c: Mapping[str, Any]) -> Any:
    ratio = c.get("perplexity_ratio")
    if not _is_num(ratio) and _finite(c.get("perplexity")) and _finite(c.get("base_perplexity")):
        ratio = c["perplexity"] / c["base_perplexity"] if c["base_perplexity"] else None
    return ratio


def _kind(c: Mapping[str, Any]) -> str:
    kind, scheme = c.get("kind") or "?", c.get("scheme")
    return f"{kind} ({scheme})" if scheme else str(kind)


def _windows_cell(c: Mapping[str, Any]) -> str:
    w = c.get("windows") or {}
    count, scored, total = w.get("count"), w.get("scored_positions_per_window"), w.get("tokens_scored")
    text = f"{_fmt_int(count)} × {_fmt_int(scored)}" if _is_num(count) and _is_num(scored) else _fmt_int(count)
    if _is_num(total):
        text += f" = {_fmt_int(total)}"
    return text


def _notes(report: Mapping[str, Any]) -> tuple[list[str], list[int | None]]:
    """Distinct window notes in order, and for each candidate the 1-based number of its note."""
    notes: list[str] = []
    marks: list[int | None] = []
    for c in report["candidates"]:
        note = (c.get("windows") or {}).get("note")
        if note:
            if note not in notes:
                notes.append(note)
            marks.append(notes.index(note) + 1)
        else:
            marks.append(None)
    return notes, marks


SUMMARY_HEADER = (
    "Candidate", "Kind", "Size (% of base)", "PPL (base)", "PPL ratio", "Mean KLD ± SE",
    "Median / p99 KLD", "Top-1 agree", "Routing agree", "Windows × scored positions",
)


def summary_rows(report: Mapping[str, Any]) -> list[list[str]]:
    """The summary table's cells, one row per candidate (plain text; callers escape)."""
    base = report["base"]
    _, marks = _notes(report)
    rows = []
    for c, mark in zip(report["candidates"], marks):
        kld = c["kld"]
        routing = c.get("routing_agreement") or {}
        windows = _windows_cell(c) + (f" [{mark}]" if mark else "")
        base_ppl = c.get("base_perplexity", base.get("perplexity"))
        rows.append([
            c["name"],
            _kind(c),
            _size_cell(c, base),
            f"{_fmt_fixed(c.get('perplexity'), 2)} ({_fmt_fixed(base_ppl, 2)})",
            _fmt_fixed(_ratio(c), 4),
            fmt_kld(kld.get("mean"), kld.get("stderr")),
            f"{fmt_num(kld.get('median'))} / {fmt_num(kld.get('p99'))}",
            fmt_pct(c.get("top1_agreement")),
            fmt_pct(routing.get("mean")) if routing else "n/a",
            windows,
        ])
    return rows


def _per_layer_rows(c: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per layer merging routing agreement, weight error per component and the worst expert."""
    routing = {r.get("layer"): r.get("agreement") for r in (c.get("routing_agreement") or {}).get("per_layer") or []}
    werr = c.get("weight_error") or {}
    per_layer = {r.get("layer"): r for r in werr.get("per_layer") or []}
    worst: dict[Any, tuple[int, float]] = {}
    for layer, row in zip(werr.get("expert_layers") or [], werr.get("experts") or []):
        vals = [(i, v) for i, v in enumerate(row) if _finite(v)]
        if vals:
            worst[layer] = max(vals, key=lambda iv: iv[1])
    components = [k for k in COMPONENTS if any(_is_num(r.get(k)) for r in per_layer.values())]
    header = ["Layer"]
    if routing:
        header.append("Routing agree")
    header += [k.replace("_", " ") for k in components]
    if worst:
        header.append("Worst expert")
    layers = sorted(set(routing) | set(per_layer) | set(worst), key=lambda x: (not _is_num(x), x if _is_num(x) else 0))
    rows = []
    for layer in layers:
        row = [str(layer)]
        if routing:
            row.append(fmt_pct(routing.get(layer)) if layer in routing else "—")
        row += [fmt_num(per_layer.get(layer, {}).get(k)) if _is_num(per_layer.get(layer, {}).get(k)) else "—"
                for k in components]
        if worst:
            row.append(f"#{worst[layer][0]}: {fmt_num(worst[layer][1])}" if layer in worst else "—")
        rows.append(row)
    return header, rows


def _worst_experts(c: Mapping[str, Any], n: int = 3) -> list[tuple[Any, int, float]]:
    werr = c.get("weight_error") or {}
    cells = [
        (layer, i, v)
        for layer, row in zip(werr.get("expert_layers") or [], werr.get("experts") or [])
        for i, v in enumerate(row)
        if _finite(v)
    ]
    return sorted(cells, key=lambda t: -t[2])[:n]


def _expert_spread(c: Mapping[str, Any]) -> str | None:
    werr = c.get("weight_error") or {}
    vals = sorted(v for row in werr.get("experts") or [] for v in row if _finite(v))
    if not vals:
        return None
    median = vals[len(vals) // 2] if len(vals) % 2 else (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2
    return f"{len(vals)} experts: min {fmt_num(vals[0])}, median {fmt_num(median)}, max {fmt_num(vals[-1])}"


def _facts(report: Mapping[str, Any], c: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, text) lines shown for one candidate in both Markdown and HTML."""
    base, data = report["base"], report["data"]
    w = c.get("windows") or {}
    size = _size_cell(c, base)
    if "%" in size:
        size = size.replace("%)", "% of the base)")
    facts = [("Path", str(c.get("path", "n/a"))), ("Format", _kind(c)), ("Size", size)]
    facts.append((
        "Windows",
        f"{_fmt_int(w.get('count'))} windows of {_fmt_int(w.get('length'))} tokens, "
        f"{_fmt_int(w.get('scored_positions_per_window'))} positions scored per window, "
        f"{_fmt_int(w.get('tokens_scored'))} tokens scored",
    ))
    same = "base_perplexity" in c
    base_ppl = c["base_perplexity"] if same else base.get("perplexity")
    facts.append((
        "Perplexity",
        f"{_fmt_fixed(c.get('perplexity'), 3)} vs base {_fmt_fixed(base_ppl, 3)} "
        f"{'on the same positions' if same else 'on all positions'} "
        f"({_fmt_fixed(c.get('perplexity_diff'), 3, sign=True)}, ratio {_fmt_fixed(_ratio(c), 4)})",
    ))
    facts.append(("Top-1 agreement", fmt_pct(c.get("top1_agreement"), 2)))
    tpc = c.get("top_prob_change") or {}
    facts.append((
        "Top-token probability change",
        f"mean {_fmt_fixed(tpc.get('mean'), 4, sign=True)}, RMS {_fmt_fixed(tpc.get('rms'), 4)} "
        "(candidate minus base probability of the base's top token)",
    ))
    if _is_num(c.get("rest_mass_mean")):
        facts.append(("Mean rest-bucket mass", fmt_num(c["rest_mass_mean"])))
    routing = c.get("routing_agreement")
    facts.append(("Routing agreement", f"mean {fmt_pct(routing.get('mean'), 2)}" if routing else "n/a"))
    if c.get("weight_error"):
        spread = _expert_spread(c)
        worst = ", ".join(f"layer {l} expert {i} ({fmt_num(v)})" for l, i, v in _worst_experts(c))
        text = c["weight_error"].get("metric", "relative weight error")
        if spread:
            text += f"; {spread}; worst: {worst}"
        facts.append(("Weight error", text))
    else:
        facts.append(("Weight error", "n/a (not measured)"))
    sha, base_sha = c.get("token_ids_sha256"), data.get("token_ids_sha256")
    length = (c.get("windows") or {}).get("length")
    if length is not None and length != data.get("ctx"):
        facts.append(("Token ids", f"the first {length} tokens of each data window (sha256 {sha})"))
    elif sha and base_sha and sha != base_sha:
        facts.append(("Token ids", f"WARNING: sha256 {sha} differs from the data's {base_sha}"))
    return facts


KLD_STATS = (("mean", "mean"), ("median", "median"), ("p90", "p90"), ("p99", "p99"), ("p999", "p99.9"), ("max", "max"))


def _kld_stat_row(c: Mapping[str, Any]) -> list[str]:
    kld = c["kld"]
    return [fmt_kld(kld["mean"], kld.get("stderr")) if key == "mean" else fmt_num(kld.get(key)) for key, _ in KLD_STATS]


# ----------------------------------------------------------------------------- Markdown


def _md_cell(text: Any) -> str:
    """Text for a Markdown table cell: a pipe would end the cell, a newline the row."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_text(text: Any) -> str:
    """Text for a Markdown paragraph or list item: one line."""
    return " ".join(str(text).split("\n"))


def _md_table(header: Iterable[str], rows: Iterable[Iterable[str]], right_from: int = 1) -> str:
    header = list(header)
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_md_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table_markdown(report: Mapping[str, Any]) -> str:
    """The summary table alone (with its window notes), e.g. for a model card."""
    table = _md_table(SUMMARY_HEADER, summary_rows(report), right_from=2)
    notes, _ = _notes(report)
    if notes:
        table += "\n\n" + "\n\n".join(f"[{i}] {_md_text(n)}" for i, n in enumerate(notes, 1))
    return table


def _data_lines(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    base, data = report["base"], report["data"]
    lines = [
        ("Base", f"{base.get('source', 'n/a')} ({base.get('path', 'n/a')}), {fmt_size(base.get('size_bytes'))}, "
                 f"perplexity {_fmt_fixed(base.get('perplexity'), 3)} on all scored positions"),
        ("Data", f"{data.get('description', 'n/a')}: {_fmt_int(data.get('tokens'))} tokens in "
                 f"{_fmt_int(data.get('windows'))} windows of {_fmt_int(data.get('ctx'))}"),
    ]
    if data.get("token_ids_sha256"):
        lines.append(("Token ids sha256", str(data["token_ids_sha256"])))
    if report.get("kld_method"):
        lines.append(("KLD", str(report["kld_method"])))
    return lines


def render_markdown(report: Mapping[str, Any], plot_files: Iterable[str] = ()) -> str:
    """report.md: the summary table, the data and method, the plots (relative links), per-candidate details."""
    out = ["# Quantization quality report", ""]
    out += [f"- **{label}:** {_md_text(text)}" for label, text in _data_lines(report)]
    out += ["", "## Summary", ""]
    if report["candidates"]:
        out += [summary_table_markdown(report), ""]
        out += [
            "PPL (base): the candidate's perplexity and, in parentheses, the base's on the same positions. "
            "KLD in nats. Agreements are over all scored tokens.",
            "",
        ]
    else:
        out += ["No candidates were evaluated.", ""]
    plot_files = list(plot_files)
    if plot_files:
        out += ["## Plots", ""]
        captions = {name: caption for name, caption in PLOTS.values()}
        for name in plot_files:
            out += [f"![{name.removesuffix('.png').replace('_', ' ')}]({name})", "", f"*{captions.get(name, '')}*", ""]
    for c in report["candidates"]:
        out += [f"## {_md_text(c['name'])}", ""]
        out += [f"- **{label}:** {_md_text(text)}" for label, text in _facts(report, c)]
        note = (c.get("windows") or {}).get("note")
        if note:
            out += ["", f"> **Note:** {_md_text(note)}"]
        out += ["", "KL divergence per token (nats):", ""]
        out += [_md_table([label for _, label in KLD_STATS], [_kld_stat_row(c)], right_from=0), ""]
        header, rows = _per_layer_rows(c)
        if rows:
            what = "Per layer: routing agreement and relative weight error" if len(header) > 2 else "Per layer"
            out += [f"{what}:", "", _md_table(header, rows), ""]
    created = " ".join(str(x) for x in (report.get("created_by"), report.get("l4q_version")) if x)
    if created:
        out += [f"<sub>Made by {_md_text(created)}.</sub>", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- plots


def _colors(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None}, facecolor="white")
    return buf.getvalue()


def render_plots(report: Mapping[str, Any]) -> dict[str, bytes]:
    """PNG bytes of every plot that some candidate has data for, by kind, in `PLOTS` order."""
    import matplotlib
    import matplotlib.style

    drawers = {
        "kld_distribution": _plot_kld,
        "layer_error": _plot_layer_error,
        "expert_heatmap": _plot_expert_heatmap,
        "routing_agreement": _plot_routing,
    }
    colors = _colors(len(report["candidates"]))
    out: dict[str, bytes] = {}
    # The default style, whatever the user's matplotlibrc says: deterministic and the same everywhere.
    with matplotlib.style.context("default"), matplotlib.rc_context({"font.size": 9, "axes.titlesize": 10}):
        for kind in PLOTS:
            fig = drawers[kind](report, colors)
            if fig is not None:
                out[kind] = _png(fig)
    return out


def _new_figure(height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(_FIG_WIDTH, height), layout="constrained")


def _plot_kld(report: Mapping[str, Any], colors: list):
    import numpy as np

    series = []
    for c, color in zip(report["candidates"], colors):
        hist = c["kld"].get("histogram")
        if not hist:
            continue
        edges = np.asarray(hist["edges"], dtype=np.float64)
        counts = np.asarray(hist["counts"], dtype=np.float64)
        total = counts.sum()
        if total > 0:
            series.append((c, color, edges, counts / total))
    if not series:
        return None
    fig = _new_figure(4.2)
    ax = fig.subplots()
    lo, hi = math.inf, -math.inf
    for c, color, edges, frac in series:
        # Zoom onto the bins that hold visible mass; the extremes are in the percentile table.
        shown = np.nonzero(frac >= 1e-4)[0]
        if len(shown) == 0:
            shown = np.nonzero(frac)[0]
        lo, hi = min(lo, edges[max(shown[0] - 1, 0)]), max(hi, edges[min(shown[-1] + 2, len(edges) - 1)])
        mean = c["kld"].get("mean")
        ax.stairs(frac, edges, color=color, lw=1.6, label=f"{c['name']} (mean {fmt_num(mean)})")
        if _finite(mean) and mean > 0:
            ax.axvline(mean, color=color, lw=1, ls="--", alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(bottom=0)
    first_bin_shown = any(lo <= edges[0] for _, _, edges, _ in series)
    ax.set_xlabel("KL(base ‖ candidate) per token, nats"
                  + (" (the first bin also holds smaller values)" if first_bin_shown else ""))
    ax.set_ylabel("fraction of scored tokens")
    ax.set_title("Per-token KL divergence from the base")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return fig


def _layer_ticks(ax, layers: list) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=min(len(layers), 24) or 1, integer=True))


def _plot_layer_error(report: Mapping[str, Any], colors: list):
    from matplotlib.lines import Line2D

    lines = []
    for c, color in zip(report["candidates"], colors):
        werr = c.get("weight_error")
        if not werr:
            continue
        rows = [r for r in werr.get("per_layer") or [] if _is_num(r.get("layer"))]
        for comp in COMPONENTS:
            pts = sorted((r["layer"], r[comp]) for r in rows if _finite(r.get(comp)))
            if pts:
                lines.append((c["name"], color, comp, pts))
    if not lines:
        return None
    fig = _new_figure(4.2)
    ax = fig.subplots()
    values = [v for *_, pts in lines for _, v in pts]
    for _, color, comp, pts in lines:
        ls, marker = _COMPONENT_STYLE[comp]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, ls=ls, marker=marker, ms=4, lw=1.4)
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 10:
        _log_axis(ax.yaxis, ax=ax)
    else:
        ax.set_ylim(min(0.0, min(values) * 1.1), max(max(values) * 1.1, 1e-12))
    _layer_ticks(ax, sorted({p[0] for *_, pts in lines for p in pts}))
    metric = next(c["weight_error"].get("metric") for c in report["candidates"] if c.get("weight_error"))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("relative weight error")
    ax.set_title(f"Weight error per layer ({metric})" if metric else "Weight error per layer")
    ax.grid(True, which="major", alpha=0.3)
    names = list(dict.fromkeys((name, color) for name, color, _, _ in lines))
    comps = [k for k in COMPONENTS if any(comp == k for _, _, comp, _ in lines)]
    cand_legend = ax.legend(
        [Line2D([], [], color=color, lw=2) for _, color in names], [n for n, _ in names],
        title="candidate", loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False,
    )
    ax.add_artist(cand_legend)
    ax.legend(
        [Line2D([], [], color="0.3", ls=_COMPONENT_STYLE[k][0], marker=_COMPONENT_STYLE[k][1], ms=4) for k in comps],
        [k.replace("_", " ") for k in comps],
        title="component", loc="lower left", bbox_to_anchor=(1.01, 0), fontsize=8, frameon=False,
    )
    return fig


def _log_axis(axis, ax=None) -> None:
    """A log axis labelled 0.005, 0.01, 0.02, 0.05 ... instead of 5 x 10^-3."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if ax is not None:
        ax.set_yscale("log")
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _tick_step(n: int, max_ticks: int) -> int:
    step = 1
    while n / step > max_ticks:
        step *= 2
    return step


def _expert_color_scale(values):
    """(norm, outlier threshold or None) for a heatmap of expert errors.

    Experts far above the rest (a damaged expert) would stretch any colour scale until the healthy
    experts all look alike, so values above a fence (Tukey's far-out fence, and at least 1.5x the
    median) are drawn in a separate "over" colour and the scale spans the others. The scale is
    logarithmic when those still span more than a decade, linear otherwise.
    """
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    q1, median, q3 = np.percentile(values, [25, 50, 75])
    fence = max(q3 + 3 * (q3 - q1), 1.5 * median) if median > 0 else math.inf
    inliers = values[values <= fence]
    outlier = float(fence) if len(inliers) < len(values) else None
    vmin, vmax = float(inliers.min()), float(inliers.max())
    if vmin > 0 and vmax / vmin > 10:
        return LogNorm(vmin=vmin, vmax=vmax), outlier
    if vmax <= vmin:
        vmin, vmax = vmin * 0.99 if vmin else -1e-12, vmax * 1.01 if vmax else 1e-12
    return Normalize(vmin=vmin, vmax=vmax), outlier


def _plot_expert_heatmap(report: Mapping[str, Any], colors: list):
    import matplotlib
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import FuncFormatter

    panels = []
    for c in report["candidates"]:
        werr = c.get("weight_error") or {}
        experts = werr.get("experts")
        if not experts or not experts[0]:
            continue
        arr = np.array([[v if _finite(v) else np.nan for v in row] for row in experts], dtype=np.float64)
        if np.isfinite(arr).any():
            panels.append((c["name"], list(werr.get("expert_layers") or range(len(experts))), arr))
    if not panels:
        return None
    heights = [max(1.6, 0.28 * arr.shape[0] + 1.1) for *_, arr in panels]
    fig = _new_figure(sum(heights) + 0.2)
    axes = fig.subplots(len(panels), 1, height_ratios=heights, squeeze=False)[:, 0]
    for ax, (name, layers, arr) in zip(axes, panels):
        n_rows, n_exp = arr.shape
        finite = arr[np.isfinite(arr)]
        norm, fence = _expert_color_scale(finite)
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85", over="#e8112d")
        im = ax.imshow(np.ma.masked_invalid(arr), aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
        cbar = fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01, extend="max" if fence is not None else "neither")
        if isinstance(norm, LogNorm):
            _log_axis(cbar.ax.yaxis)
        else:
            cbar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_num(v, 2)))
        cbar.set_label("rel. error" + (" (log)" if isinstance(norm, LogNorm) else ""), fontsize=8)
        cbar.ax.tick_params(labelsize=7)
        ystep = _tick_step(n_rows, 24)
        ax.set_yticks(range(0, n_rows, ystep), [f"layer {layers[i]}" for i in range(0, n_rows, ystep)])
        ax.set_xticks(range(0, n_exp, _tick_step(n_exp, 16)))
        ax.tick_params(labelsize=8)
        ax.set_xlabel("expert", fontsize=8)
        i, j = np.unravel_index(np.nanargmax(arr), arr.shape)
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="black", lw=1.6))
        title = (f"{name}: median {fmt_num(float(np.median(finite)))}, "
                 f"worst expert {j} in layer {layers[i]} ({fmt_num(arr[i, j])})")
        if fence is not None:
            n_out = int((finite > fence).sum())
            title += f"; {n_out} outlier{'s' if n_out != 1 else ''} above {fmt_num(fence, 2)} in red"
        ax.set_title(title, fontsize=9, loc="left")
        if n_exp <= 16 and n_rows <= 12:
            for (r, e), v in np.ndenumerate(arr):
                if np.isfinite(v):
                    shade = cmap(norm(v))
                    light = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] > 0.5
                    ax.text(e, r, fmt_num(v, 2), ha="center", va="center", fontsize=7,
                            color="black" if light else "white")
    return fig


def _plot_routing(report: Mapping[str, Any], colors: list):
    series = []
    for c, color in zip(report["candidates"], colors):
        routing = c.get("routing_agreement") or {}
        pts = sorted((r["layer"], r["agreement"]) for r in routing.get("per_layer") or []
                     if _is_num(r.get("layer")) and _finite(r.get("agreement")))
        if pts:
            series.append((c["name"], color, routing.get("mean"), pts))
    if not series:
        return None
    fig = _new_figure(3.6)
    ax = fig.subplots()
    for name, color, mean, pts in series:
        label = f"{name} (mean {fmt_pct(mean)})" if _finite(mean) else name
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], color=color, marker="o", ms=4, lw=1.5, label=label,
                clip_on=False)
    low = min(100 * p[1] for *_, pts in series for p in pts)
    ax.set_ylim(max(0.0, low - max(1.0, 0.1 * (100 - low))), 100.0)
    _layer_ticks(ax, sorted({p[0] for *_, pts in series for p in pts}))
    ax.set_xlabel("decoder layer (MoE layers)")
    ax.set_ylabel("routing agreement, %")
    ax.set_title("Router agreement with the base per layer")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8, frameon=False)
    return fig


# ----------------------------------------------------------------------------- HTML

_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f4f5f7; color: #1f2328;
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Liberation Sans", "DejaVu Sans", sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 20px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 0 0 12px; }
h3 { font-size: 15px; margin: 18px 0 8px; }
.sub { color: #57606a; margin: 0 0 20px; }
section { background: #fff; border: 1px solid #d8dee4; border-radius: 8px; padding: 18px 20px; margin: 0 0 20px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 0; }
dt { font-weight: 600; color: #57606a; }
dd { margin: 0; overflow-wrap: anywhere; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; font-size: 13px; }
th, td { padding: 5px 9px; border-bottom: 1px solid #e5e8eb; text-align: right; white-space: nowrap; }
th { background: #f6f8fa; font-weight: 600; border-bottom: 2px solid #d8dee4;
  white-space: normal; vertical-align: bottom; }
th:first-child, td:first-child { text-align: left; }
td.l, th.l { text-align: left; }
tbody tr:nth-child(even) td { background: #fafbfc; }
.notes { color: #57606a; font-size: 13px; margin: 8px 0 0; padding-left: 0; list-style: none; }
figure { margin: 0 0 24px; }
figure:last-child { margin-bottom: 0; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #e5e8eb; border-radius: 4px; }
figcaption { color: #57606a; font-size: 13px; margin-top: 6px; }
.note { background: #fff8e1; border-left: 4px solid #e3b341; padding: 8px 12px; margin: 12px 0 0; }
.warn { color: #b42318; font-weight: 600; }
code { font: 12px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; }
footer { color: #57606a; font-size: 12px; text-align: center; }
"""


def _h(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_table(header: list[str], rows: list[list[str]], left_cols: int = 1) -> str:
    def cell(tag: str, i: int, text: str) -> str:
        cls = ' class="l"' if i < left_cols else ""
        return f"<{tag}{cls}>{_h(text)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "\n".join("<tr>" + "".join(cell("td", i, t) for i, t in enumerate(row)) + "</tr>" for row in rows)
    return f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table></div>'


def _dl(items: list[tuple[str, str]]) -> str:
    out = []
    for label, text in items:
        cls = ' class="warn"' if text.startswith("WARNING") else ""
        value = f"<code>{_h(text)}</code>" if label in ("Path", "Token ids sha256") else _h(text)
        out.append(f"<dt>{_h(label)}</dt><dd{cls}>{value}</dd>")
    return "<dl>" + "".join(out) + "</dl>"


def render_html(report: Mapping[str, Any], plots: Mapping[str, bytes]) -> str:
    """report.html: one page with everything inline (CSS, PNGs as data: URIs), fetching nothing."""
    base = report["base"]
    title = f"l4q eval report: {base.get('source', '')}".strip()
    created = " ".join(str(x) for x in (report.get("created_by"), report.get("l4q_version")) if x)
    n = len(report["candidates"])
    subtitle = f'Base <b>{_h(base.get("source", "n/a"))}</b> vs {n} candidate{"s" if n != 1 else ""}'
    if created:
        subtitle += f" · {_h(created)}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        # Forbid every fetch: the page must be complete on its own.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_h(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body><main>",
        "<h1>Quantization quality report</h1>",
        f'<p class="sub">{subtitle}</p>',
        "<section><h2>Base, data and method</h2>",
        _dl(_data_lines(report)),
        "</section>",
        '<section><h2>Summary</h2>',
    ]
    if report["candidates"]:
        parts.append(_html_table(list(SUMMARY_HEADER), summary_rows(report), left_cols=2))
        notes, _ = _notes(report)
        foot = [f"<li>[{i}] {_h(n)}</li>" for i, n in enumerate(notes, 1)]
        foot.append(
            "<li>PPL (base): the candidate's perplexity and, in parentheses, the base's on the same positions. "
            "KLD in nats. Agreements are over all scored tokens.</li>"
        )
        parts.append('<ul class="notes">' + "".join(foot) + "</ul>")
    else:
        parts.append("<p>No candidates were evaluated.</p>")
    parts.append("</section>")
    if plots:
        parts.append("<section><h2>Plots</h2>")
        for kind, png in plots.items():
            name, caption = PLOTS[kind]
            data = base64.b64encode(png).decode("ascii")
            parts.append(
                f'<figure id="{_h(kind)}"><img alt="{_h(kind.replace("_", " "))}" src="data:image/png;base64,{data}">'
                f"<figcaption>{_h(caption)}</figcaption></figure>"
            )
        parts.append("</section>")
    for c in report["candidates"]:
        parts.append(f"<section><h2>{_h(c['name'])}</h2>")
        parts.append(_dl(_facts(report, c)))
        note = (c.get("windows") or {}).get("note")
        if note:
            parts.append(f'<p class="note"><b>Note:</b> {_h(note)}</p>')
        parts.append("<h3>KL divergence per token (nats)</h3>")
        parts.append(_html_table([label for _, label in KLD_STATS], [_kld_stat_row(c)], left_cols=0))
        header, rows = _per_layer_rows(c)
        if rows:
            what = "Per layer: routing agreement and relative weight error" if len(header) > 2 else "Per layer"
            parts.append(f"<h3>{_h(what)}</h3>")
            parts.append(_html_table(header, rows))
        parts.append("</section>")
    if created:
        parts.append(f"<footer>Made by {_h(created)}.</footer>")
    parts += ["</main></body>", "</html>", ""]
    return "\n".join(parts)
