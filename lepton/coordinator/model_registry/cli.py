"""``lepton models ls|show|import|quantize|deploy``: the model registry from the command line.

The main CLI mounts these with :func:`add_commands` (which makes
:func:`run_models_command` the handler of every ``models`` command); ``python -m
lepton.coordinator.model_registry.cli`` runs them on their own. Every command works directly on a
data directory and a database URL: ``--data-dir`` (``$LEPTON_DATA_DIR``, default
``var/coordinator``) and ``--database-url`` (``$LEPTON_DATABASE_URL``, default the SQLite file
``coordinator.db`` in the data directory), the coordinator's own settings.

``deploy`` is the exception: deploying needs the running coordinator (it submits tasks that
its scheduler places), so it asks its HTTP API (``--api URL`` or ``$LEPTON_API``, as the
other ``lepton`` commands do) to deploy a version to the chosen devices
(:mod:`lepton.coordinator.model_registry.deploy`).

Exit codes (coordinator/cli/exitcodes.py): 0 done, 1 not found or invalid input, 6 the INT8
model failed the accuracy gate; ``deploy``: 2 usage, 3 no such model version or device, 4
the coordinator did not answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lepton.common.errors import LeptonError
from lepton.coordinator.cli.client import CliError, client_of, client_options
from lepton.coordinator.cli.exitcodes import EXIT_ERROR, EXIT_GATE_FAILED, EXIT_OK, EXIT_USAGE
from lepton.coordinator.model_registry.errors import AccuracyGateError

DEFAULT_DATA_DIR = "var/coordinator"
_SUFFIX_FORMATS = {".onnx": "onnx", ".tflite": "tflite", ".pt": "torch", ".pth": "torch"}

Handler = Callable[[argparse.Namespace], int]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("LEPTON_DATA_DIR", DEFAULT_DATA_DIR),
        help="coordinator data directory holding blobs/ (env LEPTON_DATA_DIR)",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("LEPTON_DATABASE_URL", ""),
        help="SQLAlchemy URL (env LEPTON_DATABASE_URL; default sqlite in the data directory)",
    )


def add_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``models`` with its sub-commands to an ``add_subparsers()`` object."""
    from lepton.coordinator.model_registry.quantize import CALIBRATION_METHODS
    from lepton.coordinator.model_registry.registry import FORMATS, PRECISIONS

    models: argparse.ArgumentParser = subparsers.add_parser(
        "models", help="model registry and INT8 quantization"
    )
    models.set_defaults(handler=run_models_command)
    sub = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")

    ls = sub.add_parser("ls", help="list registered model versions")
    _common(ls)
    ls.add_argument("name", nargs="?", help="only versions of this model")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(models_handler=cmd_ls)

    show = sub.add_parser("show", help="metadata of one model version (latest by default)")
    _common(show)
    show.add_argument("name")
    show.add_argument("--version", type=int)
    show.add_argument("--precision", choices=PRECISIONS)
    show.add_argument("--format", choices=FORMATS, dest="model_format")
    show.set_defaults(models_handler=cmd_show)

    imp = sub.add_parser("import", help="store a model file as the next version of a name")
    _common(imp)
    imp.add_argument("path", type=Path)
    imp.add_argument("--name", required=True)
    imp.add_argument("--precision", required=True, choices=PRECISIONS)
    imp.add_argument(
        "--format",
        choices=FORMATS,
        dest="model_format",
        help="default: from the file suffix (.onnx, .tflite, .pt)",
    )
    imp.add_argument("--parent-version", type=int)
    imp.add_argument("--accuracy-fp32", type=float, help="fraction in [0, 1]")
    imp.add_argument("--accuracy-int8", type=float, help="fraction in [0, 1]")
    imp.add_argument("--eval-samples", type=int)
    imp.set_defaults(models_handler=cmd_import)

    q = sub.add_parser(
        "quantize", help="quantize a registered FP32 ONNX model to INT8, publish if within the gate"
    )
    _common(q)
    q.add_argument("name")
    q.add_argument("--version", type=int, help="FP32 version (default: the latest)")
    q.add_argument(
        "--calibration",
        required=True,
        help="PATH.npz (array x) or package.module:attr (iterable/callable of batches)",
    )
    q.add_argument(
        "--eval",
        required=True,
        dest="eval_set",
        type=Path,
        help="evaluation set: .npz with arrays x and y",
    )
    q.add_argument("--method", choices=CALIBRATION_METHODS, default="minmax")
    q.add_argument("--gate", type=float, default=1.0, help="max accuracy drop in points")
    q.add_argument("--per-tensor", action="store_true", help="per-tensor weights")
    q.add_argument("--activation-type", choices=("int8", "uint8"), default="uint8")
    q.add_argument(
        "--full-range",
        action="store_true",
        help="8-bit weights (default 7-bit: no saturation in ORT's x86 U8S8 kernels)",
    )
    q.add_argument("--quant-format", choices=("qdq", "qoperator"), default="qdq")
    q.add_argument("--batch-size", type=int, default=32, help="calibration batch size (.npz)")
    q.add_argument("--max-batches", type=int, help="read at most this many calibration batches")
    q.add_argument("--json", action="store_true", help="print the full report as JSON")
    q.set_defaults(models_handler=cmd_quantize)
    _add_deploy(sub, PRECISIONS)
    return models


