"""Run the benchmarks and write BENCHMARKS.md.

    python -m benchmarks.run [--quick] [--only feature_extractor fine_tune image_path]

--quick uses small subsets of imagewoof-mini and finishes in a few minutes on 2 cores.
BENCHMARKS.md is regenerated from every result in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json

from . import (audit, calibration, engine, feature_extractor, fine_tune, hard_set, image_path, int8, pretrained_prior,
               recipes, serve_load, sources)
from .common import RESULTS, ROOT

# the maintained benchmarks, each run by `--only NAME`; the one-off studies (benchmarks/studies/) run on their own,
# as benchmarks/gpu.py does on a GPU; every result is rendered below in its section's order
SUITES = {name: module.run for name, module in {
    "feature_extractor": feature_extractor, "fine_tune": fine_tune, "image_path": image_path, "serve_load": serve_load,
    "int8": int8, "recipes": recipes, "hard_set": hard_set, "pretrained_prior": pretrained_prior,
    "calibration": calibration, "audit": audit, "engine": engine, "sources": sources}.items()}
SUITES["calibration_held_out"] = lambda quick: calibration.held_out((0,) if quick else (0, 1, 2))
SUITES["serve_slow_bodies"] = serve_load.slow_bodies


def _machine_line(m: dict) -> str:
    card = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    return (f"{m['cpu']}, {m['cores']} cores{card}; Python {m['python']}, torch {m['torch']}, timm {m['timm']}, "
            f"warmstart {m['warmstart']}; {m['date']}")


def _feature_extractor(r: dict) -> list[str]:
    p, w, b = r["plain"], r["warmstart"], r["warmstart_bf16"]
    return [
        f"### 1. Feature-extractor recipe ({'quick: ' if r['quick'] else ''}{r['train_images']} train / "
        f"{r['val_images']} val images)",
        "", f"Machine: {_machine_line(r['machine'])}", "",
        "| | plain timm + PyTorch loop | warmstart (fp32) | warmstart (bf16) |",
        "| --- | ---: | ---: | ---: |",
        f"| training phase, 10 epochs (s) | {p['train_seconds']:.1f} | {w['train_seconds']:.1f} | "
        f"{b['train_seconds']:.1f} |",
        f"| final evaluation (s) | {p['eval_seconds']:.1f} | {w['eval_seconds']:.1f} | {b['eval_seconds']:.1f} |",
        f"| end to end (s) | {p['end_to_end_seconds']:.1f} | {w['end_to_end_seconds']:.1f} | "
        f"{b['end_to_end_seconds']:.1f} |",
        f"| top-1 | {100 * p['top1']:.2f}% | {100 * w['top1']:.2f}% | {100 * b['top1']:.2f}% |",
        f"| **training-phase speed-up** | 1× | **{r['train_phase_ratio']:.1f}×** | "
        f"**{r['bf16_train_phase_ratio']:.1f}×** |",
        f"| **end-to-end speed-up** | 1× | **{r['end_to_end_ratio']:.1f}×** | **{r['bf16_end_to_end_ratio']:.1f}×** |",
        f"| top-1 difference (points) | | {r['top1_difference_points']:+.2f} | {r['bf16_top1_difference_points']:+.2f} |",
        "",
    ]


def _extraction(r: dict) -> list[str]:
    p, w, b = r["plain"], r["warmstart"], r["warmstart_bf16"]
    return [
        "### 4. Feature extraction throughput (from benchmark 1's run)",
        "", f"Machine: {_machine_line(r['machine'])}", "",
        f"warmstart extracts {w['extraction_images_per_sec']:.1f} img/s (fp32, channels_last, inference mode) and "
        f"{b['extraction_images_per_sec']:.1f} img/s (bf16); the plain loop's frozen forward runs "
        f"{p['forward_images_per_sec']:.1f} img/s: {r['extraction_vs_plain_forward']:.2f}× (fp32).",
        "",
    ]


def _fine_tune(r: dict) -> list[str]:
    lines = [
        f"### 2. Full fine-tuning throughput ({'quick: ' if r['quick'] else ''}{r['train_images']} images, "
        f"one epoch each)", "", f"Machine: {_machine_line(r['machine'])}", "",
        "| | images/sec | vs plain loop |", "| --- | ---: | ---: |",
        f"| plain timm + PyTorch loop (fp32, NCHW) | {r['plain_images_per_sec']:.2f} | 1.00× |",
    ]
    for name, value in r["warmstart_images_per_sec"].items():
        lines.append(f"| warmstart: {name} | {value:.2f} | {r['ratios'][name]:.2f}× |")
    return lines + [""]


def _image_path(r: dict) -> list[str]:
    return [
        f"### 3. Image path ({'quick: ' if r['quick'] else ''}{r['images']} imagewoof photos, one process)", "",
        f"Machine: {_machine_line(r['machine'])}", "",
        "| view | original JPEG (img/s) | pre-resized cache (img/s) | ratio |", "| --- | ---: | ---: | ---: |",
        f"| decoding alone (to an RGB image) | {r['jpeg_decode_images_per_sec']:.0f} | "
        f"{r['cache_decode_images_per_sec']:.0f} | **{r['decode_ratio']:.1f}×** |",
        f"| evaluation (resize + center crop) | {r['jpeg_eval_images_per_sec']:.0f} | "
        f"{r['cache_eval_images_per_sec']:.0f} | **{r['eval_ratio']:.1f}×** |",
        f"| training (random-resized-crop + flip) | {r['jpeg_train_images_per_sec']:.0f} | "
        f"{r['cache_train_images_per_sec']:.0f} | **{r['train_ratio']:.1f}×** |",
        "", f"Building the cache took {r['cache_build_seconds']:.1f} s ({r['cache_bytes'] / 1e6:.0f} MB).", "",
        "The batched pipeline (`--pipeline gpu`'s code, here on CPU tensors in one process, batches of 32: "
        "torchvision's JPEG decoder, torch's antialiased resize) against the per-sample PIL path on the original "
        "JPEGs; on a CPU `--pipeline auto` keeps the per-sample path, which this measures as faster:", "",
        "| view | batched, original JPEG (img/s) | batched, pre-resized cache (img/s) | ratios to per-sample JPEG |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {view} | {r[f'batched_jpeg_{view}_images_per_sec']:.0f} | {r[f'batched_cache_{view}_images_per_sec']:.0f} | "
          f"{r[f'batched_jpeg_{view}_ratio']:.2f}× / {r[f'batched_cache_{view}_ratio']:.2f}× |" for view in ("eval", "train")],
        "",
    ]


def _serve_load(r: dict) -> list[str]:
    lines = [f"### 5. Service under load ({'quick: ' if r['quick'] else ''}{r['clients']} concurrent clients, "
             f"loopback, real photos)", "", f"Machine: {_machine_line(r['machine'])}", "",
             "| | requests | errors | requests/sec | p50 (ms) | p99 (ms) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, m in r["results"].items():
        lines.append(f"| {name} | {m['requests']} | {m['errors']} | {m['requests_per_sec']:.1f} | {m['p50_ms']:.0f} | "
                     f"{m['p99_ms']:.0f} |")
    values = list(r["results"].values())
    if len(values) == 2:
        lines += ["", f"Micro-batching: {values[0]['requests_per_sec'] / values[1]['requests_per_sec']:.2f}× the "
                      f"throughput of one forward pass per request."]
    return lines + [""]


def _serve_slow_bodies(r: dict) -> list[str]:
    return [f"### 5c. The service while {r['connections']} connections trickle their bodies ({r['seconds']:.0f} s)", "",
            f"Machine: {_machine_line(r['machine'])}", "",
            "Each connection sends its request body a byte every 2 s and reconnects when the service closes it "
            "(a body must average 1 KB/s after 5 s); another client asks `/predict` (a real photo) and `/health` "
            "every 0.5 s throughout.", "",
            "| /predict requests | answered 200 | p50 (ms) | p99 (ms) | max (ms) | /health 200 |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {r['requests']} | {r['ok']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['max_ms']:.0f} | "
            f"{r['health_ok']} of {r['requests']} |", ""]


def _recipes(r: dict) -> list[str]:
    target = r["target"]
    lines = [f"### 6. Recipes against a logistic-regression probe ({'quick subsets' if r['quick'] else 'whole sets'})",
             "", f"Machine: {_machine_line(r['machine'])}", "",
             f"Target: the `best` recipe at least {target['points']:.0f} points of top-1 above the probe on "
             f"imagewoof-mini, in at most {target['time_ratio']:.0f}x the probe's time.", ""]
    for dataset, d in r["datasets"].items():
        probe = d["probe"]
        lines += [f"**{dataset}** ({d['train_images']} train / {d['val_images']} val images)", "",
                  "| | val top-1 | vs probe (points) | wall time (s) | time vs probe |",
                  "| --- | ---: | ---: | ---: | ---: |",
                  f"| logistic-regression probe (scikit-learn, fp32 features at 224 px) | "
                  f"{100 * probe['top1']:.2f}% | | {probe['seconds']:.1f} | 1.0x |"]
        for name, m in d["recipes"].items():
            changed = m.get("changed_for_cpu") or {}
            note = f" ({m['epochs']} epochs on this CPU)" if changed else ""
            bold = "**" if name == "best" else ""
            lines.append(f"| {bold}`--recipe {name}`{bold}{note} | {bold}{100 * m['top1']:.2f}%{bold} | "
                         f"{m['top1_minus_probe_points']:+.2f} | {m['seconds']:.1f} | {m['time_vs_probe']:.1f}x |")
        if dataset == "imagewoof-mini":
            verdict = "met" if d["target_met"] else "not met"
            lines += ["", f"Target: **{verdict}** ({d['recipes']['best']['top1_minus_probe_points']:+.2f} points in "
                          f"{d['recipes']['best']['time_vs_probe']:.1f}x the probe's time).", ""]
        else:
            lines += [""]
    return lines


def _hard_set(r: dict) -> list[str]:
    probe, targets = r["probe"], r["targets"]
    lines = [f"### 7. The hard set: stanford-dogs-120-dev ({'quick: ' if r['quick'] else ''}{r['train_images']} "
             f"train / {r['val_images']} val photos, 120 breeds)", "", f"Machine: {_machine_line(r['machine'])}", "",
             f"Targets: the best Lite0-only recipe at least {targets['lite0_points']:.0f} points of val top-1 above "
             f"the probe; the best offline recipe at least {targets['best_points']:.0f} points above it in at most "
             f"{targets['best_time_ratio']:.0f}x its time. Recipes run bf16 autocast; the probe fp32.", "",
             "| | backbone | val top-1 | vs probe (points) | wall time (s) | time vs probe |",
             "| --- | --- | ---: | ---: | ---: | ---: |",
             f"| logistic-regression probe (scikit-learn, fp32 features at 224 px) | efficientnet_lite0 | "
             f"{100 * probe['top1']:.2f}% | | {probe['seconds']:.1f} | 1.0x |"]
    for m in r["runs"]:
        bold = "**" if m is r["best"] or m == r["best"] else ""
        lines.append(f"| {bold}`--recipe {m['recipe']}`{bold} | {m['model']} | {bold}{100 * m['top1']:.2f}%{bold} | "
                     f"{m['top1_minus_probe_points']:+.2f} | {m['seconds']:.1f} | {m['time_vs_probe']:.1f}x |")
    lite0, best = r["best_lite0"], r["best"]
    lines += ["", f"Lite0-only target: **{'met' if r['lite0_target_met'] else 'not met'}** (`{lite0['recipe']}`, "
                  f"{lite0['top1_minus_probe_points']:+.2f} points). Best offline target: "
                  f"**{'met' if r['best_target_met'] else 'not met'}** (`{best['recipe']}` on {best['model']}, "
                  f"{best['top1_minus_probe_points']:+.2f} points in {best['time_vs_probe']:.1f}x the probe's time).",
              ""]
    return lines


def _ensembles(r: dict) -> list[str]:
    lines = [f"### 8. Feature ensembles on the hard set ({'quick: ' if r['quick'] else ''}{r['train_images']} train / "
             f"{r['val_images']} val photos)", "", f"Machine: {_machine_line(r['machine'])}", "",
             "`--recipe best`'s features and head (1.3x input, whole image, bf16, L-BFGS logistic regression, "
             "flip TTA) on each bundled backbone, on their concatenation (what `--model a+b` would train), and as "
             "separate heads with averaged probabilities. An ensemble costs the sum of its backbones' `best` "
             "times (§7).", "", "| backbones | how | val top-1 |", "| --- | --- | ---: |"]
    for row in r["rows"]:
        lines.append(f"| {' + '.join(row['models'])} | {row['how']} | {100 * row['top1']:.2f}% |")
    single, ensemble = r["best_single"], r["best_ensemble"]
    verdict = ("an ensemble beats" if r["ensemble_wins"] else "no ensemble beats")
    lines += ["", f"Result: {verdict} the best single backbone ({single['models'][0]}, {100 * single['top1']:.2f}%"
              + (f"; best ensemble {100 * ensemble['top1']:.2f}%" if ensemble else "") + ").", ""]
    return lines


def _gpu(r: dict) -> list[str]:
    from .gpu import table

    return [f"### 9. One GPU kept busy ({'smoke: ' if r['smoke'] else ''}{r['train_rows']} train rows, "
            f"{r['val_images']} val photos)", "", f"Machine: {_machine_line(r['machine'])}", "", table(r), "",
            "Targets: " + ", ".join(f"{k} {'met' if v else 'not met'}" for k, v in r["targets"].items()) + ".", ""]


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def _pretrained_prior(r: dict) -> list[str]:
    lines = ["### 10. Keeping what the pretrained network knows (the old classifier as the head's start and prior)",
             "", f"Machine: {_machine_line(r['machine'])}", "",
             "val: the set's own validation photos (ImageNet-1k training photos: the classifier has seen them); "
             "clean: imagewoof-clean-val, 200 ImageNet validation photos no ImageNet-1k network trained on. "
             "fp32, `--recipe` runs as a user would start them.", ""]
    runs = r["runs"]
    groups = sorted({(x["set"], x["model"]) for x in runs}, key=lambda g: (g[1], g[0]))
    for name, model in groups:
        sizes = sorted({x["per_class"] or 0 for x in runs if (x["set"], x["model"]) == (name, model)},
                       key=lambda n: n or 10**9)  # 10 per class, then all
        head = " | ".join(f"{'all' if n == 0 else n}/class val" + (f" | {'all' if n == 0 else n}/class clean"
                                                                   if name == "imagewoof-mini" else "") for n in sizes)
        lines += [f"**{name}, {model}**", "", f"| head | {head} |",
                  "| --- |" + " ---: |" * (len(sizes) * (2 if name == "imagewoof-mini" else 1))]
        for method in ("pretrained classifier alone", "probe from zero", "best today (head from zero)",
                       "best, pretrained start, no teacher", "best, pretrained start"):
            cells = []
            for n in sizes:
                hit = next((x for x in runs if (x["set"], x["model"], x["method"], x["per_class"] or 0)
                            == (name, model, method, n)), None)
                cells.append(_pct(hit and hit["top1"]))
                if name == "imagewoof-mini":
                    cells.append(_pct(hit and hit["test_top1"]))
            label = {"best today (head from zero)": "`best` as it was (head from zero, label smoothing 0.1)",
                     "best, pretrained start, no teacher": "`best`, pretrained start, L2-SP (`--head-teacher 0`)",
                     "best, pretrained start": "**`best` now** (pretrained start, L2-SP, `--head-teacher 0.5`)",
                     "probe from zero": "`linear-probe`, head from zero"}.get(method, method)
            lines.append(f"| {label} | {' | '.join(cells)} |")
        lines.append("")
    if r.get("digits"):
        d = {x["head_init"]: x for x in r["digits"]}
        start = d["auto"]["head_start"]
        lines += [f"Digits (no class is an ImageNet class), `--recipe linear-probe`: `--head-init zero` "
                  f"{_pct(d['zero']['top1'])}, `auto` (the default) {_pct(d['auto']['top1'])}; the run found "
                  f"{start.get('classes_matched', 0)} of {start.get('classes', '?')} classes in "
                  f"{start.get('labels', 'the label set')} and started the head from {start['from']}.", ""]
    return lines


def _unmatched_rows(r: dict) -> list[str]:
    lines = [f"Rows of classes the classifier does not know (`benchmarks/studies/unmatched_rows.py`: "
             f"{', '.join(r['hidden_classes'])} renamed to match nothing; Lite0, 224 px, A = 30):", "",
             "| photos per class | start of the renamed rows | val | val, renamed breeds | clean | clean, renamed breeds |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for x in r["runs"]:
        lines.append(f"| {x['per_class'] or 'all'} | {x['start']} | {_pct(x['val_top1'])} | "
                     f"{_pct(x['val_renamed_top1'])} | {_pct(x['clean_top1'])} | {_pct(x['clean_renamed_top1'])} |")
    return lines + [""]


def _clean_splits(r: dict) -> list[str]:
    c = r["clean"]
    lines = [f"Photos no ImageNet-1k network trained on, alone (`benchmarks/studies/clean_splits.py`): "
             f"imagewoof-clean-val's {c['photos']} photos split {c['repeats']} times at random into K training "
             f"photos per breed and the rest to test; `best`'s view (Lite0, 288 px, whole image, flip TTA); each head "
             f"warmstart's L-BFGS probe. Mean top-1, and the difference from the L2-SP head paired split by split "
             f"(splits where it won / lost):", "",
             "| head | K = 5 | vs L2-SP (won/lost) | K = 10 | vs L2-SP (won/lost) |", "| --- | ---: | ---: | ---: | ---: |"]
    heads = list(dict.fromkeys(x["head"] for x in c["runs"]))
    for head in heads:
        cells = []
        for x in (x for x in c["runs"] if x["head"] == head):
            cells += [_pct(x["mean_top1"]), f"{100 * x['vs_reference']:+.2f} ({x['wins']}/{x['losses']})"]
        lines.append(f"| {head} | {' | '.join(cells)} |")
    if r.get("hard_set"):
        models = list(dict.fromkeys(x["model"] for x in r["hard_set"]))
        lines += ["", "The same heads on stanford-dogs-120-dev val (ImageNet-1k training photos; all 25 training "
                  "photos per breed; the mirrored training photos only for Lite0):", "",
                  "| head | " + " | ".join(models) + " |", "| --- |" + " ---: |" * len(models)]
        for head in heads:
            cells = [_pct(next((x["val_top1"] for x in r["hard_set"] if (x["model"], x["head"]) == (m, head)), None))
                     for m in models]
            lines.append(f"| {head} | {' | '.join(cells)} |")
    return lines + [""]


def _calibration(r: dict) -> list[str]:
    lines = [f"### 11. Calibration: the probabilities before and after the run's temperature ({r['train_images']} "
             f"train photos of imagewoof-mini)", "", f"Machine: {_machine_line(r['machine'])}", "",
             "| recipe | head start | T | val top-1 | val ECE before → after | val NLL before → after | clean top-1 | "
             "clean ECE before → after | clean NLL before → after |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for x in r["runs"]:
        start = {"auto": "pretrained classifier", "zero": "zero"}.get(x.get("head_init", "auto"))
        lines.append(f"| `{x['recipe']}` | {start} | {x['temperature']:.3f} | {_pct(x['val_top1'])} | {x['val_ece_before']:.3f} → "
                     f"**{x['val_ece_after']:.3f}** | {x['val_nll_before']:.3f} → {x['val_nll_after']:.3f} | "
                     f"{_pct(x['clean_top1'])} | {x['clean_ece_before']:.3f} → **{x['clean_ece_after']:.3f}** | "
                     f"{x['clean_nll_before']:.3f} → {x['clean_nll_after']:.3f} |")
    return lines + ["", "ECE: 15 equal-width confidence bins. Top-1 is the same before and after: a temperature "
                        "divides every logit of an image by one positive number, which keeps their order.", ""]


def _calibration_held_out(r: dict) -> list[str]:
    lines = ["### 11b. Calibration on photos no network saw, with few to calibrate on (issue 32's held-out check)", "",
             f"Machine: {_machine_line(r['machine'])}", "",
             "10 breeds, 10 training photos each from imagewoof-mini (val carved from them: 20 photos); test: "
             "imagewoof-clean-val, 200 photos from ImageNet's validation set. The temperature fitted on val's 20 "
             "logits, or cross-fitted: every train and val photo's logits from a head trained the same way without "
             "it (5 folds; `--calibration-fit`, auto for a head on cached features with under 200 val photos). "
             "Last rows: all of imagewoof-mini (400 val photos), where val alone suffices. "
             "Command: `python -m benchmarks.run --only calibration_held_out`.", "",
             "| train photos | recipe | T fitted on | seed | T | test top-1 | test ECE before → after |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for x in r["runs"]:
        fit = {"val": "val", "cross-fit": "train + val, cross-fitted", None: "—"}[x["fit"]]
        t = f"{x['temperature']:.3f}" + ("" if x["determined"] in (True, None) else " (undetermined)")
        lines.append(f"| {x['train_photos']} | `{x['recipe']}` | {fit} | {x['seed']} | {t} | {_pct(x['test_top1'])} | "
                     f"{x['test_ece_before']:.3f} → **{x['test_ece_after']:.3f}** |")
    return lines + ["", "Undetermined: every photo T would be fitted on is classified correctly, so the likelihood "
                        "grows without end as T → 0 (val alone then put T at its bound, e^-3, every probability 20× "
                        "sharper; test ECE up to 0.069 before this check); such a T is not used. The default settings "
                        "train the head on images (a fresh augmentation each epoch), so their T is val's. On all of "
                        "imagewoof-mini both ways agree (T 0.257 / 0.271); `best`'s clean ECE stays 0.056-0.058 "
                        "there: its val photos are ImageNet training photos, which the pretrained classifier (its "
                        "teacher) is surer of than of new ones.", ""]


def _int8(r: dict) -> list[str]:
    lines = [f"### 5b. int8 ONNX on a CPU ({'quick; ' if r['quick'] else ''}"
             f"{r['threads']} threads, service with {r['clients']} concurrent clients)", "",
             f"Machine: {_machine_line(r['machine'])}", "",
             "Each run is `--recipe best` (flip TTA, 1.3x input; no refit, so val stays unseen), exported with "
             "`--int8` (static QDQ, per-channel, reduced range; the stem, the first block and the classifier in "
             "float; 200 training photos to calibrate). Flip TTA is one pass over a batch of both views, so "
             "\"batch 1\" runs the network on 2 images. Top-1: PyTorch on the run's whole val split (from the "
             "run), fp32 and int8 ONNX on up to 1,000 of its photos (the export's own gate). Images/sec: the "
             f"median of {r.get('rounds', 1)} interleaved rounds of 2 s each.", ""]
    for run in r["runs"]:
        rates, service = run["images_per_sec"], run["service"]
        base = rates["fp32 ONNX"]
        lines += [f"**{run['model']} on {run['set']}** (input {run['input_size'][-1]} px, {run['gate_photos']} val "
                  f"photos; int8 and fp32 agree on {100 * run['agreement']:.1f}% of them)", "",
                  "| | img/s, batch 1 | img/s, batch 16 | vs fp32 ONNX (1 / 16) | service req/s | p50 (ms) | "
                  "p99 (ms) | val top-1 | file (MB) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        top1 = {"fp32 PyTorch": run["pytorch_top1"], "fp32 ONNX": run["fp32_onnx_top1"],
                "int8 ONNX": run["int8_onnx_top1"]}
        for label, rate in rates.items():
            s_ = service.get(label)
            served = (f"{s_['requests_per_sec']:.1f} | {s_['p50_ms']:.0f} | {s_['p99_ms']:.0f}" if s_ else "- | - | -")
            mb = run["mb"].get(label)
            lines.append(f"| {label} | {rate['batch 1']:.1f} | {rate['batch 16']:.1f} | "
                         f"{rate['batch 1'] / base['batch 1']:.2f}× / {rate['batch 16'] / base['batch 16']:.2f}× | "
                         f"{served} | {100 * top1[label]:.2f}% | {f'{mb:.1f}' if mb else '-'} |")
        drop = 100 * (run["fp32_onnx_top1"] - run["int8_onnx_top1"])
        lines += ["", f"int8 loses {drop:.2f} points of top-1 against fp32 ONNX: the default gate (`--max-int8-drop 1`) "
                  f"{'keeps it' if drop <= 1 else 'refuses it (the fp32 export is what serves)'}."]
        if service:
            ratio = service["int8 ONNX"]["requests_per_sec"] / service["fp32 ONNX"]["requests_per_sec"]
            lines += [f"Service: int8 answers {ratio:.2f}× the requests/sec of fp32 ONNX."]
        lines.append("")
    return lines


def _fold(r: dict) -> list[str]:
    lines = [f"### 4b. Folded BatchNorm for inference ({'quick; ' if r['quick'] else ''}batch {r['runs'][0]['batch']}, "
             f"{r['threads']} threads, fp32 channels_last)", "", f"Machine: {_machine_line(r['machine'])}", "",
             "Extraction, `eval`, `predict RUN` and the PyTorch service run a copy of the network with each BatchNorm "
             "folded into the convolution before it (`models/fold.py`); training keeps the network as it is. "
             f"Pooled features img/s, the median of {r['rounds']} interleaved rounds.", "",
             "| network | input | BatchNorms (left after folding) | as trained img/s | folded img/s | ratio | "
             "largest feature difference |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in r["runs"]:
        rates = run["images_per_sec"]
        lines.append(f"| {run['model']} | {run['input_size']} px | {run['batchnorms']} ({run['left']}) | "
                     f"{rates['as trained']:.1f} | {rates['folded']:.1f} | {run['ratio']:.2f}× | "
                     f"{run['max_feature_difference']:.1e} |")
    return lines + [""]


def _int8_pair(r: dict) -> list[str]:
    lines = [f"**The same exported pair on another CPU** ({r['source']}: input {r['input_size'][-1]} px, flip TTA; "
             f"onnxruntime {r['onnxruntime']}; CPU flags {', '.join(r['cpu_flags'])}; `python -m benchmarks.int8 "
             "--pair`, medians of 3 interleaved rounds)", "", f"Machine: {_machine_line(r['machine'])}", "",
             "| threads | fp32 ONNX img/s (1 / 16) | int8 ONNX img/s (1 / 16) | int8 vs fp32 (1 / 16) |",
             "| --- | ---: | ---: | ---: |"]
    for threads, rates in r["rates"].items():
        fp32, int8 = rates["fp32 ONNX"], rates["int8 ONNX"]
        lines.append(f"| {threads} | {fp32['batch 1']:.1f} / {fp32['batch 16']:.1f} | {int8['batch 1']:.1f} / "
                     f"{int8['batch 16']:.1f} | {int8['batch 1'] / fp32['batch 1']:.2f}× / "
                     f"{int8['batch 16'] / fp32['batch 16']:.2f}× |")
    return lines + [""]


def _audit(r: dict) -> list[str]:
    lines = [f"### 12. Label audit with planted problems ({'quick' if r['quick'] else 'whole sets'}; {r['model']})",
             "", f"Machine: {_machine_line(r['machine'])}", "",
             "5% of train's labels flipped at random (seeded), 10 val photos copied into train resized to 90% and "
             "re-encoded at JPEG quality 75. Precision = recall in the top N of `label_issues.csv`, N the number "
             "flipped; the unmodified set audited too.", "",
             "| set | train photos | flipped | found in top N (head from zero) | issues reported | copies found as leaks | "
             "duplicate pairs | time (s) | unmodified: issues / duplicate pairs / outliers |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in r["runs"]:
        c = run["clean"]
        lines.append(f"| {run['set']} | {run['train_photos']} | {run['flipped']} | {100 * run['precision_at_n']:.0f}% "
                     f"({100 * run['precision_at_n_head_from_zero']:.0f}%) | "
                     f"{run['issues_reported']} ({run['flips_anywhere_in_issues']} flips) | "
                     f"{run['copies_found_as_leaks']} of {run['copies']} | {run['duplicate_pairs']} | "
                     f"{run['seconds']:.0f} | {c['label_issues']} / {c['duplicates']} / {c['outliers']} |")
    return lines + [""]


def _before_after(r: dict) -> list[str]:
    names = {"feature_extractor_seconds": "feature-extractor recipe, end to end (s; lower is better)",
             "feature_extractor_top1": "its val top-1", "fine_tune_images_per_sec": "fine-tuning on images (img/s)",
             "eval_images_per_sec": "evaluation (img/s)"}
    lines = [f"### 13. Before and after a refactor (base {r['base']}, {r['repeats']} interleaved repeats, fp32)", "",
             f"Machine: {_machine_line(r['machine'])}", "",
             "The same workloads through the public API on the base commit's code and on this tree, alternated "
             "A B A B in one run (`python -m benchmarks.studies.before_after --base REV`); medians.", "",
             "| workload | before | after | after / before |", "| --- | ---: | ---: | ---: |"]
    for key, label in names.items():
        lines.append(f"| {label} | {r['medians']['before'][key]:.3f} | {r['medians']['after'][key]:.3f} | "
                     f"{r['ratios'][key]:.2f} |")
    return lines + [""]


def _engine(r: dict) -> list[str]:
    lines = [f"### 14. The inference engine: onnxruntime against PyTorch ({'quick; ' if r['quick'] else ''}"
             f"{r['threads']} threads, fp32)", "", f"Machine: {_machine_line(r['machine'])}; onnxruntime "
             f"{r['onnxruntime']}", "", f"Command: `{r['command']}`. PyTorch as warmstart ran every frozen forward "
             "before (folded BatchNorm, channels_last) against onnxruntime on the graph exported once per machine "
             "(`--engine auto` picks it on a CPU in fp32). Standalone: pooled features of a random batch, the median "
             "of interleaved rounds.", "",
             "| network | input | batch | PyTorch img/s | onnxruntime img/s | ratio | largest feature difference "
             "(relative) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in r["standalone"]:
        rates = s["images_per_sec"]
        lines.append(f"| {s['model']} | {s['input_size']} px | {s['batch']} | {rates['torch']:.1f} | "
                     f"{rates['onnxruntime']:.1f} | **{s['ratio']:.2f}×** | {s['max_feature_difference']:.1e} "
                     f"({s['relative_difference']:.1e}) |")
    lines += ["", "`warmstart train --recipe best` end to end (a subprocess each; medians of the alternated runs; "
              "the graph exported by an earlier run, as on every run after a model's first):", "",
              "| set, model | engine | wall (s) | user CPU (s) | system CPU (s) | extraction img/s | val top-1 |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for b in r["best"]:
        for name, m in b["medians"].items():
            lines.append(f"| {b['set']}, {b['model']} | {name} | {m['wall_seconds']:.1f} | {m['user_seconds']:.1f} | "
                         f"{m['system_seconds']:.1f} | {m['extraction_images_per_sec']:.1f} | {100 * m['top1']:.2f}% |")
        lines.append(f"| | **onnxruntime / torch** | **{b['end_to_end_ratio']:.2f}×** | | | "
                     f"**{b['extraction_ratio']:.2f}×** | {'identical' if b['same_top1'] else 'differs: '}"
                     f"{'' if b['same_top1'] else format(b['top1_difference_points'], '+.2f') + ' points'} |")
    u = r["uses"]
    exports = ", ".join(f"{s['model']} ({s['input_size']} px) {s['export_seconds']:.1f} s" for s in r["standalone"])
    lines += ["", f"The one-time export into a fresh graph cache (with its parity check): {exports}.", "",
              f"Using the Lite0 run on {u['photos']} photos (`eval RUN`, `predict RUN`, whole commands; val top-1 "
              f"torch {100 * u['top1']['torch']:.2f}%, onnxruntime {100 * u['top1']['onnxruntime']:.2f}%):", "",
              "| command | PyTorch (s) | onnxruntime (s) | ratio |", "| --- | ---: | ---: | ---: |"]
    for command in ("eval", "predict"):
        lines.append(f"| `{command} RUN` | {u['seconds'][f'{command} torch']:.1f} | "
                     f"{u['seconds'][f'{command} onnxruntime']:.1f} | **{u[f'{command}_ratio']:.2f}×** |")
    return lines + [""]


def _sources(r: dict) -> list[str]:
    lines = [f"### 15. Data at scale: a folder, WebDataset shards and a parquet dataset ({'quick; ' if r['quick'] else ''}"
             f"the same {r['photos']:,} train photos of imagewoof-mini)", "", f"Machine: {_machine_line(r['machine'])}",
             "", f"Command: `{r['command']}`. `warmstart data pack` wrote the shards (250 samples each) in "
             f"{r['pack_seconds']:.1f} s; the parquet files took {r['parquet_seconds']:.1f} s. Image path: one process "
             "decoding the training view in the order training reads (for shards the streamed order: shards in turn "
             "through the 5,000-sample buffer). Extraction and top-1: `train --augment none --seed 0` on each (a "
             "subprocess; Lite0, 224 px, 10 epochs on the cached features).", "",
             "| source | listing (s) | image path img/s | extraction img/s | val top-1 | wall (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | {row['list_seconds']:.2f} | {row['image_path_images_per_sec']:.1f} | "
                     f"{row['extraction_images_per_sec']:.1f} | {100 * row['top1']:.2f}% | {row['wall_seconds']:.1f} |")
    t = r["torchrun"]
    one, two = t["one_process"], t["two_processes"]
    lines += ["", f"torchrun on the shards (`--nproc 2` on the same 2 cores: each rank extracts half): one process "
              f"{100 * one['top1']:.2f}% in {one['wall_seconds']:.1f} s, two processes {100 * two['top1']:.2f}% in "
              f"{two['wall_seconds']:.1f} s ({'the same top-1' if t['same_top1'] else 'top-1 differs'}).", ""]
    return lines


SECTIONS = [  # (result, renderer, the command that produced it), in the order of their numbers
    ("feature_extractor", _feature_extractor, "python -m benchmarks.run --only feature_extractor"),
    ("fine_tune", _fine_tune, "python -m benchmarks.run --only fine_tune"),
    ("image_path", _image_path, "python -m benchmarks.run --only image_path"),
    ("feature_extractor", _extraction, "python -m benchmarks.run --only feature_extractor"),
    ("fold", _fold, "python -m benchmarks.studies.fold"),
    ("serve_load", _serve_load, "python -m benchmarks.run --only serve_load"),
    ("serve_slow_bodies", _serve_slow_bodies, "python -m benchmarks.run --only serve_slow_bodies"),
    ("int8", _int8, "python -m benchmarks.run --only int8"),
    ("int8_pair", _int8_pair, "python -m benchmarks.int8 --pair"),
    ("recipes", _recipes, "python -m benchmarks.run --only recipes"),
    ("hard_set", _hard_set, "python -m benchmarks.run --only hard_set"),
    ("ensembles", _ensembles, "python -m benchmarks.studies.ensembles"),
    ("gpu", _gpu, "sh benchmarks/gpu.sh run"),
    ("pretrained_prior", _pretrained_prior, "python -m benchmarks.run --only pretrained_prior"),
    ("unmatched_rows", _unmatched_rows, "python -m benchmarks.studies.unmatched_rows"),
    ("clean_splits", _clean_splits, "python -m benchmarks.studies.clean_splits"),
    ("calibration", _calibration, "python -m benchmarks.run --only calibration"),
    ("calibration_held_out", _calibration_held_out, "python -m benchmarks.run --only calibration_held_out"),
    ("audit", _audit, "python -m benchmarks.run --only audit"),
    ("before_after", _before_after, "python -m benchmarks.studies.before_after --base REV"),
    ("engine", _engine, "python -m benchmarks.run --only engine"),
    ("sources", _sources, "python -m benchmarks.run --only sources"),
]


def with_command(lines: list[str], command: str, quick: bool) -> list[str]:
    """A section with the command that produced it, after its machine line (or at its end)."""
    said = f"Command: `{command}{' --quick' if quick and '--only' in command else ''}`."
    if any(command in line for line in lines):
        return lines
    at = next((i + 1 for i, line in enumerate(lines) if line.startswith("Machine:")), None)
    if at is None:
        return lines[:-1] + [said, ""] if lines and lines[-1] == "" else lines + ["", said, ""]
    return lines[:at] + ["", said] + lines[at:]


def write_markdown() -> None:
    lines = ["# Benchmarks", "",
             "Measured by `python -m benchmarks.run` (add `--quick` for the few-minute version) and, for the one-off "
             "studies that decided a default, `python -m benchmarks.studies.NAME`; each comparison runs warmstart "
             "and its baseline in the same process, on the same images and machine; each section names its "
             "command. Raw results: `benchmarks/results/`.", ""]
    notes = ROOT / "benchmarks" / "NOTES.md"
    for name, render, command in SECTIONS:
        for variant in (name, f"{name}_quick") if name != "gpu" else ("gpu",):  # a smoke run is no result
            path = RESULTS / f"{variant}.json"
            if path.is_file():
                lines += with_command(render(json.loads(path.read_text())), command, variant.endswith("_quick"))
    if notes.is_file():
        lines += [notes.read_text()]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=sorted(SUITES))
    args = parser.parse_args()
    for name in args.only or SUITES:
        print(f"== {name}", flush=True)
        print(json.dumps(SUITES[name](args.quick), indent=2, default=str), flush=True)
    write_markdown()


if __name__ == "__main__":
    main()
