"""`warmstart export RUN --format onnx|torchscript|safetensors`: a trained run as one file that
carries what is needed to use it alone, checked against PyTorch right after export."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .quantize import CALIBRATION_PHOTOS, MAX_DROP, Int8Result, quantize_onnx
from .run_dir import RunDir, load_run

FORMATS = ("onnx", "torchscript", "safetensors")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}
PARITY_TOLERANCE = 1e-3  # max abs logit difference accepted


@dataclass
class ExportResult:
    path: Path
    format: str
    parity_inputs: int = 0
    max_abs_logit_difference: float = 0.0
    same_top1: bool = True
    exporter: str = ""
    notes: list[str] = field(default_factory=list)
    int8: Int8Result | None = None


def _parity_inputs(run, count: int = 8) -> torch.Tensor:
    """Sample inputs: random images in the model's normalised range (seeded)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(count, *run.data_config["input_size"], generator=generator)


def _export_onnx(model, example: torch.Tensor, path: Path) -> str:
    """The dynamo-based exporter (with a dynamic batch dimension); the TorchScript-based one if it fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                              opset_version=18, dynamo=True, verbose=False)
        return "torch.onnx (dynamo)"
    except Exception:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                              dynamo=False)
        return "torch.onnx (torchscript)"


EXPORTS = {f"model{suffix}" for suffix in SUFFIX.values() if suffix != ".safetensors"} | {"model.int8.onnx"}


def _refuse_run_files(out: Path, run_dir: Path) -> None:
    """--out may not be a file the run itself consists of (its weights, model.json, config, metrics,
    ...): writing there would destroy the run being exported. Earlier exports may be replaced."""
    try:
        inside = out.resolve().parent == run_dir.resolve()
    except OSError:
        return
    if inside and out.exists() and out.name not in EXPORTS:
        raise UserError(f"--out {out} is one of the run's own files: exporting over it would destroy the run; pass a "
                        f"path outside {run_dir} (nothing was written)")


def int8_path(fp32: Path) -> Path:
    """Where the int8 model of an fp32 ONNX file goes: beside it, `NAME.int8.onnx`."""
    return fp32.with_name(fp32.name.removesuffix(".onnx") + ".int8.onnx")


def _check_request(fmt: str, out, force: bool, int8: bool, max_int8_drop: float = MAX_DROP, run_dir=None) -> None:
    """Mistakes refused before anything is written: a format, --int8 without ONNX, a gate that
    means nothing, an existing file, one of the run's own files, a folder that cannot be made."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not valid: use one of {', '.join(FORMATS)}")
    if not (isinstance(max_int8_drop, (int, float)) and 0 <= max_int8_drop <= 100):
        raise UserError(f"--max-int8-drop {max_int8_drop} is not valid: it must be a number of points from 0 to 100")
    if out is not None and run_dir is not None:
        _refuse_run_files(Path(out), Path(run_dir))
    for parent in (Path(out).parents if out is not None else []):
        if parent.exists() and not parent.is_dir():
            raise UserError(f"--out {out}: {parent} is a file, not a folder: pass a path in a folder (nothing was "
                            f"written)")
    if int8 and fmt != "onnx":
        raise UserError(f"--int8 is an ONNX export: use it with --format onnx, not {fmt}")
    if int8 and out is not None and int8_path(Path(out)).exists() and not force:
        raise UserError(f"{int8_path(Path(out))} is an existing file: pass --force to overwrite it (nothing was "
                        f"written)")
    if out is not None and (Path(out).is_dir() or Path(out).exists() and not force):
        what = "a folder" if Path(out).is_dir() else "an existing file"
        raise UserError(f"--out {out} is {what}: pass a new file path" + ("" if Path(out).is_dir() else
                        ", or --force to overwrite it") + " (nothing was written)")


def _onnx_file(model, inputs: torch.Tensor, path: Path, meta: dict) -> tuple[str, np.ndarray]:
    """(exporter, its outputs on `inputs`): one self-contained ONNX file carrying the run's metadata."""
    import onnx
    import onnxruntime as ort

    external = path.with_name(path.name + ".data")  # where the exporter may put the weights
    external.unlink(missing_ok=True)
    exporter = _export_onnx(model, inputs[:2], path)
    proto = onnx.load(str(path))  # the weights too, wherever the exporter put them
    del proto.metadata_props[:]
    for key, value in {**meta, "precision": "fp32"}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, str(path))  # one self-contained file (models under 2 GB)
    external.unlink(missing_ok=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return exporter, session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]


def export_run(run_dir: str | Path, fmt: str = "onnx", out: str | Path | None = None, force: bool = False,
               int8: bool = False, calibration: int = CALIBRATION_PHOTOS, max_int8_drop: float = MAX_DROP
               ) -> ExportResult:
    """The run's model as `fmt` at `out` (default: in the run directory, replacing an earlier
    export); an existing `out` file is overwritten only with `force`. With `int8` (ONNX), also an
    int8 model beside it (quantize.py: calibrated on `calibration` training photos, refused if it
    loses more than `max_int8_drop` points of top-1 on the validation photos)."""
    _check_request(fmt, out, force, int8, max_int8_drop, run_dir)
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    if fmt == "safetensors" and out is None:  # the run's weights file is that export already
        return ExportResult(RunDir(run_dir).model, fmt, exporter="safetensors (the run's own weights + metadata)")
    model = run.model.eval()
    meta = run.export_metadata()
    path = Path(out) if out else run_dir / f"model{SUFFIX[fmt]}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the folder of --out {path} ({exc.strerror}): pass a path in a folder you can "
                        f"write to (nothing was written)") from None
    inputs = _parity_inputs(run)
    with torch.inference_mode():
        reference = model(inputs).numpy()

    if fmt == "safetensors":
        shutil.copyfile(RunDir(run_dir).model, path)  # weights with the metadata embedded
        return ExportResult(path, fmt, exporter="safetensors (weights + metadata)")

    if fmt == "torchscript":
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream; still asked for
            traced = torch.jit.trace(model, inputs[:1], check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={"warmstart.json": json.dumps(meta)})
            exported = torch.jit.load(str(path), map_location="cpu")(inputs).numpy()
        exporter = "torch.jit.trace"
    else:
        exporter, exported = _onnx_file(model, inputs, path, meta)

    difference = float(np.abs(exported - reference).max())
    same_top1 = bool((exported.argmax(1) == reference.argmax(1)).all())
    result = ExportResult(path, fmt, len(inputs), difference, same_top1, exporter)
    if not same_top1 or not difference <= PARITY_TOLERANCE:  # NaN never compares as larger
        raise UserError(f"exported {fmt} model disagrees with PyTorch (max abs logit difference {difference:.2e}, "
                        f"same top-1: {same_top1}): it was kept at {path} for inspection; do not deploy it")
    if int8:
        result.int8 = quantize_onnx(run_dir, path, int8_path(path), calibration, max_int8_drop)
    return result
