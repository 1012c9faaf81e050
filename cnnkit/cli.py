"""The ``cnnkit`` command line: run recipe files, list recipes and models, plan a network.

Commands::

    cnnkit run FILE_OR_NAME [key=value ...]   run a recipe file (or a packaged recipe by name)
    cnnkit ls                                 packaged recipes and search spaces, with what each reproduces
    cnnkit models                             registered architectures with their notation
    cnnkit plan SPEC_OR_NAME --input-shape 28,28,1 [--classes 10] [--batch-size 128]
                [--precision float32|mixed_bfloat16|mixed_float16] [--optimizer adam]
    cnnkit quickstart [key=value ...]         pretrain on digits 0-4, fine-tune on 50 labels of 5-9, vs scratch
    cnnkit export RUN --format savedmodel|tflite|onnx [--quantize float16|dynamic|int8] --out DIR [--trust-model]
    cnnkit predict MODEL IMAGE_OR_FOLDER... [--top-k 5] [--csv FILE [--overwrite]] [--trust-model]
    cnnkit tune FILE_OR_NAME [key=value ...]  run a Keras Tuner search from a search-space file (tuner/)
                [--role chief|worker] [--oracle-address HOST:PORT] [--worker-id NAME] [--worker-timeout S]
    cnnkit data audit PATH [--test-path P] [--json]   counts, unusable files, duplicates, leakage;
                [--extensions .png,.jpg] [--max-pixels N]   exits 0 when clean, 1 when problems are found
    cnnkit report RUN [--data NAME] [--out FILE]   write RUN/report.html (a search directory: its trials page)
    cnnkit visualize kernels|feature-maps|filters|grad-cam MODEL [IMAGE] --out PNG [--layer L] [--class C]

A mistake a user can make (a bad notation token, an unknown recipe key, a missing or unwritable file) prints
one line ``cnnkit: error: <message>`` on stderr and exits with status 2, never a traceback; set
``CNNKIT_DEBUG=1`` to see the traceback. TensorFlow is imported only by the commands that need
it (``cnnkit --help`` and ``cnnkit ls`` stay instant).

Example:
    >>> from cnnkit.cli import main
    >>> main(["plan", "20C5-MP2-50C5-MP2-FC256", "--input-shape", "28,28,1"])  # doctest: +SKIP
    ...
    0
    >>> main(["run", "mnist_lenet", "epochs=1"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import textwrap
import unicodedata
import warnings
from pathlib import Path

PROG = "cnnkit"
QUICKSTART = "quickstart"

_DATA_NAMES = {"mnist-sample": "bundled MNIST", "mnist": "MNIST"}


def _input_shape(text: str) -> tuple[int, ...]:
    """``"28,28,1"`` (or ``28x28x1``) -> ``(28, 28, 1)``; an argparse type."""
    parts = [part for part in text.replace("x", ",").replace("X", ",").split(",") if part.strip()]
    try:
        shape = tuple(int(part) for part in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected height,width,channels like 28,28,1. Received: {text!r}")
    return shape


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer. Received: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cnnkit`` command (subcommands run, ls, models, plan, quickstart).

    Example:
        >>> build_parser().parse_args(["plan", "FC16", "--input-shape", "28,28,1"]).input_shape
        (28, 28, 1)
    """
    from cnnkit import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train, plan and run convolutional image classifiers (Keras 3 / TensorFlow).",
        epilog="Errors exit with status 2; set CNNKIT_DEBUG=1 for a traceback.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        help="run a recipe file, or a packaged recipe by name",
        description="Run a recipe file (a path, or the name of a packaged recipe; see 'cnnkit ls'). "
        "key=value arguments override the file's keys; values are YAML (epochs=3, data=mnist-sample), "
        "dotted keys set nested values (model_options.activation=tanh).",
    )
    run.add_argument("recipe", metavar="FILE_OR_NAME", help="a .yaml file or a packaged recipe name")
    run.add_argument("overrides", metavar="key=value", nargs="*", help="override a key of the recipe")
    run.set_defaults(handler=_cmd_run)

    ls = commands.add_parser("ls", help="list the packaged recipes and search spaces",
                             description="List the packaged recipes and search spaces, each with the first "
                             "sentence of its header.")
    ls.set_defaults(handler=_cmd_ls)

    models = commands.add_parser(
        "models", help="list the registered architectures", description="List the registered architectures."
    )
    models.set_defaults(handler=_cmd_models)

    plan = commands.add_parser(
        "plan",
        help="print a network's layer table and memory estimate",
        description="Print the shapes, parameters, MACs and receptive field of every layer of a notation "
        "string or registered model, then its training memory estimate.",
    )
    plan.add_argument("arch", metavar="SPEC_OR_NAME", help="notation like 20C5-MP2-50C5-MP2-FC256, or a model name")
    plan.add_argument(
        "--input-shape", type=_input_shape, required=True, metavar="H,W,C", help="input shape, e.g. 28,28,1"
    )
    plan.add_argument(
        "--classes", type=_positive_int, default=None, metavar="N", help="append a softmax classifier of N classes"
    )
    plan.add_argument("--batch-size", type=_positive_int, default=128, help="batch size of the memory estimate")
    plan.add_argument(
        "--precision",
        default="float32",
        help="precision of the memory estimate: float32, mixed_bfloat16 or mixed_float16",
    )
    plan.add_argument("--optimizer", default="adam", help="optimizer of the memory estimate (its state size)")
    plan.set_defaults(handler=_cmd_plan)

    quickstart = commands.add_parser(
        "quickstart",
        help="pretrain on digits 0-4, fine-tune on 50 labels per digit 5-9, compare with scratch",
        description="Run the packaged 'quickstart' recipe on the MNIST sample bundled with cnnkit (no download): "
        "the seed's conv net pretrained on digits 0-4, fine-tuned in stages on 50 labelled images of each "
        "digit 5-9, against the same net trained from scratch on those images. key=value arguments "
        "override its keys (labels_per_class=20, pretrain.epochs=2, run_dir=...).",
    )
    quickstart.add_argument("overrides", metavar="key=value", nargs="*", help="override a key of the recipe")
    quickstart.set_defaults(handler=_cmd_quickstart)
    _add_export_and_predict(commands)
    _add_tune(commands)
    _add_data(commands)
    _add_report_and_visualize(commands)
    return parser


