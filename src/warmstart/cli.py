"""The `warmstart` command: parses, validates, and calls the library. A user mistake is one line, exit 2."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from dataclasses import fields

from .config import GROUPS, RunConfig, field_kind
from .errors import NO_SPACE_ERRNOS, UserError, no_space
from .recipes import RECIPES, command_line, recommend
from .run_dir import RunDir
from .stop import Stopped

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line naming the fix, not a usage dump."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # `--epoch` must not silently mean `--epochs`
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see '{self.prog} --help')")

    def parse_known_args(self, args=None, namespace=None):
        """Options and paths in any order (`predict RUN --top-k 3 a.jpg b.jpg`): a command without
        subcommands of its own is parsed intermixed."""
        if getattr(self, "_intermixing", False) or self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def add_declared_options(parser: argparse.ArgumentParser, settings_class, groups: dict | None = None,
                         default=None) -> None:
    """A flag (or positional argument) for every field of a dataclass of settings (RunConfig,
    ServeSettings, StudyOptions), generated from its declaration: name, type, default, help,
    choices; bounds are checked by the dataclass itself."""
    for f in fields(settings_class):
        target = (groups or {}).get(f.metadata["group"], parser)
        if f.metadata.get("positional"):
            target.add_argument(f.name, help=f.metadata["help"])
            continue
        value = f.default if default is None else default
        target.add_argument(*_flag(f), **_flag_options(f), default=value)


def settings_from_args(settings_class, args: argparse.Namespace):
    """The dataclass of settings the parsed flags describe (its own checks run)."""
    return settings_class(**{f.name: getattr(args, f.name) for f in fields(settings_class)})


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """Every RunConfig setting as a flag, generated from its declaration; then the options of a
    training command that are not settings (where the config comes from, how many processes)."""
    S = argparse.SUPPRESS  # only options given on the command line override --config
    parser.add_argument("--config", default=S, help="YAML run config (e.g. RUN/config.yaml); other flags override it")
    groups = {name: parser.add_argument_group(name) for name in GROUPS if name != "run"}
    groups["run"] = parser
    add_declared_options(parser, RunConfig, groups, default=S)
    dist = groups["several processes (torchrun)"]
    dist.add_argument("--nproc", type=int, default=S, metavar="N",
                      help="train on N processes (GPUs) of this machine through torchrun; for several machines "
                      "run torchrun yourself: torchrun --nnodes … -m warmstart train …")
    out = groups["output"]
    out.add_argument("--resume", default=S, metavar="RUN",
                     help="continue RUN exactly from its latest checkpoint (its config.yaml; flags override)")
    out.add_argument("--resume-weights-only", action="store_true", default=S,
                     help="with --resume: start a new run from the checkpoint's weights, with this config")


def _flag(f) -> list[str]:
    return ["--" + f.name.replace("_", "-")]


def _flag_options(f) -> dict:
    """argparse's options for a setting, from its type and declaration."""
    meta = f.metadata
    kind, is_list, _ = field_kind(f)
    options = {"dest": f.name, "help": meta["help"]}
    if kind == "bool":  # --NAME and --no-NAME (a recipe may turn a setting on that the user turns off)
        return {**options, "action": argparse.BooleanOptionalAction}
    options["type"] = {"int": int, "float": float}.get(kind, str)
    for key in ("choices", "metavar"):
        if meta.get(key):
            options[key] = meta[key]
    if is_list:
        options.update(action="append") if meta["repeat"] else options.update(nargs="+")
    return options


