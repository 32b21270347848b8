"""int8 ONNX for CPUs: onnxruntime's static quantisation of an exported model, calibrated on the
run's own training photos and gated on its validation photos.

EfficientNet-Lite (no squeeze-excite, ReLU6) was designed for 8-bit inference; done carelessly,
quantisation still costs accuracy a user would not accept, so the int8 model is measured against
the fp32 one right after it is written and refused (one line, the fp32 file kept) when it loses
more than `max_drop` points of top-1."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .evaluate import run_split
from .data.images import open_image
from .predict import preprocess

CALIBRATION_PHOTOS = 200
MAX_DROP = 1.0  # points of top-1
GATE_PHOTOS = 1000  # at most, of the validation photos
REDUCE_RANGE = True


@dataclass
class Int8Result:
    path: Path
    calibration_photos: int
    gate_photos: int
    fp32_top1: float
    int8_top1: float
    agreement: float  # share of photos where both give the same top-1
    seconds: float
    excluded: list[str]

    def line(self) -> str:
        return (f"int8 model {self.path}: top-1 {self.int8_top1:.2%} against fp32 {self.fp32_top1:.2%} on "
                f"{self.gate_photos} validation photos (same top-1 on {self.agreement:.1%}); calibrated on "
                f"{self.calibration_photos} training photos in {self.seconds:.0f}s")


def evenly(count: int, take: int) -> list[int]:
    """`take` indices spread over range(count) (an image set is ordered by class: every class shows)."""
    take = min(count, take)
    return sorted({int(i) for i in np.linspace(0, count - 1, take)}) if take else []


def photo_batches(images, indices: list[int], meta: dict, batch: int = 32):
    """(arrays in the evaluation view, labels) a batch at a time; unreadable photos left out."""
    arrays, labels = [], []
    for i in indices:
        try:
            arrays.append(preprocess(open_image(images.items[i]), meta))
            labels.append(images.labels[i])
        except Exception:  # unreadable: training skipped it too
            continue
        if len(arrays) == batch:
            yield np.stack(arrays), np.asarray(labels)
            arrays, labels = [], []
    if arrays:
        yield np.stack(arrays), np.asarray(labels)


def held_photos(run_dir: Path, calibration: int):
    """(calibration images and indices, gate images and indices): training photos calibrate;
    validation photos judge, or every fifth training photo, held back, where there is no val."""
    _, train = run_split(run_dir, None, "train")
    try:
        _, val = run_split(run_dir, None, "val")
    except UserError:
        val = None
    if val is not None and len(val):
        return (train, evenly(len(train), calibration)), (val, evenly(len(val), GATE_PHOTOS))
    held = set(range(0, len(train), 5))
    rest = [i for i in range(len(train)) if i not in held]
    return (train, [rest[i] for i in evenly(len(rest), calibration)]), (train, sorted(held)[:GATE_PHOTOS])


def kept_in_float(model) -> list[str]:
    """The layers where 8 bits cost the most for the least work: the first convolution (raw pixels
    in), the convolutions after it at its resolution that do not widen it (the first block of a
    MobileNet/EfficientNet, 5% of its multiply-adds; none in a ResNet), and the classifier. Measured
    on stanford-dogs-120-dev with Lite0: the first block in float turns a 1.1-point loss of top-1 into
    0.6 (BENCHMARKS.md §5b, benchmarks/NOTES.md); the next blocks are a quarter of the work."""
    nodes = list(model.graph.node)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(model.graph.value_info) + list(model.graph.input)}
    convs = [n for n in nodes if n.op_type == "Conv"]
    kept = convs[:1]
    stem = dims.get(convs[0].output[0]) if convs else None
    if stem and len(stem) == 4 and all(stem[1:]):
        for conv in convs[1:]:
            shape_in, shape_out = dims.get(conv.input[0], []), dims.get(conv.output[0], [])
            if shape_in[2:] != stem[2:] or shape_out[2:] != stem[2:] or shape_out[1] > stem[1]:
                break
            kept.append(conv)
    last = next((n for n in reversed(nodes) if n.op_type in ("Gemm", "MatMul")), None)
    return [n.name for n in kept + ([last] if last else [])]


class _Calibration:
    """onnxruntime's CalibrationDataReader over the calibration photos."""

    def __init__(self, input_name: str, batches):
        self.input_name, self.batches = input_name, batches

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch[0]}


