"""The inference engine (compute/engine.py): onnxruntime computes the frozen network's features as
PyTorch does, on real photos; its graphs are exported once and reused, rebuilt when torn, foreign
or of other weights, exported once when two runs ask at once; a network it cannot take falls back
to PyTorch under auto and is one line under an explicit --engine; eval, predict, report and the
audit use the run's engine."""

import json
import subprocess
import threading

import pytest
import torch
from torch import nn

from warmstart.compute import engine
from warmstart.compute.runtime import Runtime
from warmstart.data.sources import resolve_splits
from warmstart.data.transforms import data_config_for, eval_transform
from warmstart.errors import UserError
from warmstart.models.create import create_model
from warmstart.train.cached import frozen_features

from conftest import FAST, require_shared

CPU = torch.device("cpu")


def _runtime(choice: str) -> Runtime:
    name, reason = engine.choose_engine(choice, CPU, "fp32")
    return Runtime(CPU, "fp32", True, "cpu", name, choice, reason)


def _photos(model, count: int = 12) -> torch.Tensor:
    """Real photos of imagewoof-mini's val split in the model's evaluation view."""
    from warmstart.data.images import open_image

    root = require_shared("imagewoof-mini")
    images = resolve_splits(str(root), 0.2, 0)["val"]
    transform = eval_transform(data_config_for(model, None))

    step = len(images) // count
    return torch.stack([transform(open_image(images.items[i * step])) for i in range(count)])


@pytest.mark.parametrize("name", [pytest.param("efficientnet_lite0", marks=pytest.mark.slow),  # real photos: end to end
                                  pytest.param("efficientnet_lite1", marks=pytest.mark.slow),
                                  pytest.param("efficientnet_lite2", marks=pytest.mark.slow)])
def test_onnxruntime_features_match_pytorch_on_real_photos(name):
    model, _, arch = create_model(name, 1000, "bundled")  # the whole ImageNet classifier kept
    model.eval()
    size = model.pretrained_cfg["input_size"][-1]
    photos = _photos(model)
    torch_forward, torch_key = frozen_features(model, arch, _runtime("torch"), (3, size, size))
    onnx_forward, onnx_key = frozen_features(model, arch, _runtime("onnxruntime"), (3, size, size))
    assert (torch_forward.engine, onnx_forward.engine) == ("torch", "onnxruntime")
    assert torch_key != onnx_key  # the feature cache never mixes rows of two engines
    with torch.inference_mode():
        expected, got = torch_forward(photos), onnx_forward(photos)
    assert got.shape == expected.shape == (len(photos), model.num_features)
    assert float((expected - got).abs().max()) <= 1e-4 * float(expected.abs().max())
    # the pretrained classifier's answers on them: the same top-1 for every photo
    with torch.inference_mode():
        by_torch = _runtime("torch").classify(model, (3, size, size))(photos)
        by_onnx = _runtime("onnxruntime").classify(model, (3, size, size))(photos)
    assert torch.equal(by_torch.argmax(1), by_onnx.argmax(1))
    assert float((by_torch - by_onnx).abs().max()) <= 1e-4 * float(by_torch.abs().max())


class _Small(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)).relu().mean((2, 3))


class _DoesNotExport(_Small):
    """An op ONNX has no translation for (Hurwitz zeta)."""

    def forward(self, x):
        return torch.special.zeta(super().forward(x).abs() + 2, torch.tensor(1.0))


def _said():
    lines = []
    return lines, lines.append


def test_a_graph_is_exported_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv(engine.CACHE_ENV, str(tmp_path))
    lines, say = _said()
    first = _runtime("onnxruntime").frozen(_Small(), "small", "w1", (3, 16, 16), say)
    assert first.engine == "onnxruntime" and sum("exported small" in line for line in lines) == 1
    graph = next(tmp_path.glob("*.onnx"))
    written = graph.stat().st_mtime_ns
    again = _runtime("onnxruntime").frozen(_Small(), "small", "w1", (3, 16, 16), say)
    assert len(lines) == 1 and graph.stat().st_mtime_ns == written  # no second export
    x = torch.rand(5, 3, 16, 16)
    with torch.inference_mode():
        assert torch.allclose(again(x), _Small().eval()(x), atol=1e-5)
    record = json.loads(graph.with_suffix(".json").read_text())
    assert record["identity"]["name"] == "small" and record["identity"]["input"] == [3, 16, 16]