def config_from_args(args: argparse.Namespace) -> RunConfig:
    names = {f.name for f in fields(RunConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    if getattr(args, "resume", None) and not getattr(args, "config", None):
        return RunConfig.from_yaml(RunDir(args.resume).config, overrides)
    if getattr(args, "config", None):
        return RunConfig.from_yaml(args.config, overrides)
    return RunConfig.from_dict(overrides, source="command line")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="warmstart", description="Transfer learning for image classifiers from "
                           "ImageNet-pretrained networks: train, evaluate, predict, export, serve.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    _add_training_commands(sub)
    _add_trained_model_commands(sub)
    _add_data_and_report_commands(sub)
    return parser


def _add_training_commands(sub) -> None:
    train = sub.add_parser("train", help="train a classifier from pretrained weights")
    _add_train_options(train)

    lf = sub.add_parser("lr-find", help="sweep the learning rate exponentially and suggest one (train's options)")
    _add_train_options(lf)
    sweep = lf.add_argument_group("sweep")
    sweep.add_argument("--start-lr", type=float, default=1e-7)
    sweep.add_argument("--end-lr", type=float, default=10.0)
    sweep.add_argument("--steps", type=int, default=100, help="optimizer steps in the sweep")

    rc = sub.add_parser("recipes", help="list the --recipe presets (what each does and costs) and recommend one")
    rc.add_argument("--data", default=None, help="your data: the recommendation weighs its photos per class")

    tn = sub.add_parser("tune", help="hyper-parameter search (Optuna): each trial a training run, scored by val top-1")
    tn.add_argument("--config", required=True, help="base run config (YAML); the space's settings are drawn over it")
    tn.add_argument("--space", required=True, help="search space (YAML), e.g. examples/tune-space.yaml")
    tn.add_argument("--trials", type=int, required=True,
                    help="finished trials the study should hold (a resumed study runs only what is missing)")
    from .tune.study import StudyOptions

    add_declared_options(tn, StudyOptions)


def _add_engine_option(parser: argparse.ArgumentParser) -> None:
    from .config import ENGINES

    parser.add_argument("--engine", default=None, choices=ENGINES,
                        help="what computes a run directory's network (default: the run's own --engine)")


def _add_trained_model_commands(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a trained run (top-1, top-5, per class, confusion matrix)")
    ev.add_argument("run", help="run directory")
    ev.add_argument("--data", default=None, help="data to evaluate on (default: the run's own)")
    ev.add_argument("--split", default="val", choices=("train", "val", "test"))
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--workers", type=int, default=None)
    ev.add_argument("--json", action="store_true", help="print the evaluation (eval.json, or eval_<split>.json)")
    _add_engine_option(ev)

    pr = sub.add_parser("predict", help="top-k classes of image files (run directory, ONNX file, or a server)")
    pr.add_argument("model", nargs="?", help="run directory or exported .onnx file (not with --server)")
    pr.add_argument("images", nargs="+", help="image files, or folders (every image under them)")
    pr.add_argument("--top-k", type=int, default=5)
    pr.add_argument("--json", action="store_true")
    pr.add_argument("--out", default=None, help="write the predictions to FILE (.csv: path, error, class_1, "
                    "probability_1, ...; or .json) instead of printing them")
    pr.add_argument("--server", default=None, help="URL of a 'warmstart serve' service to ask instead")
    _add_engine_option(pr)

    ex = sub.add_parser("export", help="export a run as ONNX, TorchScript or safetensors (with a parity check)")
    ex.add_argument("run", help="run directory")
    ex.add_argument("--format", default="onnx", choices=("onnx", "torchscript", "safetensors"))
    ex.add_argument("--out", default=None, help="output file (default RUN/model.<format>)")
    ex.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    ex.add_argument("--int8", action="store_true", help="also an int8 ONNX model beside the fp32 one (NAME.int8.onnx), "
                    "calibrated on the run's training photos and checked against fp32 on its validation photos")
    ex.add_argument("--calibration", type=int, default=200, help="training photos that calibrate the int8 model")
    ex.add_argument("--max-int8-drop", type=float, default=1.0,
                    help="points of val top-1 the int8 model may lose against fp32 (more is an error)")

    from .serve.settings import ServeSettings

    add_declared_options(sub.add_parser("serve", help="an HTTP breed-recognition service with a web page"),
                         ServeSettings)


def _add_source_options(parser) -> None:
    """How `data check` and `data pack` read their data: the run settings of the same names."""
    for name in ("allow_outside_paths", "image_column", "label_column"):
        declared = RunConfig.__dataclass_fields__[name]
        flag = "--" + name.replace("_", "-")
        if declared.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=declared.metadata["help"])
        else:
            parser.add_argument(flag, default=None, metavar="NAME", help=declared.metadata["help"])


def _source_options(args):
    from .data.sources import SourceOptions

    return SourceOptions(allow_outside_paths=args.allow_outside_paths, image_column=args.image_column,
                         label_column=args.label_column, quiet=True)


def _add_data_and_report_commands(sub) -> None:
    qs = sub.add_parser("quickstart", help="offline demo: EfficientNet-Lite0 features on scikit-learn's digits")
    qs.add_argument("--out", default=None)
    qs.add_argument("--quiet", action="store_true")

    data = sub.add_parser("data", help="datasets: download, check, audit")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=OneLineParser)
    dl = data_sub.add_parser("download", help="download a dataset (stanford-dogs), resumable and verified")
    dl.add_argument("dataset", choices=("stanford-dogs",))
    dl.add_argument("--dir", default=None, help="where to put it (default: $WARMSTART_DATA/stanford-dogs or "
                    "~/.cache/warmstart/stanford-dogs, where --data stanford-dogs looks)")
    dl.add_argument("--base-url", default=None, help="a mirror of the dataset's archives")
    dl.add_argument("--quiet", action="store_true")
    ck = data_sub.add_parser("check", help="scan a dataset: classes, counts, sizes, unreadable files")
    ck.add_argument("root", help="a folder tree, CSV manifest, Stanford Dogs folder, stanford-dogs, WebDataset "
                    "shards or hf:PATH")
    ck.add_argument("--workers", type=int, default=None)
    ck.add_argument("--json", action="store_true")
    _add_source_options(ck)

    pk = data_sub.add_parser("pack", help="write any data warmstart reads as WebDataset shards (+ dataset.yaml)")
    pk.add_argument("root", help="the data (a folder tree, CSV manifest, Stanford Dogs folder, shards, hf:PATH)")
    pk.add_argument("out", help="an empty folder for the shards")
    pk.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    _add_source_options(pk)
    au = data_sub.add_parser("audit", help="find likely label errors, near-duplicates (train/test leakage) and "
                             "outliers from the frozen network's features, before training (train's options)")
    au.add_argument("root", nargs="?", default=None, help="the data (as --data); --out DIR for the results "
                    "(default audit/), --cache-dir for the features (default DIR/cache: pass the same to train)")
    _add_train_options(au)

    rp = sub.add_parser("report", help="a self-contained HTML report of a run, with plots")
    rp.add_argument("run", help="run directory")
    rp.add_argument("--data", default=None, help="data to report on (default: the run's own)")
    rp.add_argument("--split", default="val", choices=("train", "val", "test"))
    rp.add_argument("--gallery", type=int, default=24, help="misclassified images to show")
    rp.add_argument("--workers", type=int, default=None)
    _add_engine_option(rp)

    rn = sub.add_parser("runs", help="list trained runs")
    rn.add_argument("directory", nargs="?", default="runs")
    rn.add_argument("--json", action="store_true")

    cp = sub.add_parser("compare", help="runs side by side, with their config differences")
    cp.add_argument("runs", nargs="+")
    cp.add_argument("--json", action="store_true")

    md = sub.add_parser("models", help="list model names with input size and parameter count")
    md.add_argument("pattern", nargs="?", help="a timm name pattern, e.g. 'convnext*' (default: the familiar names)")


def _run_torchrun(nproc: int, argv: list[str]) -> int:
    """`warmstart train --nproc N …` = `torchrun --standalone --nproc_per_node N -m warmstart train …`."""
    import subprocess

    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "warmstart", *rest]
    return subprocess.run(command).returncode


