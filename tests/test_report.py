"""Tests for llama4_quant.report: every file written, self-contained HTML, round-tripping JSON, skipped plots."""

from __future__ import annotations

import base64
import copy
import html
import json
import math
import re
from pathlib import Path

import pytest

from llama4_quant import report as R

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHUNK_NOTE = (
    "llama.cpp fixes the Llama 4 attention chunk at 8192; this model's chunk is 128, "
    "so only positions 0-127 of each window are scored"
)


def _histogram(mean: float, seed: int) -> dict:
    """A log-normal-looking count histogram over 1e-8..10 (50 log-spaced bins) centred near `mean`."""
    edges = [10 ** (-8 + 9 * i / 50) for i in range(51)]
    centre = math.log10(mean) - 0.4
    counts = []
    for i in range(50):
        mid = (math.log10(edges[i]) + math.log10(edges[i + 1])) / 2
        counts.append(int(round(4000 * math.exp(-((mid - centre) ** 2) / (2 * 0.7**2)))) + (seed + i) % 3)
    return {"edges": edges, "counts": counts}


def _candidate(name: str, kind: str, scheme: str, size: int, kld_mean: float, *, layers: int, experts: int,
               moe: bool, note: str | None = None, seed: int = 0) -> dict:
    scored = 127 if note else 255
    cand = {
        "name": name, "path": f"/models/{name}", "kind": kind, "scheme": scheme, "size_bytes": size,
        "windows": {"count": 256, "length": 256, "scored_positions_per_window": scored,
                    "tokens_scored": 256 * scored, "note": note},
        "token_ids_sha256": "ab12" * 16,
        "base_perplexity": 40.3 if not note else 38.7,
        "perplexity": 40.9, "perplexity_ratio": 40.9 / 40.3, "perplexity_diff": 0.6,
        "kld": {"mean": kld_mean, "stderr": kld_mean / 50, "median": kld_mean * 0.4, "p90": kld_mean * 2.1,
                "p99": kld_mean * 12, "p999": kld_mean * 40, "max": kld_mean * 150,
                "histogram": _histogram(kld_mean, seed)},
        "top1_agreement": 0.948,
        "top_prob_change": {"mean": -0.002, "rms": 0.03},
        "rest_mass_mean": 0.001,
        "routing_agreement": None,
        "weight_error": None,
    }
    if moe:
        cand["routing_agreement"] = {
            "mean": 0.97, "per_layer": [{"layer": l, "agreement": 0.99 - 0.01 * l} for l in range(layers)]
        }
        grid = [[0.08 + 0.002 * ((7 * l + 3 * e + seed) % 5) for e in range(experts)] for l in range(layers)]
        grid[layers - 1][experts // 3] = 0.45  # one clearly damaged expert
        cand["weight_error"] = {
            "metric": "relative Frobenius error ||W_q - W|| / ||W||",
            "per_layer": [{"layer": l, "attention": 0.08 + 0.001 * l, "shared_expert": 0.079, "dense_mlp": None,
                           "experts": sum(grid[l]) / experts} for l in range(layers)],
            "expert_layers": list(range(layers)),
            "experts": grid,
        }
    return cand


def synthetic_report(layers: int = 4, experts: int = 16) -> dict:
    """Two candidates: safetensors int4 with routing and weight error (one damaged expert); gguf without."""
    return {
        "l4q_version": "0.1.0",
        "created_by": "l4q eval",
        "base": {"source": "tiny", "path": "/models/tiny", "size_bytes": 30_590_000, "perplexity": 40.3},
        "data": {"description": "built-in held-out text of the tiny models", "tokens": 65536, "ctx": 256,
                 "windows": 256, "token_ids_sha256": "ab12" * 16},
        "kld_method": "KL(base || candidate) per predicted token over the base's top-256 tokens "
                      "plus one bucket for the remaining mass",
        "candidates": [
            _candidate("tiny-int4", "safetensors", "int4", 9_580_000, 0.0055, layers=layers, experts=experts,
                       moe=True),
            _candidate("tiny-Q4_K_M", "gguf", "Q4_K_M", 10_120_000, 0.0123, layers=layers, experts=experts,
                       moe=False, note=CHUNK_NOTE, seed=1),
        ],
    }


def _data_uri_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


@pytest.mark.parametrize("layers,experts", [(4, 16), (2, 128)])
def test_write_reports_all_files(tmp_path: Path, layers: int, experts: int):
    report = synthetic_report(layers, experts)
    original = copy.deepcopy(report)
    paths = R.write_reports(report, tmp_path / "out")

    assert report == original, "the renderer must not modify its input"
    assert set(paths) == {"json", "md", "html", *R.PLOTS}
    for kind, path in paths.items():
        assert path.parent == tmp_path / "out" and path.stat().st_size > 0
        if kind in R.PLOTS:
            assert path.name == R.PLOTS[kind][0] and path.read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths.values())

    text = paths["json"].read_text()
    assert json.loads(text) == original
    assert text == json.dumps(original, indent=2) + "\n"

    page = paths["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<link" not in page.lower() and "<script" not in page.lower() and "@import" not in page
    assert "url(" not in page
    embedded = _data_uri_pngs(page)
    assert embedded == [paths[k].read_bytes() for k in R.PLOTS]
    assert html.escape(CHUNK_NOTE) in page and html.escape(original["kld_method"]) in page

    md = paths["md"].read_text()
    rows = [line for line in md.splitlines() if line.startswith("| tiny-")]
    assert [r.split("|")[1].strip() for r in rows] == ["tiny-int4", "tiny-Q4_K_M"]
    assert "0.00550 ± 0.00011" in rows[0] and "0.0123 ± 0.0002" in rows[1]
    assert "n/a" in rows[1]  # no routing agreement for the gguf
    assert "31.3%" in rows[0]
    assert CHUNK_NOTE in md and original["data"]["description"] in md and original["kld_method"] in md
    assert f"layer {layers - 1} expert {experts // 3} (0.450)" in md  # the damaged expert is called out


def test_plots_without_data_are_skipped_and_stale_copies_removed(tmp_path: Path):
    full = R.write_reports(synthetic_report(), tmp_path)
    assert full["expert_heatmap"].exists()

    report = synthetic_report()
    report["candidates"] = [report["candidates"][1]]  # only the gguf: no routing, no weight error
    paths = R.write_reports(report, tmp_path)
    assert set(paths) == {"json", "md", "html", "kld_distribution"}
    for kind in ("layer_error", "expert_heatmap", "routing_agreement"):
        assert not (tmp_path / R.PLOTS[kind][0]).exists()
    assert len(_data_uri_pngs(paths["html"].read_text())) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]

    for c in report["candidates"]:
        c["kld"]["histogram"] = None
    paths = R.write_reports(report, tmp_path)
    assert set(paths) == {"json", "md", "html"}
    assert not (tmp_path / "kld_distribution.png").exists()
    assert "<img" not in paths["html"].read_text()