def _add_export_and_predict(commands) -> None:
    """The ``export`` and ``predict`` subcommands (``cnnkit.exporting``, ``cnnkit.inference``)."""
    export = commands.add_parser(
        "export",
        help="export a run as a SavedModel, TFLite or ONNX directory, checked in a fresh process",
        description="Export a run directory or .keras file to --out (a new directory with labels.txt, README.md "
        "and verification.json), load it in a fresh process without cnnkit and compare it with the Keras model.",
    )
    export.add_argument("run", metavar="RUN", help="a run directory or a .keras file")
    export.add_argument("--format", default="savedmodel", choices=["savedmodel", "tflite", "onnx"])
    export.add_argument("--quantize", default=None, choices=["float32", "float16", "dynamic", "int8"],
                        help="TFLite quantisation (int8 calibrates on the run's training data)")
    export.add_argument("--out", required=True, metavar="DIR", help="the export directory to create")
    export.add_argument("--data", default=None, metavar="NAME",
                        help="dataset for samples and int8 calibration (default: the run's recorded data)")
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export (or an empty directory) at --out")
    export.add_argument("--no-verify", dest="verify", action="store_false", help="skip the fresh-process check")
    export.add_argument("--trust-model", action="store_true",
                        help="load a model that holds Python code (a Lambda layer); only for files you trust")
    export.set_defaults(handler=_cmd_export)

    predict = commands.add_parser(
        "predict",
        help="print the top-k classes of image files",
        description="Classify image files (folders are searched recursively) with a run directory, a .keras file "
        "or an exported SavedModel; print the top-k classes per image and optionally write them as CSV.",
    )
    predict.add_argument("model", metavar="MODEL", help="a run directory, a .keras file or a SavedModel directory")
    predict.add_argument("inputs", metavar="IMAGE_OR_FOLDER", nargs="+", help="image files or folders")
    predict.add_argument("--top-k", type=_positive_int, default=5, metavar="K", help="classes shown per image")
    predict.add_argument("--csv", default=None, metavar="FILE", help="also write path,rank,class_name,probability")
    predict.add_argument("--overwrite", action="store_true", help="replace an existing --csv file")
    predict.add_argument("--batch-size", type=_positive_int, default=256, help="images per model call")
    predict.add_argument("--trust-model", action="store_true",
                         help="load a model that holds code: any SavedModel (a graph can run any operation), or a "
                         "Keras file with Lambda layers; only for models you trust")
    predict.set_defaults(handler=_cmd_predict)