def _cmd_train(args) -> int:
    from .train.checkpoint import TrainingInterrupted
    from .train.run import train

    nproc = getattr(args, "nproc", 1)
    if nproc < 1:
        raise UserError(f"--nproc {nproc} is not valid: it must be >= 1")
    config = config_from_args(args)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _run_torchrun(nproc, args.argv)
    try:
        train(config, resume=getattr(args, "resume", None),
              resume_weights_only=getattr(args, "resume_weights_only", False))
    except TrainingInterrupted as stop:
        if stop.checkpoint is None:
            raise
        run = stop.checkpoint.parent.parent
        print(f"interrupted: checkpoint saved to {stop.checkpoint}; continue with: warmstart train --resume {run}",
              file=sys.stderr)
        return 128 + stop.signum
    return 0


def _cmd_lr_find(args) -> int:
    from .train.lr_find import lr_find

    result = lr_find(config_from_args(args), args.start_lr, args.end_lr, args.steps)
    if result.suggestion is None:
        return 1
    print(result.flag)
    return 0


def _cmd_tune(args) -> int:
    from .tune import StudyOptions, tune

    try:
        tune(args.config, args.space, args.trials, settings_from_args(StudyOptions, args))
    except Stopped as stop:
        print("interrupted: the finished trials are stored; run the same command again to resume the study",
              file=sys.stderr)
        return 128 + stop.signum
    return 0