def _add_deploy(sub: Any, precisions: Sequence[str]) -> None:
    dep = sub.add_parser(
        "deploy",
        help="deploy a model version to devices (through the running coordinator)",
        description="One deploy task per chosen device, placed and retried like any task. "
        "Every given criterion must hold; without --device, the online devices are chosen.",
    )
    dep.add_argument("model", metavar="NAME[:VERSION]", help="default: the latest servable")
    dep.add_argument("--precision", choices=precisions, help="the latest of this precision")
    dep.add_argument("--class", dest="device_class", metavar="C", help="devices of this class")
    dep.add_argument("--tag", metavar="T", help="devices with this tag")
    dep.add_argument(
        "--device",
        dest="device_ids",
        action="append",
        default=[],
        metavar="ID",
        help="this device (repeatable; taken whatever its state)",
    )
    dep.add_argument("--max-attempts", type=int)
    dep.add_argument("--expires-in", type=float, help="start deadline, seconds from now")
    client_options(dep)
    dep.set_defaults(models_handler=cmd_deploy)


def open_registry(args: argparse.Namespace) -> Any:
    """The :class:`ModelRegistry` the command's ``--data-dir``/``--database-url`` name."""
    from sqlalchemy import create_engine

    from lepton.coordinator.model_registry import tables
    from lepton.coordinator.model_registry.registry import ModelRegistry
    from lepton.coordinator.store import migrations

    data_dir = Path(args.data_dir).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    url = args.database_url or f"sqlite:///{data_dir.resolve() / 'coordinator.db'}"
    engine = create_engine(url)
    # The coordinator's database: an empty one gets the whole schema, at head, as the
    # coordinator's start-up would make it; one at another revision is refused.
    migrations.prepare(engine, require=tables.metadata)
    return ModelRegistry(engine, data_dir, create_tables=False)


def _short(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.2f}"