def _percent(value) -> str:
    return f"{100.0 * float(value):.2f}%"


def _accuracy_text(metrics: dict) -> str:
    """``"test accuracy 97.10% (error 2.90%)"``, or the metrics there are when there is no test split."""
    if "test_accuracy" in metrics:
        error = metrics.get("test_error", 1.0 - float(metrics["test_accuracy"]))
        return f"test accuracy {_percent(metrics['test_accuracy'])} (error {_percent(error)})"
    shown = {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
    if not shown:
        return "no test metrics"
    return ", ".join(f"{key} {value:.4g}" for key, value in shown.items())


def _run_recipe(recipe):
    from cnnkit.config import run_recipe

    return run_recipe(recipe)


def _cmd_run(args) -> int:
    from cnnkit.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(f"{PROG}: running {recipe.name} ({recipe.qualname}) from {recipe.path}", flush=True)
    result = _run_recipe(recipe)
    metrics = getattr(result, "metrics", None) or {}
    run_dir = getattr(result, "run_dir", None)
    saved = f"; run saved to {run_dir}" if run_dir is not None else ""
    print(f"{recipe.name}: {_accuracy_text(metrics)}{saved}")
    return 0


def _cmd_ls(args) -> int:
    from cnnkit.config import list_recipes, packaged_dir

    recipes, spaces = list_recipes(), list_recipes("tuner")
    if not recipes:
        print(f"no packaged recipes in {packaged_dir('recipes')}")
    width = max(len(name) for name, _ in recipes + spaces) if recipes or spaces else 0
    for title, listed in (("", recipes), ("search spaces (cnnkit tune NAME):", spaces)):
        if title and listed:
            print(f"\n{title}")
        for name, description in listed:
            print(textwrap.fill(f"{name:<{width}}  {description}", width=110, subsequent_indent=" " * (width + 2),
                                break_on_hyphens=False))
    return 0


def _cmd_models(args) -> int:
    from cnnkit.models import describe, list_models

    names = list_models()
    width = max((len(name) for name in names), default=0)
    for name in names:
        print(f"{name:<{width}}  {describe(name)}".rstrip())
    return 0


def _cmd_plan(args) -> int:
    import cnnkit

    plan = cnnkit.plan(args.arch, args.input_shape, num_classes=args.classes)
    memory = plan.memory(batch_size=args.batch_size, precision=args.precision, optimizer=args.optimizer)
    print(plan)
    print(memory)
    return 0


def _cmd_quickstart(args) -> int:
    from cnnkit.config import load_recipe, packaged_dir

    packaged = packaged_dir("recipes") / f"{QUICKSTART}.yaml"  # not a file or folder 'quickstart' in the working directory
    result = _run_recipe(load_recipe(packaged, args.overrides, kind="recipes"))
    print(f"{QUICKSTART}: {result.summary()}")
    return 0


def _cmd_export(args) -> int:
    from cnnkit.exporting import ExportVerificationError, export

    try:
        export(args.run, args.out, format=args.format, quantize=args.quantize, data=args.data,
               overwrite=args.overwrite, verify=args.verify, trust=args.trust_model)
    except ExportVerificationError as error:
        print(f"{PROG}: export failed: {_error_message(error)}", file=sys.stderr)
        return 1
    return 0


def _shown_path(path) -> str:
    """A file name any terminal can print on one line: bytes that are not valid in the file-system encoding
    (the lone surrogates of ``os.fsdecode``, e.g. ``caf\\udce9.png``) shown as ``\\xe9``, as Python shows them
    on stderr, and control or format characters (a newline, an escape sequence, a right-to-left mark) escaped
    (``a\\nb.png``). The CSV keeps the original name.

    Example:
        >>> _shown_path("a\\nb.png")
        'a\\\\nb.png'
    """
    text = os.fsencode(path).decode(sys.getfilesystemencoding(), "backslashreplace")
    return "".join(ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch)[0] == "C" else ch
                   for ch in text)