def _cmd_recipes(args) -> int:
    import torch

    from .models.registry import installed_bundled

    per_class, known = None, ""
    if args.data:
        from .data.images import readable_photos
        from .data.sources import resolve_splits
        from .models.pretrained_classes import imagenet_labels, match_classes

        train = resolve_splits(args.data, 0.0, 0)["train"]
        if len(train.class_ids) < 2:
            raise UserError(f"--data {args.data} has {len(train.class_ids)} class: a classifier needs at least 2")
        per_class = readable_photos(train) / len(train.class_ids)
        matched = sum(m.row is not None for m in match_classes(train.class_ids, train.class_names,
                                                                imagenet_labels("imagenet-1k")))
        known = (f"\n  {matched} of {len(train.class_ids)} classes are ImageNet-1k classes (by WordNet id or name): "
                 f"{'the head starts from the pretrained classifier and is pulled toward it' if matched else 'the head starts from zero'}")
    gpu = torch.cuda.is_available()
    advice = recommend(per_class, gpu, installed_bundled())
    device = "a GPU" if gpu else "a CPU"
    where = f"{per_class:.0f} photos per class on {device}" if per_class is not None else device
    print(f"recommended ({where}): --recipe {advice.recipe} --model {advice.model}\n  why: {advice.why}{known}\n")
    for recipe in RECIPES.values():
        print(f"{recipe.name}\n  {recipe.summary}\n  cost: {recipe.cost}\n  settings: {command_line(recipe.settings)}\n")
    return 0


def _cmd_eval(args) -> int:
    from .evaluate import evaluate_run

    result = evaluate_run(args.run, args.data, args.split, args.batch_size, args.workers, args.engine)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"{args.split}: top-1 {result.top1:.4f}, top-5 {result.top5:.4f}, ECE {result.ece:.3f}, NLL "
              f"{result.nll:.3f} on {result.num_images} images ({result.images_per_sec:.1f} img/s, "
              f"{result.engine}); per-class "
              f"accuracy and confusion matrix in {args.run}")
    return 0


def _predictions(args) -> list:
    """(image, [(class, probability)], error) from a server, an ONNX file or a run directory."""
    if args.top_k < 1:
        raise UserError(f"--top-k {args.top_k} is not valid: it must be >= 1")
    if args.server:
        from .serve.client import predict_remote

        from .predict import expand_folders

        images = expand_folders(([args.model] if args.model else []) + args.images)
        answers = [predict_remote(args.server, image, args.top_k) for image in images]
        return [(str(i), [(p["class"], p["probability"]) for p in a.get("predictions", [])], a.get("error"))
                for i, a in zip(images, answers)]
    if args.model is None:
        raise UserError("predict needs a run directory or .onnx file, or --server URL")
    if args.model.endswith(".onnx"):
        from .predict import predict_onnx

        return predict_onnx(args.model, args.images, args.top_k)
    from .predict import predict

    return [(p.image, p.top, p.error) for p in predict(args.model, args.images, args.top_k, engine=args.engine)]


def _cmd_predict(args) -> int:
    from types import SimpleNamespace

    results = _predictions(args)
    predictions = [SimpleNamespace(image=i, top=t, error=e) for i, t, e in results]
    if args.out:
        from .predict import write_predictions

        path = write_predictions(results, args.out)
        unreadable = [p for p in predictions if p.error]
        print(f"predictions for {len(predictions) - len(unreadable)} images in {path}"
              + (f"; {len(unreadable)} could not be read (listed there with the reason)" if unreadable else ""))
    elif args.json:
        print(json.dumps([{"image": p.image, "error": p.error,
                           "top": [{"class": c, "probability": round(q, 6)} for c, q in p.top]}
                          for p in predictions], indent=2))
    else:
        for p in predictions:
            if p.error:
                print(f"{p.image}: error: {p.error}")
                continue
            print(p.image)
            for name, prob in p.top:
                print(f"  {prob:7.2%}  {name}")
    return 1 if any(p.error for p in predictions) else 0