@pytest.mark.parametrize("damage", ["torn", "foreign"])
def test_a_torn_or_foreign_graph_is_rebuilt_with_one_warning(tmp_path, monkeypatch, damage):
    monkeypatch.setenv(engine.CACHE_ENV, str(tmp_path))
    lines, say = _said()
    _runtime("onnxruntime").frozen(_Small(), "small", "w1", (3, 16, 16), say)
    graph = next(tmp_path.glob("*.onnx"))
    if damage == "torn":
        graph.write_bytes(graph.read_bytes()[:len(graph.read_bytes()) // 2])
    else:  # another valid graph put in its place (of other weights)
        _runtime("onnxruntime").frozen(_Small(seed=1), "small", "w2", (3, 16, 16), say)
        other = next(p for p in tmp_path.glob("*.onnx") if p != graph)
        graph.write_bytes(other.read_bytes())
    lines.clear()
    rebuilt = _runtime("onnxruntime").frozen(_Small(), "small", "w1", (3, 16, 16), say)
    assert sum(line.startswith("warning: engine cache") for line in lines) == 1
    assert sum("exported small" in line for line in lines) == 1
    x = torch.rand(3, 3, 16, 16)
    with torch.inference_mode():
        assert torch.allclose(rebuilt(x), _Small().eval()(x), atol=1e-5)  # the right graph, not the foreign one


def test_changed_weights_are_exported_again(tmp_path, monkeypatch):
    """The key holds the frozen weights' fingerprint: a changed weights file is another graph."""
    import timm

    monkeypatch.setenv(engine.CACHE_ENV, str(tmp_path))
    model, arch = timm.create_model("test_efficientnet", num_classes=3).eval(), "test_efficientnet"  # timm's tiny one
    lines, say = _said()
    frozen_features(model, arch, _runtime("onnxruntime"), (3, 64, 64), say)
    frozen_features(model, arch, _runtime("onnxruntime"), (3, 64, 64), say)
    with torch.no_grad():
        model.conv_head.weight[0, 0] += 0.5
    changed, _ = frozen_features(model, arch, _runtime("onnxruntime"), (3, 64, 64), say)
    assert sum("exported" in line for line in lines) == 2 and len(list(tmp_path.glob("*.onnx"))) == 2
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
        assert torch.allclose(changed(x), expected, atol=1e-4)


def test_two_runs_exporting_the_same_graph_export_it_once(tmp_path, monkeypatch):
    monkeypatch.setenv(engine.CACHE_ENV, str(tmp_path))
    lines, results = [], []

    def one():
        results.append(_runtime("onnxruntime").frozen(_Small(), "small", "w1", (3, 16, 16), lines.append))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and sum("exported" in line for line in lines) == 1
    assert [p.name.endswith(".tmp") for p in tmp_path.iterdir()].count(True) == 0


def test_the_cache_is_bounded_least_recently_used_first(tmp_path, monkeypatch):
    monkeypatch.setenv(engine.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(engine.LIMIT_ENV, "0.000001")  # room for the newest graph alone
    for seed in range(3):
        _runtime("onnxruntime").frozen(_Small(seed), "small", f"w{seed}", (3, 16, 16), lambda line: None)
    kept = [json.loads(p.read_text())["identity"]["weights"] for p in tmp_path.glob("*.json")]
    assert kept == ["w2"]


def test_a_network_that_does_not_export_falls_back_under_auto_and_is_an_error_when_asked_for(tmp_path, monkeypatch):
    monkeypatch.setenv(engine.CACHE_ENV, str(tmp_path))
    lines, say = _said()
    forward = _runtime("auto").frozen(_DoesNotExport(), "odd network", "w", (3, 16, 16), say)
    assert forward.engine == "torch"
    assert len(lines) == 1 and lines[0].startswith("engine: PyTorch computes odd network: onnxruntime cannot take it")
    x = torch.rand(2, 3, 16, 16)
    with torch.inference_mode():
        assert torch.allclose(forward(x), _DoesNotExport().eval()(x), atol=1e-5)
    with pytest.raises(UserError, match="--engine onnxruntime cannot compute odd network: .*use --engine torch"):
        _runtime("onnxruntime").frozen(_DoesNotExport(), "odd network", "w", (3, 16, 16), say)


def test_engines_that_cannot_run_here_are_one_line():
    with pytest.raises(UserError, match="computes in fp32, not --precision bf16"):
        engine.choose_engine("onnxruntime", CPU, "bf16")
    with pytest.raises(UserError, match="computes on the CPU and this run computes on cuda"):
        engine.choose_engine("onnxruntime", torch.device("cuda"), "fp32")
    assert engine.choose_engine("auto", torch.device("cuda"), "fp32")[0] == "torch"
    assert engine.choose_engine("auto", CPU, "bf16")[0] == "torch"
    assert engine.choose_engine("auto", CPU, "fp32")[0] == "onnxruntime"


def _cli(*args) -> subprocess.CompletedProcess:
    """The command in this process (as the user's shell would run it, without paying torch's import
    six times): its exit code and what it printed."""
    import contextlib
    import io

    from warmstart.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.mark.slow  # an end-to-end run: outside the inner loop
def test_the_run_records_its_engine_and_eval_predict_report_audit_use_it(color_tree, tmp_path):
    run = tmp_path / "run"
    # asked for by name: under auto these 36 + 12 images would not repay the graph's export
    trained = _cli("train", "--data", color_tree, "--epochs", "2", "--augment", "none", "--engine", "onnxruntime",
                   "--out", run, *FAST)
    assert trained.returncode == 0, trained.stderr
    assert "engine: onnxruntime computes the frozen network (asked for" in trained.stdout + trained.stderr
    assert "engine: onnxruntime" in (run / "config.yaml").read_text()
    filled = [json.loads(p.read_text())["computed_by"] for p in (run / "cache").glob("*/meta.json")]
    assert filled and all("|onnxruntime|" in f for f in filled)  # the feature cache says which engine filled it

    evaluated = {}
    for choice in ("onnxruntime", "torch"):
        out = _cli("eval", run, "--json", *(["--engine", "torch"] if choice == "torch" else []))
        assert out.returncode == 0, out.stderr
        evaluated[choice] = json.loads(out.stdout)
        assert evaluated[choice]["engine"] == choice
    assert evaluated["torch"]["top1"] == evaluated["onnxruntime"]["top1"]
    assert abs(evaluated["torch"]["nll"] - evaluated["onnxruntime"]["nll"]) < 1e-4

    photo = next((color_tree / "val").rglob("*.jpg"))
    answers = [json.loads(_cli("predict", run, photo, "--json", *extra).stdout)[0]["top"]
               for extra in ([], ["--engine", "torch"])]
    assert [a["class"] for a in answers[0]] == [a["class"] for a in answers[1]]
    assert max(abs(a["probability"] - b["probability"]) for a, b in zip(*answers)) < 1e-4

    from warmstart.report import build_report

    page = build_report(run, workers=0).read_text()
    assert "onnxruntime" in page
    audited = _cli("data", "audit", color_tree, "--out", tmp_path / "audit", "--engine", "torch", *FAST)
    assert audited.returncode == 0, audited.stderr
    assert "engine: PyTorch computes the frozen network (asked for (--engine torch))" in audited.stdout + audited.stderr


def test_an_engine_that_cannot_run_is_exit_2_before_anything_is_written(color_tree, tmp_path):
    out = _cli("train", "--data", color_tree, "--engine", "onnxruntime", "--precision", "bf16", "--out",
               tmp_path / "run", *FAST)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "--engine onnxruntime computes in fp32" in out.stderr
    assert not (tmp_path / "run").exists()


def test_a_graph_cache_that_cannot_be_written_falls_back_under_auto(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv(engine.CACHE_ENV, str(blocker / "engines"))  # under a file: no folder can be made
    lines, say = _said()
    forward = _runtime("auto").frozen(_Small(), "small", "w", (3, 16, 16), say)
    assert forward.engine == "torch" and len(lines) == 1 and "cannot be written to" in lines[0]
    assert f"set {engine.CACHE_ENV}" in lines[0]
    with pytest.raises(UserError, match="cannot be written to"):
        _runtime("onnxruntime").frozen(_Small(), "small", "w", (3, 16, 16), say)


def test_a_graph_is_exported_only_where_the_images_repay_it(tmp_path, monkeypatch):
    """Under auto, a backbone whose graph is not exported yet (a fine-tuned one is a new graph) stays
    in PyTorch for a pass over fewer than EXPORT_PAYS_BACK images, with one line; a cached graph, a
    service (no count) and --engine onnxruntime use onnxruntime whatever the count."""
    import timm

    monkeypatch.setenv(engine.CACHE_ENV, str(tmp_path))
    network = timm.create_model("test_efficientnet", num_classes=3).eval()
    lines, say = _said()
    auto = _runtime("auto")
    few = auto.classify(network, (3, 32, 32), say=say, images=12)
    assert few.engine == "torch" and "for these 12 images" in lines[-1] and not list(tmp_path.glob("*.onnx"))
    forward, key = frozen_features(network, "test_efficientnet", auto, (3, 32, 32), say, images=48)  # extraction
    assert forward.engine == "torch" and "|torch|" in key and not list(tmp_path.glob("*.onnx"))
    assert auto.classify(network, (3, 32, 32), say=say, images=None).engine == "onnxruntime"  # a service: exported
    assert auto.classify(network, (3, 32, 32), say=say, images=12).engine == "onnxruntime"  # cached now
    with torch.no_grad():
        network.conv_head.weight.mul_(1.1)  # trained further: another graph
    assert auto.classify(network, (3, 32, 32), say=say, images=engine.EXPORT_PAYS_BACK).engine == "onnxruntime"
    with torch.no_grad():
        network.conv_head.weight.mul_(1.1)
    assert _runtime("onnxruntime").classify(network, (3, 32, 32), say=say, images=12).engine == "onnxruntime"
    assert len(list(tmp_path.glob("*.onnx"))) == 3