def _cmd_predict(args) -> int:
    from cnnkit.inference import image_files, load_predictor, write_csv

    if args.csv and Path(args.csv).exists() and not (args.overwrite and Path(args.csv).is_file()):
        raise ValueError(f"--csv {args.csv} already exists; pass --overwrite to replace it"
                         if Path(args.csv).is_file() else f"--csv {args.csv} exists and is not a file")
    if args.csv:  # checked before the predictions, not after them
        folder = Path(args.csv).absolute().parent
        while not folder.exists():  # write_csv makes the missing folders
            folder = folder.parent
        if not folder.is_dir():
            raise ValueError(f"--csv {args.csv} cannot be written: {folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"--csv: Permission denied: {args.csv} (the folder {folder} is not writable)")
    files, skipped = image_files(args.inputs)
    if skipped:
        shown = ", ".join(_shown_path(path) for path in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        print(f"{PROG}: skipped {len(skipped)} files that are not images: {shown}", file=sys.stderr)
    predictor = load_predictor(args.model, trust=args.trust_model)
    files = _readable_images(files, predictor.image_shape)
    predictions = predictor.predict_files(files, k=args.top_k, batch_size=args.batch_size)
    for path, ranked in predictions:
        print(f"{_shown_path(path)}: " + ", ".join(f"{name} {probability:.4f}" for name, probability in ranked))
    if args.csv:
        print(f"predictions written to {_shown_path(write_csv(predictions, args.csv))}")
    return 0


def _readable_images(files, image_shape):
    """The files that decode (checked as ``from_folder`` checks training images); on stderr, one line
    naming the others and one when images are resized to the model's size (upright, as EXIF says)."""
    from PIL import Image

    from cnnkit.data.folder import check_image

    height, width, channels = image_shape
    readable, unreadable, other_sizes = [], [], {}
    for path in files:
        reason = check_image(path, pil_mode="L" if channels == 1 else "RGB")[1]
        if reason:
            unreadable.append(f"{_shown_path(path)} ({reason})")
            continue
        readable.append(path)
        with Image.open(path) as image:  # the header only
            size = image.size[::-1] if image.getexif().get(0x0112) in (5, 6, 7, 8) else image.size  # turned 90
        if size != (width, height):
            other_sizes[size] = other_sizes.get(size, 0) + 1
    if unreadable:
        shown = "; ".join(unreadable[:5]) + ("; ..." if len(unreadable) > 5 else "")
        print(f"{PROG}: skipped {len(unreadable)} unreadable images: {shown}", file=sys.stderr)
    if not readable:
        raise ValueError(f"none of the {len(files)} images could be read")
    if other_sizes:
        sizes = ", ".join(f"{w}x{h}" for w, h in list(other_sizes)[:5]) + (", ..." if len(other_sizes) > 5 else "")
        squashed = any(w * height != h * width for w, h in other_sizes)
        print(f"{PROG}: resized {sum(other_sizes.values())} images to the model's {width}x{height} (from {sizes}"
              f"{'; aspect ratio not kept' if squashed else ''})", file=sys.stderr)
    return readable


def _add_tune(commands) -> None:
    """The ``tune`` subcommand (``cnnkit.tuner.search``)."""
    tune = commands.add_parser(
        "tune",
        help="run a hyperparameter search from a search-space file",
        description="Run a Keras Tuner search from a search-space file (a path, or the name of a packaged one in "
        "tuner/). key=value arguments override its keys (max_trials=5, epochs=2, space.hyperparameters.k1=[3,5]). "
        "Prints a line per trial and a final table; writes trials.csv, best_recipe.yaml and sensitivity.png to "
        "the search directory. Run the same command again to resume an interrupted search. With --role, one "
        "search runs on several processes or hosts sharing the search directory: one chief serves it to any number "
        "of workers (see docs/SCALING.md); a worker that dies has its trial given to another.",
    )
    tune.add_argument("space", metavar="FILE_OR_NAME", help="a search-space .yaml file or a packaged space name")
    tune.add_argument("overrides", metavar="key=value", nargs="*", help="override a key of the file")
    tune.add_argument("--role", choices=["chief", "worker"], default=None,
                      help="distributed search: the chief serves trials and records them, workers train them "
                      "(default: one process, or Keras Tuner's KERASTUNER_* environment variables)")
    tune.add_argument("--oracle-address", default=None, metavar="HOST:PORT",
                      help="where the chief listens and workers call (default 127.0.0.1:8000: this host only)")
    tune.add_argument("--worker-id", default=None, metavar="NAME",
                      help="a worker's name, unique in the search (default <host>-<pid>)")
    tune.add_argument("--worker-timeout", type=float, default=None, metavar="SECONDS",
                      help="a worker silent this long has its trial given to another (default 60; same on all)")
    tune.set_defaults(handler=_cmd_tune)


def _cmd_tune(args) -> int:
    from cnnkit.config import load_recipe
    from cnnkit.tuner import SearchError

    recipe = load_recipe(args.space, args.overrides, kind="tuner")
    for key in ("role", "oracle_address", "worker_id", "worker_timeout"):
        if getattr(args, key, None) is not None:
            recipe.kwargs[key] = getattr(args, key)
    print(f"{PROG}: searching {recipe.name} ({recipe.qualname}) from {recipe.path}", flush=True)
    try:
        result = _run_recipe(recipe)
    except (SearchError, ImportError, OSError) as error:
        if os.environ.get("CNNKIT_DEBUG", "").strip() not in ("", "0"):
            raise
        print(f"{PROG}: error: {_error_message(error)}", file=sys.stderr)
        return 2
    if "best_recipe" in result.files:
        print(f"train the best configuration: {PROG} run {shlex.quote(str(result.files['best_recipe']))}")
    return 0


def _add_data(commands) -> None:
    """The ``data audit`` subcommand (``cnnkit.data.audit``)."""
    data = commands.add_parser("data", help="inspect image folders", description="Inspect image folders.")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    audit = actions.add_parser(
        "audit",
        help="check a class-per-subfolder image folder: counts, unusable files, duplicates, leakage",
        description="Audit a folder with one subfolder per class (and its test folder): images per class, files "
        "that cannot be used (with the reason), files left out by their extension, and exact duplicates (identical "
        "bytes, SHA-256) within a class, across classes (conflicting labels) and across train and test (leakage). "
        "Exit status: 0 clean, 1 problems found, 2 usage error (e.g. a missing folder).",
    )
    audit.add_argument("path", metavar="PATH", help="folder with one subfolder of images per class")
    audit.add_argument("--test-path", default=None, metavar="P", help="the test folder, same layout")
    audit.add_argument("--extensions", type=_extensions, default=None, metavar=".png,.jpg",
                       help="comma-separated file endings to include, as from_folder's extensions= (default: "
                       "its default); the files left out by their extension are counted")
    audit.add_argument("--max-pixels", type=_positive_int, default=None, metavar="N",
                       help="largest width * height accepted, as from_folder's max_pixels= (default: its default)")
    audit.add_argument("--json", action="store_true", help="print the report as JSON")
    audit.set_defaults(handler=_cmd_data_audit)


def _extensions(text: str) -> tuple[str, ...]:
    """``".png, .webp"`` -> ``(".png", ".webp")``; an argparse type (``audit`` refuses an empty ending)."""
    return tuple(part.strip() for part in text.split(","))


def _cmd_data_audit(args) -> int:
    import json

    from cnnkit.data import audit
    from cnnkit.data.folder import DEFAULT_EXTENSIONS, MAX_IMAGE_PIXELS

    report = audit(args.path, test_path=args.test_path, extensions=args.extensions or DEFAULT_EXTENSIONS,
                   max_pixels=args.max_pixels or MAX_IMAGE_PIXELS)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text(shown=_shown_path))
    return 0 if report.clean else 1


def _add_report_and_visualize(commands) -> None:
    """The ``report`` and ``visualize`` subcommands (``cnnkit.html_report``, ``cnnkit.visualize``)."""
    report = commands.add_parser(
        "report",
        help="write report.html of a run directory (or a search directory)",
        description="Write a self-contained report.html into a run directory: metrics, confusion matrix, training "
        "curves with a diagnosis, the most confident mistakes, first-layer kernels, feature maps, Grad-CAM and the "
        "layer table. Test images come from --data, else the run's own data. A search directory (with search.yaml) "
        "gets its trials table and sensitivity plot instead.",
    )
    report.add_argument("path", metavar="RUN", help="a run directory, a .keras file or a search directory")
    report.add_argument("--data", default=None, metavar="NAME", help="test data (default: the run's recorded data)")
    report.add_argument("--out", default=None, metavar="FILE",
                        help="the HTML file (default RUN/report.html; for a .keras file, <stem>.html beside it)")
    report.add_argument("--examples", type=_positive_int, default=None, metavar="N",
                        help="mistakes and Grad-CAM images (default 8)")
    report.set_defaults(handler=_cmd_report)

    visualize = commands.add_parser(
        "visualize",
        help="draw kernels, feature maps, filter patterns or Grad-CAM of a model as a PNG",
        description="Draw what a model (a run directory or .keras file) has learned: its kernels, the feature maps "
        "of an image, the patterns that excite its filters most (activation maximisation), or a Grad-CAM map of "
        "where the evidence for a class lies in an image.",
    )
    visualize.add_argument("what", choices=["kernels", "feature-maps", "filters", "grad-cam"])
    visualize.add_argument("model", metavar="MODEL", help="a run directory or a .keras file")
    visualize.add_argument("image", metavar="IMAGE", nargs="?", help="an image file (feature-maps, grad-cam)")
    visualize.add_argument("--out", required=True, metavar="PNG", help="the PNG to write")
    visualize.add_argument("--layer", default=None, help="layer name (default: first or last convolution)")
    visualize.add_argument("--filters", type=_positive_int, default=16, metavar="N", help="filters: how many")
    visualize.add_argument("--steps", type=_positive_int, default=64, metavar="N", help="filters: ascent steps")
    visualize.add_argument("--class", dest="class_", default=None, metavar="NAME",
                           help="grad-cam: the class (name or index; default the predicted one)")
    visualize.set_defaults(handler=_cmd_visualize)


def _cmd_report(args) -> int:
    from cnnkit.html_report import write_report, write_search_report

    if (Path(args.path) / "search.yaml").is_file():
        given = [option for option, value in (("--data", args.data), ("--examples", args.examples)) if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} apply to a run's report; {args.path} is a search directory")
        path = write_search_report(args.path, out=args.out, strict=True)
    else:
        path = write_report(args.path, data=args.data, out=args.out, strict=True,
                            **({"examples": args.examples} if args.examples else {}))
    print(f"report written to {path}")
    return 0


def _cmd_visualize(args) -> int:
    import cnnkit
    from cnnkit import visualize
    from cnnkit.inference import keras_predictor

    run = cnnkit.load(args.model)
    image = None
    if args.what in ("feature-maps", "grad-cam"):
        if not args.image:
            raise ValueError(f"'visualize {args.what}' needs an IMAGE file. Received: no image")
        image = keras_predictor(run.model, class_names=run.class_names).load_images([args.image])[0]
    if args.what == "kernels":
        visualize.kernels(run.model, args.layer, save=args.out)
    elif args.what == "feature-maps":
        visualize.feature_maps(run.model, image, None if args.layer is None else [args.layer], save=args.out)
    elif args.what == "filters":
        visualize.filter_patterns(run.model, args.layer, args.filters, steps=args.steps, save=args.out)
    else:
        names = run.class_names
        index = None
        if args.class_ is not None:
            if args.class_ not in names and not args.class_.isdigit():
                raise ValueError(f"--class must be a class name or index. Received: {args.class_!r}; classes: {names}")
            index = names.index(args.class_) if args.class_ in names else int(args.class_)
        probabilities = run.predict(image)[0]
        index = int(probabilities.argmax()) if index is None else index
        visualize.grad_cam(run.model, image, class_index=index, layer=args.layer, save=args.out)
        print(f"{args.image}: class {names[index]} (probability {probabilities[index]:.4f})")
    print(f"{args.what} written to {args.out}")
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Print a warning as one line, ``cnnkit: warning: <message>``, not Python's ``file:line: UserWarning:`` form."""
    print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr if file is None else file)