def test_no_candidates(tmp_path: Path):
    report = synthetic_report()
    report["candidates"] = []
    paths = R.write_reports(report, tmp_path)
    assert set(paths) == {"json", "md", "html"}
    assert "No candidates" in paths["md"].read_text()


def test_deterministic(tmp_path: Path):
    a = R.write_reports(synthetic_report(), tmp_path / "a")
    b = R.write_reports(synthetic_report(), tmp_path / "b")
    for kind in a:
        assert a[kind].read_bytes() == b[kind].read_bytes(), kind


def test_failed_write_leaves_no_temporaries(tmp_path: Path, monkeypatch):
    R.write_reports(synthetic_report(), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    report = synthetic_report()
    report["candidates"][0]["name"] = "renamed"
    monkeypatch.setattr(R.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        R.write_reports(report, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_html_escapes_names(tmp_path: Path):
    report = synthetic_report()
    report["candidates"][0]["name"] = "<b>x|y</b>"
    paths = R.write_reports(report, tmp_path)
    assert "&lt;b&gt;x|y&lt;/b&gt;" in paths["html"].read_text()
    assert "| &lt;b&gt;x\\|y&lt;/b&gt; |" not in paths["md"].read_text()  # Markdown keeps text, escapes pipes
    assert "| <b>x\\|y</b> |" in paths["md"].read_text()


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda r: r.pop("candidates"), "candidates"),
        (lambda r: r["candidates"][0]["kld"].pop("mean"), "candidates[0].kld.mean"),
        (lambda r: r["candidates"][1]["kld"]["histogram"]["counts"].pop(), "candidates[1].kld.histogram"),
        (lambda r: r["candidates"][0]["weight_error"]["experts"].pop(), "candidates[0].weight_error.experts"),
    ],
)
def test_malformed_report_names_the_field(tmp_path: Path, mutate, field):
    report = synthetic_report()
    mutate(report)
    with pytest.raises(R.ReportFormatError, match=re.escape(field)):
        R.write_reports(report, tmp_path)
    assert not list(tmp_path.iterdir())


def test_load_report_round_trip(tmp_path: Path):
    R.write_reports(synthetic_report(), tmp_path)
    assert R.load_report(tmp_path) == synthetic_report()
    with pytest.raises(R.ReportFormatError, match="no such report"):
        R.load_report(tmp_path / "missing")


def test_formatting():
    assert R.fmt_num(0.0055) == "0.00550"
    assert R.fmt_num(40.93) == "40.9"
    assert R.fmt_num(3e-6) == "3.00e-06"
    assert R.fmt_num(None) == "n/a"
    assert R.fmt_kld(0.0055, 0.0001) == "0.00550 ± 0.00010"
    assert R.fmt_kld(0.0055, 1e-7) == "0.00550 ± 1.0e-07"
    assert R.fmt_size(9_580_000) == "9.58 MB" and R.fmt_size(218.4e9) == "218 GB"
    assert R.fmt_pct(0.948) == "94.8%"


def test_screenshot_in_offline_chromium(tmp_path: Path):
    """The page renders offline with its plots: the screenshot holds the plots' line colour."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    R.write_reports(synthetic_report(), tmp_path)
    script = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_report.py"
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, timeout=300, capture_output=True)
    img = np.asarray(Image.open(tmp_path / "report-screenshot.png").convert("RGB")).astype(int)
    assert img.shape[1] == 1280 and img.shape[0] > 2000
    tab_blue = (np.abs(img - np.array([31, 119, 180])).sum(axis=2) < 30).sum()
    assert tab_blue > 2000  # the KLD, layer error and routing lines of the first candidate


def test_files_get_umask_permissions(tmp_path: Path):
    import os

    umask = os.umask(0)
    os.umask(umask)
    for path in R.write_reports(synthetic_report(), tmp_path).values():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask
