"""`warmstart report RUN`: a self-contained report.html (figures embedded) plus the PNGs."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import torch
import yaml

from ..calibration import BINS, reliability
from ..compute.runtime import Runtime
from ..data.images import open_image
from ..data.transforms import eval_transform
from ..errors import UserError
from ..evaluate import compute_outputs, metrics_from_logits, run_split
from ..run_dir import RunDir
from ..train.run import describe_rates
from . import plots
from .runs import metrics_problem

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{margin-bottom:.2rem} h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
table{border-collapse:collapse;margin:.6rem 0} td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:left}
th{background:#f4f4f4} img.figure{max-width:100%} .muted{color:#777}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:.8rem}
.card{border:1px solid #ddd;border-radius:6px;padding:.4rem;font-size:.8rem}
.card img{width:100%;height:140px;object-fit:cover;border-radius:4px}
.wrong{color:#b00020} .true{color:#1b5e20}
.headline{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:.8rem;margin:1rem 0}
.tile{border:1px solid #ddd;border-radius:6px;padding:.6rem .8rem} .tile>b{font-size:1.5rem;display:block}
details summary{cursor:pointer;margin:.8rem 0}
"""


def _png_data(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _thumbnail(item) -> str:
    image = open_image(item)
    image.thumbnail((220, 220))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def readable(value) -> str:
    """A value as a person reads it: never a Python repr (None is —, lists are comma-separated,
    floats 4 significant digits)."""
    if value is None or value == [] or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(readable(v) for v in value)
    return str(value)


def rows(mapping: dict, prefix: str = "") -> list[list[str]]:
    """[name, value] rows, nested mappings as rows of their own ("calibration · temperature")."""
    out = []
    for key, value in mapping.items():
        name = f"{prefix}{key}".replace("_", " ")
        if isinstance(value, dict):
            out += rows(value, f"{prefix}{key} · ")
        else:
            out.append([name, readable(value)])
    return out


def headline(metrics: dict, split: str, evaluation, calib: dict, before: dict | None, meta: dict, seconds: float,
             engine: str) -> str:
    """The first screen: how good, how honest, on what, how long, and how it was trained, in words."""
    c = metrics.get("calibration") or {}
    fitted = {"cross-fit": "cross-fitted on train + val", "val": "fitted on val"}.get(str(c.get("fitted_on")), "")
    honest = (f"ECE {before['ece']:.3f} → <b>{calib['ece']:.3f}</b> with temperature "
              f"{meta['temperature']:.3f} ({fitted}, {c.get('images', '?')} photos)" if before else
              f"ECE <b>{calib['ece']:.3f}</b> (not calibrated)")
    start = metrics.get("head_start") or {}
    started = (f"the head started from the pretrained classifier ({start.get('classes_matched')} of "
               f"{start.get('classes')} classes known)" if start.get("from") == "pretrained classifier" else
               "the head started from zero")
    test = (f"; test top-1 {metrics['test_top1']:.1%} on {metrics.get('test_images')} photos"
            if metrics.get("test_top1") is not None and split != "test" else "")
    tiles = [("top-1", f"<span id='top1'>{evaluation.top1:.4f}</span>", f"top-5 {evaluation.top5:.4f} on the "
              f"{split} split{test}"),
             ("probabilities", f"{calib['ece']:.3f}", honest),
             ("photos", f"{evaluation.num_images}", f"{split} photos of {len(meta['class_names'])} classes; trained "
              f"on {metrics.get('train_images', '?')}"),
             ("time", f"{metrics.get('wall_seconds', 0):.1f} s",
              f"the run end to end; {describe_rates(metrics)}; this report's pass {seconds:.1f} s ({engine})")]
    recipe = f"recipe <b>{html.escape(str(metrics.get('recipe') or 'none (the defaults)'))}</b>"
    words = (f"<p>{recipe}: {html.escape(metrics['model'])} ({html.escape(str(metrics.get('architecture', '')))}), "
             f"strategy {html.escape(str(metrics.get('strategy', '')))}, trained on "
             f"{html.escape(str(metrics.get('training_path', '')))} for {metrics['epochs']} epochs; {started}"
             f"{'; flip test-time augmentation' if metrics.get('tta') else ''}.</p>")
    cells = "".join(f"<div class='tile'>{name}<b>{value}</b><span class='muted'>{note}</span></div>"
                    for name, value, note in tiles)
    return f"<div class='headline'>{cells}</div>{words}"


def most_confused(names: list[str], confusion: np.ndarray, top: int = 15) -> list[dict]:
    pairs = []
    for t in range(len(names)):
        total = confusion[t].sum()
        for p in range(len(names)):
            if t != p and confusion[t, p]:
                pairs.append({"true": names[t], "predicted": names[p], "count": int(confusion[t, p]),
                              "rate": float(confusion[t, p] / total)})
    return sorted(pairs, key=lambda x: (-x["count"], -x["rate"]))[:top]


def _mistakes(out, probs: torch.Tensor, images, names: list[str], gallery: int) -> tuple[list[int], list[str]]:
    """The misclassified photos (the most confident first) and cards for the first `gallery`:
    a thumbnail, the true class, the top-3 guesses."""
    confidence, predicted = (probs.max(1) if len(probs) else (torch.empty(0), torch.empty(0, dtype=torch.long)))
    wrong = [i for i in range(len(out.labels)) if int(predicted[i]) != int(out.labels[i])]
    wrong.sort(key=lambda i: -float(confidence[i]))
    cards = []
    for i in wrong[:gallery]:
        item = images.items[int(out.indices[i])]
        top3 = probs[i].topk(min(3, len(names)))
        guesses = "".join(f"<li>{html.escape(names[c])} {float(p):.1%}</li>" for p, c in zip(top3.values, top3.indices))
        cards.append(f'<div class="card"><img src="{_thumbnail(item)}" alt="{html.escape(str(item))}">'
                     f'<div class="true">true: {html.escape(names[int(out.labels[i])])}</div>'
                     f'<ol class="wrong">{guesses}</ol></div>')
    return wrong, cards


def _calibration_section(figure: Path, calib: dict, before: dict | None, meta: dict) -> list[str]:
    where = ("cross-fitted on the run's train + val photos" if meta.get("temperature_fitted_on") == "cross-fit"
             else "fitted on the run's validation photos")
    said = (f" (before calibration: {before['ece']:.4f}; temperature {meta['temperature']:.3f}, {where})" if before
            else " (not calibrated: the run had no validation split, or --no-calibrate)")
    return ["<h2 id='calibration'>Calibration</h2>",
            f"<img class='figure' src='{_png_data(figure)}' alt='reliability diagram'>",
            f"<p>Expected calibration error ({BINS} bins): <b id='ece'>{calib['ece']:.4f}</b>{said}</p>",
            _table(["confidence", "images", "accuracy", "mean confidence"],
                   [[f"{b['low']:.2f}–{b['high']:.2f}", b["count"], f"{b['accuracy']:.3f}", f"{b['confidence']:.3f}"]
                    for b in calib["bins"]])]


def _class_sections(files: dict, names: list[str], evaluation, pairs: list[dict]) -> list[str]:
    worst = sorted(zip(names, evaluation.per_class_accuracy, evaluation.confusion.sum(1).tolist()),
                   key=lambda x: (x[1] is None, x[1] if x[1] is not None else 0))
    return [
        "<h2 id='per-class'>Per-class accuracy</h2>",
        f"<img class='figure' src='{_png_data(files['per_class'])}' alt='per-class accuracy'>",
        _table(["class", "images", "accuracy"], [[n, c, "—" if a is None else f"{a:.3f}"] for n, a, c in worst]),
        "<h2 id='confusion'>Confusion</h2>",
        f"<img class='figure' src='{_png_data(files['confusion'])}' alt='confusion matrix'>",
        "<h3>Most confused pairs</h3>",
        _table(["true", "predicted as", "images", "share of the class"],
               [[p["true"], p["predicted"], p["count"], f"{p['rate']:.1%}"] for p in pairs]) if pairs
        else "<p>No confusions.</p>"]


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is damaged ({exc.__class__.__name__}: {str(exc)[:120]}): restore it from a backup, "
                        f"or train the run again") from None


def build_report(run_dir: str | Path, data: str | None = None, split: str = "val", gallery: int = 24,
                 batch_size: int = 64, workers: int | None = None, engine: str | None = None) -> Path:
    """RUN/report.html (self-contained) and RUN/report/*.png: the run on `split` for a person."""
    run_dir, where = Path(run_dir), RunDir(run_dir)
    run, images = run_split(run_dir, data, split)
    metrics, history = _json(where.metrics), _json(where.history) if where.history.is_file() else []
    problem = metrics_problem(metrics) if isinstance(metrics, dict) else "it is not an object"
    if problem:
        raise UserError(f"{where.metrics}: {problem}: the run's metrics.json is damaged; restore it or train again")
    runtime = Runtime.for_run(run_dir, engine)  # as the run computed: device, precision, pipeline, engine
    forward = runtime.classify(run.network, run.data_config["input_size"], run.meta.get("tta"),
                               run.meta.get("temperature"), images=len(images))
    out = compute_outputs(run.network, images, eval_transform(run.data_config), batch_size, workers, runtime, forward)
    evaluation = metrics_from_logits(out.outputs, out.labels, run.class_names)
    probs = out.outputs.softmax(1) if len(out.outputs) else torch.empty(0, len(run.class_names))
    names, temperature = run.class_names, run.meta.get("temperature")  # the model's outputs are logits / T

    figures = where.report_figures
    figures.mkdir(exist_ok=True)
    files = {"per_class": plots.per_class(names, [a if a is not None else 0.0 for a in evaluation.per_class_accuracy],
                                          figures / "per_class_accuracy.png"),
             "confusion": plots.confusion_matrix(names, evaluation.confusion, figures / "confusion_matrix.png")}
    shown = None
    try:
        if history:
            files["curves"], shown = plots.curves(history, figures / "curves.png")
    except (KeyError, TypeError, ValueError, AttributeError):  # a damaged history.json: the report without curves
        shown = None
    calib = reliability(out.outputs, out.labels)
    before = reliability(out.outputs * temperature, out.labels) if temperature else None
    files["calibration"] = plots.reliability_diagram(calib, figures / "reliability.png", before)
    pairs = most_confused(names, evaluation.confusion)
    wrong, cards = _mistakes(out, probs, images, names, gallery)
    (figures / "report.json").write_text(json.dumps({
        "split": split, "images": evaluation.num_images, "top1": evaluation.top1, "top5": evaluation.top5,
        "ece": calib["ece"], "ece_before_calibration": before["ece"] if before else None,
        "temperature": temperature, "misclassified": len(wrong), "most_confused": pairs,
        "per_class_accuracy": dict(zip(names, evaluation.per_class_accuracy)), "engine": forward.engine,
        "curves": shown}, indent=2))
    config = yaml.safe_load(where.config.read_text()) if where.config.is_file() else {}
    sections = [
        f"<h1>warmstart report</h1><p class='muted'>{html.escape(str(run_dir))}</p>",
        "<h2 id='summary'>Summary</h2>", headline(metrics, split, evaluation, calib, before, run.meta, out.seconds,
                                                  forward.engine),
        "<details><summary>Every setting of the run (config.yaml)</summary>", _table(["setting", "value"], rows(config)),
        "</details><details><summary>Everything the run measured (metrics.json)</summary>",
        _table(["measure", "value"], rows(metrics)), "</details>",
        *([f"<h2 id='curves'>Training: {shown}</h2>",
           f"<img class='figure' src='{_png_data(files['curves'])}' alt='training curves'>"] if shown else []),
        *_class_sections(files, names, evaluation, pairs),
        f"<h2 id='misclassified'>Misclassified images ({len(wrong)}; most confident first)</h2>",
        f"<div class='gallery'>{''.join(cards)}</div>" if cards else "<p>None.</p>",
        *_calibration_section(files["calibration"], calib, before, run.meta)]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>warmstart report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>")
    where.report.write_text(page)
    return where.report
