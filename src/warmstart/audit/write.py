"""An audit's files: label_issues.csv, duplicates.csv, outliers.csv, and audit.html (thumbnails
embedded, so the page is one file a person can page through)."""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path

from ..data.images import open_image
from ..files import spreadsheet_safe

PAGE_ROWS = 200  # per section of the page; the CSV files hold every row
COLUMNS = {"label_issues": ["path", "split", "label", "suggested", "score"],
           "duplicates": ["path_a", "path_b", "split_a", "split_b", "label_a", "label_b", "similarity"],
           "duplicate_groups": ["group", "size", "path", "split", "label"],
           "outliers": ["path", "split", "label", "score"]}


def write_audit(result) -> None:
    result.out.mkdir(parents=True, exist_ok=True)
    for name, columns in COLUMNS.items():
        with (result.out / f"{name}.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({k: spreadsheet_safe(v) for k, v in row.items()} for row in getattr(result, name))
    (result.out / "audit.html").write_text(_page(result), encoding="utf-8")


def thumbnail(item, size: int = 120) -> str:
    """The photo (a path, or an item of a split) as a small inline JPEG (data: URI), or "" if it
    cannot be read."""
    try:
        image = open_image(item)
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=80)
    except Exception:
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure(path: str, caption: str, item=None) -> str:
    return (f'<figure><img src="{thumbnail(path if item is None else item)}" alt=""><figcaption>'
            f'{html.escape(caption)}<br><small>{html.escape(Path(path).name)}</small></figcaption></figure>')


def _issue(r: dict) -> str:
    given = _figure(r["path"], r["split"] + ": labelled " + r["label"], r.get("item"))
    return (f'<div class="row">{given}<p>suggested <b>{html.escape(r["suggested"])}</b> '
            f'(label quality {r["score"]:.3f})</p></div>')


def _pair(d: dict) -> str:
    leak = " — <b>leakage</b>" if d["split_a"] != d["split_b"] else ""
    return (f'<div class="row">{_figure(d["path_a"], d["split_a"] + ": " + d["label_a"], d.get("item_a"))}'
            f'{_figure(d["path_b"], d["split_b"] + ": " + d["label_b"], d.get("item_b"))}<p>similarity {d["similarity"]:.3f}{leak}</p>'
            f'</div>')


def _outlier(o: dict) -> str:
    return f'<div class="row">{_figure(o["path"], o["split"] + ": " + o["label"], o.get("item"))}<p>distance {o["score"]:.3f}</p></div>'


def _page(result) -> str:
    issues = "".join(_issue(r) for r in result.label_issues[:PAGE_ROWS])
    pairs = "".join(_pair(d) for d in result.duplicates[:PAGE_ROWS])
    outliers = "".join(_outlier(o) for o in result.outliers[:PAGE_ROWS])
    style = ("body{font-family:system-ui,sans-serif;max-width:980px;margin:2rem auto;padding:0 1rem}"
             ".row{display:flex;gap:1rem;align-items:center;border-bottom:1px solid #ddd;padding:.4rem 0}"
             "figure{margin:0;text-align:center;width:140px}img{max-width:120px;max-height:120px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>warmstart audit</title><style>{style}</style>"
            f"</head><body><h1>Label audit</h1><p>{html.escape(result.summary())}</p>"
            f"<h2>Likely label errors ({len(result.label_issues)})</h2>{issues or '<p>none</p>'}"
            f"<h2>Near-duplicates ({len(result.duplicates)}, {len(result.leaks)} across splits)</h2>"
            f"{pairs or '<p>none</p>'}<h2>Outliers ({len(result.outliers)})</h2>{outliers or '<p>none</p>'}"
            f"<p><small>Each section shows its first {PAGE_ROWS} rows; the CSV files beside this page hold "
            f"them all.</small></p></body></html>")