def cmd_ls(args: argparse.Namespace) -> int:
    records = open_registry(args).list(args.name)
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2))
        return 0
    rows = [
        (
            "NAME",
            "VER",
            "FORMAT",
            "PREC",
            "SIZE",
            "PARAMS",
            "FLOPS",
            "ACC32",
            "ACC8",
            "PARENT",
            "DIGEST",
        )
    ]
    rows += [
        (
            r.name,
            str(r.version),
            r.format,
            r.precision,
            _short(r.size),
            _short(r.param_count),
            _short(r.flops),
            _pct(r.accuracy_fp32),
            _pct(r.accuracy_int8),
            str(r.parent_version or "-"),
            r.digest[:12],
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    record = open_registry(args).get(
        args.name, args.version, precision=args.precision, format=args.model_format
    )
    print(json.dumps(record.to_dict(), indent=2))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    fmt = args.model_format or _SUFFIX_FORMATS.get(args.path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the format of {args.path.name}; pass --format")
    record = open_registry(args).import_file(
        args.path,
        name=args.name,
        format=fmt,
        precision=args.precision,
        parent_version=args.parent_version,
        accuracy_fp32=args.accuracy_fp32,
        accuracy_int8=args.accuracy_int8,
        eval_samples=args.eval_samples,
    )
    print(
        f"{record.name} v{record.version} {record.format}/{record.precision} "
        f"sha256:{record.digest} ({record.size} bytes)"
    )
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from lepton.coordinator.model_registry.calibration import load_eval_set, load_source
    from lepton.coordinator.model_registry.quantize import (
        QuantizationConfig,
        publish,
        quantize_model,
    )

    registry = open_registry(args)
    parent = registry.get(args.name, args.version, precision="fp32", format="onnx")
    config = QuantizationConfig(
        calibration=args.method,
        gate_points=args.gate,
        per_channel=not args.per_tensor,
        activation_type=args.activation_type,
        quant_format=args.quant_format,
        reduce_range=not args.full_range,
        max_calibration_batches=args.max_batches,
    )
    source = load_source(args.calibration, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory(prefix="lepton-quant-") as tmp:
        result = quantize_model(
            registry.blob_path(parent.digest),
            calibration=source,
            evaluation=load_eval_set(args.eval_set),
            out_dir=tmp,
            stem=parent.name,
            config=config,
        )
        published = publish(registry, result, name=parent.name)
    report = result.report
    if args.json:
        print(
            json.dumps(
                {
                    "fp32": published.fp32.to_dict(),
                    "int8": published.int8.to_dict(),
                    "report": report.to_dict(),
                },
                indent=2,
            )
        )
    else:
        print(
            f"{parent.name} v{published.int8.version} int8 (from v{parent.version}): "
            f"accuracy {report.accuracy_fp32 * 100:.2f} -> {report.accuracy_int8 * 100:.2f} % "
            f"(drop {report.drop_points:.2f} points, gate {report.gate_points:.2f}), "
            f"{report.size_fp32} -> {report.size_int8} bytes, "
            f"p50 {report.latency_fp32.p50_ms:.3f} -> {report.latency_int8.p50_ms:.3f} ms"
        )
    return 0


def parse_model_ref(text: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME:VERSION`` (names never hold a colon)."""
    name, sep, version = text.partition(":")
    if not name or (sep and not version.isdigit()) or (sep and int(version) < 1):
        raise CliError(f"want NAME or NAME:VERSION (VERSION >= 1), got {text!r}", EXIT_USAGE)
    return name, int(version) if sep else None


def cmd_deploy(args: argparse.Namespace) -> int:
    from lepton.protocol import routes

    name, version = parse_model_ref(args.model)
    optional = {
        "version": version,
        "precision": args.precision,
        "device_class": args.device_class,
        "tag": args.tag,
        "max_attempts": args.max_attempts,
        "expires_in_s": args.expires_in,
    }
    body: dict[str, Any] = {k: v for k, v in optional.items() if v is not None}
    if args.device_ids:
        body["device_ids"] = args.device_ids
    api = client_of(args)
    with api:
        done = api.post(routes.path(routes.MODEL_DEPLOY, name=name), body)
    if getattr(args, "json", False):
        print(json.dumps(done, indent=2, sort_keys=True))
        return EXIT_OK
    m = done["model"]
    print(
        f"{m['name']} v{m['version']} {m['format']}/{m['precision']} "
        f"({m['size']} bytes): {len(done['tasks'])} deploy tasks"
    )
    for task in done["tasks"]:
        print(f"{task['id']}  {task['pinned_device']}")
    return EXIT_OK


def run_models_command(args: argparse.Namespace) -> int:
    """Run a parsed ``models`` command; errors are reported on stderr as an exit code."""
    handler: Handler = args.models_handler
    try:
        return handler(args)
    except AccuracyGateError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        print(json.dumps(exc.report.to_dict(), indent=2), file=sys.stderr)
        return EXIT_GATE_FAILED
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except (LeptonError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lepton")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return run_models_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
