"""TensorBoard logs and history.csv, the HTML report (checked in a real headless browser), runs and compare."""

import csv
import json

import pytest

from warmstart import RunConfig, train
from warmstart.cli import main
from warmstart.report import build_report, compare_runs, list_runs

from conftest import launch_chromium, require_browser


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import COLORS, make_color_images

    root = tmp_path_factory.mktemp("report-data")
    names = ["n00000001-red_thing", "n00000002-green_thing", "n00000003-blue_thing", "n00000004-yellow_thing"]
    for c, name in enumerate(names):
        make_color_images(root / "train" / name, COLORS[c], 10, seed=c)
        make_color_images(root / "val" / name, COLORS[c], 5, seed=50 + c)
    # a few deliberate label mistakes in val so the report has confusions and a gallery
    for i in range(2):
        src = root / "val" / names[0] / f"img_00{i}.jpg"
        src.rename(root / "val" / names[3] / f"mislabelled_{i}.jpg")
    runs = tmp_path_factory.mktemp("runs")
    result = train(RunConfig(data=str(root), augment="none", epochs=4, lr=0.05, input_size=64, workers=0,
                             quiet=True, out=str(runs / "a")))
    return root, runs, result


def test_tensorboard_events_and_history_csv(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, result = trained
    events = EventAccumulator(str(result.run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/top1", "train/lr", "train/images_per_sec", "val/top1", "step/loss"} <= set(
        tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert events.Scalars("train/loss")[-1].value == pytest.approx(result.history[-1]["train_loss"], rel=1e-5)
    assert "val/predictions" in tags["images"] and [e.step for e in events.Images("val/predictions")] == [4]
    rows = list(csv.DictReader((result.run_dir / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["val_top1"]) == pytest.approx(result.history[-1]["val_top1"])


def test_report_sections_match_the_run(trained):
    _, _, result = trained
    path = build_report(result.run_dir, gallery=10, workers=0)
    page = path.read_text()
    summary = json.loads((result.run_dir / "report" / "report.json").read_text())
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert summary["top1"] == pytest.approx(metrics["top1"]) and summary["images"] == metrics["val_images"] == 20
    for section in ("summary", "curves", "per-class", "confusion", "misclassified", "calibration"):
        assert f"id='{section}'" in page
    assert f"{metrics['top1']:.4f}" in page
    assert summary["misclassified"] == 2 and page.count('class="card"') == 2
    pair = summary["most_confused"][0]
    assert (pair["true"], pair["predicted"], pair["count"]) == ("yellow thing", "red thing", 2)
    assert 0 <= summary["ece"] <= 1
    for png in ("curves.png", "per_class_accuracy.png", "confusion_matrix.png", "reliability.png"):
        assert (result.run_dir / "report" / png).stat().st_size > 1000
    assert "src='data:image/png;base64," in page  # self-contained
    text = _visible_text(page)
    for repr_mark in ("{'", "None", "[", "True", "False"):  # every value as a person reads it
        assert repr_mark not in text, (repr_mark, text[text.find(repr_mark) - 80:text.find(repr_mark) + 80])
    assert "calibration · temperature" in text and "recipe" in text and "strategy feature-extractor" in text
    assert summary["curves"].startswith("loss and top-1 per epoch")


def _visible_text(page: str) -> str:
    import re

    body = re.sub(r"<style>.*?</style>", "", page, flags=re.S)
    return re.sub(r"<[^>]+>", " ", re.sub(r"src='[^']*'", "", body))


def test_an_lbfgs_head_shows_its_convergence_not_flat_epochs(trained, tmp_path):
    """Issue 33: a logistic-probe run plotted 10 "epochs" of a loss flat to the 4th decimal and a
    constant learning rate of 1.0; its figure is the objective per L-BFGS evaluation."""
    root, _, _ = trained
    probe = train(RunConfig(data=str(root), recipe="linear-probe", input_size=64, workers=0, quiet=True,
                            refit=False, out=str(tmp_path / "probe")))
    objective = [v for h in probe.history for v in h["objective"]]
    assert len(objective) > len(probe.history) and objective[0] > objective[-1]  # several evaluations a step
    build_report(probe.run_dir, workers=0)
    summary = json.loads((probe.run_dir / "report" / "report.json").read_text())
    assert summary["curves"] == "L-BFGS convergence per evaluation"
    assert "Training: L-BFGS convergence per evaluation" in (probe.run_dir / "report.html").read_text()


def test_report_in_a_real_browser(trained, tmp_path):
    sync_api = require_browser()
    _, _, result = trained
    path = build_report(result.run_dir, workers=0)
    errors = []
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(path.as_uri())
        sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
        top1 = page.inner_text("#top1")
        text = page.inner_text("body")  # what a person sees (the settings' <details> closed)
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert not errors
    assert len(sizes) >= 6 and all(done and width > 0 for done, width in sizes)
    assert float(top1) == pytest.approx(result.metrics["top1"], abs=1e-4)
    assert "{'" not in text and "None" not in text and "probabilities" in text and "recipe" in text


def test_runs_and_compare(trained, capsys):
    root, runs, first = trained
    second = train(RunConfig(data=str(root), augment="none", epochs=2, lr=0.01, input_size=64, workers=0,
                             quiet=True, out=str(runs / "b")))
    listed = list_runs(runs)
    assert {r["run"] for r in listed} == {str(first.run_dir), str(second.run_dir)}
    comparison = compare_runs([first.run_dir, second.run_dir])
    assert comparison["config_differences"]["epochs"] == [4, 2]
    assert comparison["config_differences"]["lr"] == [0.05, 0.01]
    assert "model" not in comparison["config_differences"]
    assert comparison["metrics"]["top1"] == [first.metrics["top1"], second.metrics["top1"]]
    assert main(["runs", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "a " in out and "efficientnet_lite0" in out and f"{first.metrics['top1']:.4f}" in out
    assert main(["compare", str(first.run_dir), str(second.run_dir)]) == 0
    assert "config differences:" in capsys.readouterr().out
    assert main(["compare", str(first.run_dir)]) == 2