def _cmd_quickstart(args) -> int:
    from .quickstart import quickstart
    from .train.run import describe_rates

    result = quickstart(args.out, args.quiet)
    m = result.metrics
    print(f"quickstart: top-1 {m['top1']:.2%} on {m['val_images']} held-out digits; {describe_rates(m)}, "
          f"{m['wall_seconds']:.0f}s in all")
    print(f"try: warmstart predict {result.run_dir} {result.run_dir}/samples/digit_3.png")
    return 0


def _cmd_models(args) -> int:
    from .models.registry import list_model_names, model_info

    names = list_model_names(args.pattern)
    if not names:
        raise UserError(f"no timm model matches {args.pattern!r}: try a broader pattern like 'resnet*'")
    print(f"{'name':32} {'timm architecture':32} {'input':>6} {'params':>8}")
    for name in names[:200]:
        info = model_info(name)
        print(f"{name:32} {info.architecture:32} {info.input_size:>6} {info.params / 1e6:>7.1f}M")
    if len(names) > 200:
        print(f"… and {len(names) - 200} more: narrow the pattern")
    return 0


def _cmd_data(args) -> int:
    if args.data_command == "download":
        from .data import stanford_dogs
        from .data.download import download_stanford_dogs

        root = download_stanford_dogs(args.dir, args.base_url or stanford_dogs.BASE_URL, args.quiet)
        print(f"ready: warmstart train --data {root}")
        return 0
    if args.data_command == "audit":
        from .audit import audit

        if args.root is not None:
            args.data = args.root
        audit(config_from_args(args))
        return 0
    if args.data_command == "pack":
        from .data import pack

        spec = pack(args.root, args.out, args.shard_size, _source_options(args))
        print(f"ready: warmstart train --data {spec}")
        return 0
    from .data.check import check_dataset

    report = check_dataset(args.root, args.workers, quiet=args.json, options=_source_options(args))
    print(report.to_json() if args.json else report.to_text())
    return 1 if report.problems else 0


def _cmd_report(args) -> int:
    from .report import build_report

    path = build_report(args.run, args.data, args.split, args.gallery, workers=args.workers, engine=args.engine)
    print(f"report: {path} (figures in {path.parent / 'report'})")
    return 0


def _cmd_runs(args) -> int:
    from .report.runs import list_runs, runs_table

    runs = list_runs(args.directory)
    print(json.dumps(runs, indent=2) if args.json else runs_table(runs) if runs else f"no runs in {args.directory}")
    return 0


def _cmd_compare(args) -> int:
    from .report.runs import compare_runs, comparison_table

    comparison = compare_runs(args.runs)
    print(json.dumps(comparison, indent=2) if args.json else comparison_table(comparison))
    return 0


def _cmd_export(args) -> int:
    from .export import export_run

    if args.calibration < 1:
        raise UserError(f"--calibration {args.calibration} is not valid: it must be >= 1")
    result = export_run(args.run, args.format, args.out, force=args.force, int8=args.int8,
                        calibration=args.calibration, max_int8_drop=args.max_int8_drop)
    parity = (f"; parity with PyTorch on {result.parity_inputs} inputs: same top-1 {result.same_top1}, "
              f"max abs logit difference {result.max_abs_logit_difference:.2e}") if result.parity_inputs else ""
    print(f"exported {result.path} ({result.exporter}){parity}")
    if result.int8 is not None:
        print(result.int8.line())
    return 0


def _cmd_serve(args) -> int:
    from .serve.app import serve
    from .serve.settings import ServeSettings

    serve(settings_from_args(ServeSettings, args))
    return 0


COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "predict": _cmd_predict, "quickstart": _cmd_quickstart,
            "models": _cmd_models, "data": _cmd_data, "report": _cmd_report, "runs": _cmd_runs,
            "compare": _cmd_compare, "export": _cmd_export, "serve": _cmd_serve,
            "lr-find": _cmd_lr_find, "recipes": _cmd_recipes, "tune": _cmd_tune}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Stopped as stop:
        print(f"interrupted by {signal.Signals(stop.signum).name}: {stop.kept or 'nothing was written'}",
              file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `warmstart models | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # a full disk anywhere the files writer did not name it already
        if exc.errno not in NO_SPACE_ERRNOS:
            raise
        print(f"error: {no_space('what was being written', Path(exc.filename).parent if exc.filename else '.')}",
              file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