def quantize_onnx(run_dir: str | Path, fp32_path: str | Path, out: str | Path, calibration: int = CALIBRATION_PHOTOS,
                  max_drop: float = MAX_DROP) -> Int8Result:
    """`fp32_path` (an exported run) as int8 at `out` (static QDQ, per-channel weights, the first
    layers and the classifier in float: `kept_in_float`), then gated: fp32 and int8 top-1 on the validation
    photos; more than `max_drop` points lost is one line, the int8 file removed."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    start, out, fp32_path = time.perf_counter(), Path(out), Path(fp32_path)
    fp32 = onnx.load(str(fp32_path))
    meta = {p.key: json.loads(p.value) for p in fp32.metadata_props}
    (calib_images, calib_indices), (gate_images, gate_indices) = held_photos(Path(run_dir), calibration)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".int8-") as tmp:
        pre, quantized = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        try:
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
            excluded = kept_in_float(onnx.load(str(pre)))
            reader = _Calibration(fp32.graph.input[0].name, photo_batches(calib_images, calib_indices, meta, 1))
            quantize_static(str(pre), str(quantized), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            calibrate_method=CalibrationMethod.MinMax,  # entropy/percentile: no better, GBs more
                            nodes_to_exclude=excluded, reduce_range=REDUCE_RANGE)
        except Exception as exc:  # an operator or graph the quantiser does not take
            raise UserError(f"{fp32_path} cannot be quantised to int8 ({exc.__class__.__name__}: "
                            f"{str(exc).splitlines()[0][:120] if str(exc) else 'no message'}): use the fp32 "
                            f"export") from None
        model = onnx.load(str(quantized))
        del model.metadata_props[:]
        for key, value in {**meta, "precision": "int8"}.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, json.dumps(value)
        candidate = Path(tmp) / "candidate.onnx"  # gated before it replaces an int8 model that passed
        onnx.save(model, str(candidate))
        result = _gate(fp32_path, candidate, gate_images, gate_indices, meta, len(calib_indices),
                       time.perf_counter() - start, excluded)
        if not result.fp32_top1 - result.int8_top1 <= max_drop / 100:
            kept = f"; the earlier {out} stays" if out.exists() else ""
            raise UserError(f"the int8 model lost {100 * (result.fp32_top1 - result.int8_top1):.2f} points of top-1 "
                            f"({result.int8_top1:.2%} against fp32 {result.fp32_top1:.2%} on {result.gate_photos} "
                            f"validation photos), more than --max-int8-drop {max_drop:g}: it was not kept{kept}; "
                            f"serve the fp32 export ({fp32_path}), or try --calibration with more photos")
        os.replace(candidate, out)
    result.path = out
    return result


def _gate(fp32_path: Path, int8_path: Path, images, indices: list[int], meta: dict, calibrated: int,
          seconds: float, excluded: list[str]) -> Int8Result:
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32_path, int8_path)]
    name = sessions[0].get_inputs()[0].name
    hits, agree, seen = np.zeros(2), 0, 0
    for arrays, labels in photo_batches(images, indices, meta):
        top = [s.run(None, {name: arrays})[0].argmax(1) for s in sessions]
        hits += [(t == labels).sum() for t in top]
        agree += int((top[0] == top[1]).sum())
        seen += len(labels)
    if not seen:
        int8_path.unlink(missing_ok=True)
        raise UserError("no readable validation photo to check the int8 model against fp32 (the int8 model was not kept)")
    return Int8Result(int8_path, calibrated, seen, hits[0] / seen, hits[1] / seen, agree / seen, seconds, excluded)