def _error_message(error: BaseException) -> str:
    """One line for the user: the message without the exception class, newlines folded."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        text = f"{error.strerror}: {error.filename}"
    elif isinstance(error, KeyError) and len(error.args) == 1:
        text = str(error.args[0])
    else:
        text = str(error) or type(error).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _unreadable_image(error: BaseException) -> str | None:
    """The line naming an image file that failed to decode inside ``tf.data``, for an op error
    raised by one (``from_folder`` with ``verify=False``); else ``None``."""
    tf = sys.modules.get("tensorflow")
    if tf is None or not isinstance(error, tf.errors.OpError):
        return None
    found = re.search(r"cannot decode image file [^\n]*", error.message)
    return found.group(0) if found else None


def main(argv=None) -> int:
    """Run the ``cnnkit`` command line.

    Args:
        argv: the arguments after the program name (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for a usage error or an error the user can fix (bad
        notation, unknown or invalid recipe, a missing, unreadable or unwritable file, a run file
        that does not parse), which is printed as one line
        ``cnnkit: error: <message>`` on stderr; 3 when training diverged (NaN loss: the message
        names the epoch, the step and the checkpoint kept); 1, silently, when the reader of stdout closed it
        (``cnnkit plan ... | head -1``). ``--help`` and ``--version`` return 0. Warnings are printed as
        one line each, ``cnnkit: warning: <message>``.
        With ``CNNKIT_DEBUG=1`` in the environment such errors are raised instead.

    Example:
        >>> main(["plan", "FC16", "--input-shape", "28,28,1", "--classes", "10"])  # doctest: +SKIP
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors (2), --help / --version (0)
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    import yaml

    from cnnkit.config import ConfigError
    from cnnkit.runs import DirectoryInUse, TrainingDiverged
    from cnnkit.spec import SpecError

    try:
        with warnings.catch_warnings():  # the filters stay as they are; only the display is ours
            warnings.showwarning = _show_warning
            status = args.handler(args)
        sys.stdout.flush()  # a reader that closed the pipe (| head) fails here, inside the try
        return status
    except BrokenPipeError:  # stop quietly, as Python's documentation (signal module, SIGPIPE) advises
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for the flush at exit
        return 1
    except (SpecError, ConfigError, ValueError, OSError, yaml.YAMLError, DirectoryInUse) as error:  # OSError: "strerror: file"
        if os.environ.get("CNNKIT_DEBUG", "").strip() not in ("", "0"):
            raise
        print(f"{PROG}: error: {_error_message(error)}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"{PROG}: {_error_message(error)}", file=sys.stderr)
        return 3
    except Exception as error:
        unreadable = _unreadable_image(error)
        if unreadable is None or os.environ.get("CNNKIT_DEBUG", "").strip() not in ("", "0"):
            raise
        print(f"{PROG}: error: {unreadable}; it was not checked when the folder was read (verify: false), "
              "or it changed since", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
