"""The engine that computes a frozen network's forward (extraction, eval, predict, report, the
audit, the service): PyTorch, or onnxruntime on a CPU, where the same graph runs 1.4-3x faster
(BENCHMARKS.md §14). Training, which back-propagates, is always PyTorch.

An exported graph belongs to a network, not to a data set: it is kept in a per-user cache
(`$WARMSTART_ENGINE_CACHE`, else `$XDG_CACHE_HOME/warmstart/engines`, else
`~/.cache/warmstart/engines`), keyed by what it computes (architecture, the frozen weights'
fingerprint, input size, output, engine, opset and the exporting libraries' versions). A graph is
written whole (a temporary file moved into place) under a lock, so two runs exporting the same key
export it once; it is checked against PyTorch on export and against its recorded SHA-256 on every
load (a torn or foreign file is exported again, with one warning). The cache is bounded
(`$WARMSTART_ENGINE_CACHE_MB`, default 4096): the least recently used graphs go first."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..config import ENGINES
from ..errors import UserError
from ..files import write_atomically

OPSET = 18
# a batch runs CHUNK images at a time: its activations stay in cache (2-core Xeon, fp32, img/s at
# 8 / 32 / 128 a call: Lite0 288 px 139 / 125 / 117, Lite2 352 px 64 / 56, ResNet50 224 px 37 / 37)
CHUNK = 8
TOLERANCE = 1e-4  # max abs difference from PyTorch at export, relative to the output's scale
# a graph not yet exported pays back its export from about this many images: Lite0 at 288 px, a fresh
# export 8.5 s, onnxruntime 12.1 ms an image against PyTorch's 24.3 (BENCHMARKS.md §14); a trained
# network's own backbone (fine-tuned: a new graph) evaluated on fewer images stays in PyTorch under auto
EXPORT_PAYS_BACK = 700
CACHE_ENV, LIMIT_ENV, DEFAULT_LIMIT_MB = "WARMSTART_ENGINE_CACHE", "WARMSTART_ENGINE_CACHE_MB", 4096
# auto's rule, from BENCHMARKS.md §14 (2-core CPU, batch 32, fp32): onnxruntime's frozen forward ran
# 1.4x (ResNet50) to 2.9-3.2x (EfficientNet-Lite0/Lite2) PyTorch's (folded BatchNorm, channels_last),
# and every recipe, eval and predict 1.9-2.5x faster end to end; on a GPU PyTorch keeps it
AUTO_REASON = "auto: on a CPU onnxruntime runs the frozen network 1.4-3x faster than PyTorch (BENCHMARKS.md §14)"


class EngineUnavailable(Exception):
    """The engine cannot compute this network (an op it lacks, a model that does not export, or
    outputs that differ from PyTorch's)."""


def choose_engine(choice: str, device: torch.device, precision: str) -> tuple[str, str]:
    """(engine, why) for --engine `choice` on `device` at `precision`; an engine that cannot run
    there is one line (UserError)."""
    if choice not in ENGINES:
        raise UserError(f"--engine {choice!r} is not valid: use one of {', '.join(ENGINES)}")
    if choice == "onnxruntime":
        if device.type != "cpu":
            raise UserError(f"--engine onnxruntime computes on the CPU and this run computes on {device.type}: use "
                            f"--engine torch (or auto)")
        if precision != "fp32":
            raise UserError(f"--engine onnxruntime computes in fp32, not --precision {precision}: use --precision "
                            f"fp32, or --engine torch (or auto)")
        return "onnxruntime", "asked for (--engine onnxruntime)"
    if choice == "torch":
        return "torch", "asked for (--engine torch)"
    if device.type != "cpu":
        return "torch", f"auto: PyTorch on {device.type}"
    if precision != "fp32":
        return "torch", f"auto: --precision {precision} is computed by PyTorch"
    return "onnxruntime", AUTO_REASON


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "warmstart" / "engines"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


class TorchForward:
    """A frozen forward run from PyTorch (`engine`: what computes its network: the classifier on an
    engine's features is PyTorch's, the features onnxruntime's)."""

    def __init__(self, forward, engine: str = "torch"):
        self.forward, self.engine = forward, engine

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward(images)


class OnnxForward:
    """A frozen forward computed by onnxruntime from the cached graph of `module` (one session per
    input shape; the expected one is prepared at once, so a network it cannot take is known before
    any image is read)."""

    engine = "onnxruntime"

    def __init__(self, module: torch.nn.Module, identity: dict, input_size, say, cache: "GraphCache"):
        self.module, self.identity, self.say, self.cache = module.eval(), identity, say, cache
        self.sessions: dict[tuple, object] = {}
        self._session(tuple(input_size))

    def _session(self, shape: tuple):
        if shape not in self.sessions:
            self.sessions[shape] = self.cache.session(self.module, {**self.identity, "input": list(shape)}, shape,
                                                      self.say)
        return self.sessions[shape]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        session = self._session(tuple(images.shape[1:]))
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        outputs = [session.run(None, {"image": array[i:i + CHUNK]})[0] for i in range(0, len(array), CHUNK)]
        return torch.from_numpy(outputs[0] if len(outputs) == 1 else np.concatenate(outputs))


def session_options(threads: int | None = None):
    """onnxruntime's settings here: intra-op threads as torch's (OMP_NUM_THREADS), one inter-op
    thread, every graph optimisation, errors only in the log."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def _open(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on `path` (another run exporting the same graph waits, then reuses it)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the files are still written whole
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def export_graph(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """`module` as an ONNX graph with a dynamic batch dimension (torch.onnx's dynamo exporter);
    anything it cannot take is EngineUnavailable."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), input_names=["image"], output_names=["output"],
                              dynamic_shapes=({0: batch},), opset_version=OPSET, dynamo=True, verbose=False,
                              external_data=False)
    except Exception as exc:  # noqa: BLE001 - whatever the exporter fails on, the network stays in PyTorch
        raise EngineUnavailable(f"it does not export to ONNX: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0][:160]}" if text else exc.__class__.__name__


def _parity(module: torch.nn.Module, session, example: torch.Tensor) -> float:
    """The largest difference between onnxruntime's and PyTorch's outputs on `example`, relative
    to the outputs' scale (at least 1)."""
    with torch.inference_mode():
        expected = module(example).float()
    got = torch.from_numpy(session.run(None, {"image": example.numpy()})[0]).float()
    if got.shape != expected.shape:
        return float("inf")
    difference = float((expected - got).abs().max())
    return difference / max(float(expected.abs().max()), 1.0) if difference == difference else float("inf")


class GraphCache:
    """Exported graphs on disk, one per key: `KEY.onnx` and `KEY.json` (what it computes, its size
    and SHA-256, how long it took)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else cache_root()

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.onnx", self.root / f"{key}.json"

    @staticmethod
    def key(identity: dict) -> str:
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]

    def holds(self, identity: dict) -> bool:
        """Whether a graph of `identity` is in the cache (checked whole when it is opened)."""
        return all(p.is_file() for p in self.paths(self.key(identity)))

    def session(self, module: torch.nn.Module, identity: dict, input_size: tuple, say=_stderr):
        """An onnxruntime session for `module` at `input_size`, from the cache or exported now."""
        key = self.key(identity)
        graph, record = self.paths(key)
        found = self._verified(graph, record, key)
        if found is not None:
            return found
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with _locked(self.root / f"{key}.lock"):
                found = self._verified(graph, record, key)  # another run may have exported it meanwhile
                if found is not None:
                    return found
                if graph.exists() or record.exists():
                    say(f"warning: engine cache {graph} is damaged or not the graph it claims to be; exporting it "
                        f"again")
                return self._export(module, identity, key, input_size, say)
        except OSError as exc:  # a read-only home, a full disk: PyTorch computes (auto), or one line
            raise EngineUnavailable(f"its graph cannot be written to {self.root} ({exc.strerror or exc}): set "
                                    f"{CACHE_ENV} to a folder you can write to") from None

    def _verified(self, graph: Path, record: Path, key: str):
        """The session of an intact graph of `key`, or None (missing, torn, or another graph)."""
        try:
            meta = json.loads(record.read_text())
            if not isinstance(meta, dict) or meta.get("key") != key or graph.stat().st_size != meta.get("bytes") \
                    or _sha256(graph) != meta.get("sha256"):
                return None
            session = _open(graph)
        except Exception:  # noqa: BLE001 - unreadable, not JSON, not a graph: exported again
            return None
        with contextlib.suppress(OSError):  # a read-only cache is used as it is
            os.utime(record)  # used now: the last to be evicted
        return session

    def _export(self, module, identity: dict, key: str, input_size: tuple, say):
        graph, record = self.paths(key)
        example = torch.randn((2, *input_size), generator=torch.Generator().manual_seed(0))
        temporary = graph.with_name(f"{graph.name}.{os.getpid()}.tmp")
        start = time.perf_counter()
        try:
            export_graph(module, example, temporary)
            seconds = time.perf_counter() - start
            try:
                session = _open(temporary)
            except Exception as exc:  # noqa: BLE001 - an op onnxruntime's CPU provider lacks
                raise EngineUnavailable(f"onnxruntime cannot load its graph: {_first_line(exc)}") from None
            difference = _parity(module, session, example)
            if not difference <= TOLERANCE:
                raise EngineUnavailable(f"its outputs differ from PyTorch's by {difference:.2g} (relative; at most "
                                        f"{TOLERANCE:g} accepted)")
            meta = {"key": key, "identity": identity, "bytes": temporary.stat().st_size,
                    "sha256": _sha256(temporary), "export_seconds": round(seconds, 2)}
            os.replace(temporary, graph)
        finally:
            temporary.unlink(missing_ok=True)
        write_atomically(record, json.dumps(meta, indent=1), "the engine cache")
        say(f"engine: exported {identity.get('name', 'the network')} at {'x'.join(map(str, input_size[1:]))} px for "
            f"onnxruntime in {seconds:.1f}s (once per machine; kept in {self.root})")
        self._evict(keep=key)
        return session

    def _evict(self, keep: str) -> None:
        """The least recently used graphs removed while the cache is over its bound."""
        try:
            limit = float(os.environ.get(LIMIT_ENV, DEFAULT_LIMIT_MB)) * 2**20
        except ValueError:
            limit = DEFAULT_LIMIT_MB * 2**20
        entries = []
        for record in self.root.glob("*.json"):
            graph = record.with_suffix(".onnx")
            with contextlib.suppress(OSError):
                entries.append((record.stat().st_mtime, graph.stat().st_size, record, graph))
        total = sum(size for _, size, _, _ in entries)
        for _, size, record, graph in sorted(entries, key=lambda e: e[0]):
            if total <= limit:
                break
            if record.stem != keep:
                for path in (graph, record):
                    path.unlink(missing_ok=True)
                total -= size


def identity_of(name: str, weights: str, output: str) -> dict:
    """What a graph computes and who made it: the key of the engine cache (without the input size)."""
    import onnxruntime
    import timm

    return {"name": name, "weights": weights, "output": output, "engine": "onnxruntime", "opset": OPSET,
            "torch": torch.__version__, "timm": timm.__version__, "onnxruntime": onnxruntime.__version__}
