"""``dira3d export``: TorchScript / ONNX of a fine-tuned bundle, pretrained weights, MONAI Label app.

Examples::

    dira3d export torchscript --bundle bundles/lits_liver_seg
    dira3d export torchscript --bundle luna16_nodule_fpr      # a name works as for dira3d finetune
    dira3d export onnx --bundle montgomery_lung_seg --out m.onnx --checkpoint runs/ft/m/models/model.pt \\
        --override backbone=resnet10 --override "decoder_channels=[16,16,8,8,8]" --override "roi_size=[64,64]"  # --tiny
    dira3d export onnx --bundle bundles/lits_liver_seg --out liver.onnx --check-scan ct.nrrd
    dira3d export torchscript --bundle bundles/lits_liver_seg --out liver.ts --check-scan ct.nrrd
    dira3d export pretrained --checkpoint runs/dira/best.pt --out weights/ --parts encoder decoder
    dira3d export monailabel-app --out ~/dira3d-app      # prints the start command
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dira3d.utils.cli_help import DefaultsHelpFormatter
from dira3d.utils.overrides import parse_value, shell_word

__all__ = ["main", "parse_overrides"]


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["width=0.125", "roi_size=[32,32,16]"]`` → ``{"width": 0.125, "roi_size": [32, 32, 16]}`` (values read by :func:`dira3d.utils.overrides.parse_value`).

    Raises:
        ValueError: an item without ``=``.
    """
    result: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--override {item!r} must look like id=value, e.g. width=0.125")
        key, value = item.split("=", 1)
        result[key] = parse_value(value)
    return result


def _tolerance(text: str) -> float:
    """``--tolerance``: a number >= 0 (a negative one would refuse every graph)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0 (max |logit difference| per unit of logit "
                                         "scale, e.g. 1e-4)")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dira3d export", description="deployment exports of dira3d models", formatter_class=DefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)

    def bundle_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--bundle", required=True,
                       help="bundle folder (configs/, models/model.pt) or name, e.g. luna16_nodule_fpr (as for dira3d finetune)")
        p.add_argument("--checkpoint", help="weights (default <bundle>/models/model.pt)")
        p.add_argument("--override", "--set", action="append", metavar="ID=VALUE",
                       help="config override (repeatable); the settings the weights were trained with, e.g. width=0.125 "
                            "(3D --tiny) or backbone=resnet10, decoder_channels=[16,16,8,8,8], roi_size=[64,64] (2D --tiny); "
                            "torchscript: _meta_#ID=VALUE sets a field of the embedded metadata.json, e.g. _meta_#version=0.2.0")
        p.add_argument("--input-shape", type=int, nargs="+",
                       help="example input B C X Y Z (2D bundles: B C X Y), B >= 1, C the bundle's in_channels, each size "
                            "a multiple of the network's downsampling (8 for the 3D U-Net, 32 for the 2D ResNets) "
                            "(default 1 C roi_size)")

    def check_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--check-scan", help="a CT scan whose central crop is used for the agreement check "
                                            "(default a random input of the example shape)")
        p.add_argument("--tolerance", type=_tolerance, default=None,
                       help="max |logit difference| accepted, per unit of max(1, max |logit|) (default 1e-4)")

    ts = sub.add_parser("torchscript", help="model.ts via monai.bundle ckpt_export (checked against PyTorch)",
                        formatter_class=DefaultsHelpFormatter)
    bundle_args(ts)
    ts.add_argument("--out", help="output file (default <bundle>/models/model.ts)")
    ts.add_argument("--overwrite", action="store_true", help="replace an existing --out (an earlier export)")
    check_args(ts)
    onnx = sub.add_parser("onnx", help="ONNX graph (checked against PyTorch with onnxruntime)", formatter_class=DefaultsHelpFormatter)
    bundle_args(onnx)
    onnx.add_argument("--out", required=True, help="output .onnx file")
    onnx.add_argument("--overwrite", action="store_true", help="replace an existing --out (an earlier export)")
    check_args(onnx)
    pre = sub.add_parser("pretrained", help="encoder/decoder as state_dict + safetensors + key_map.json", formatter_class=DefaultsHelpFormatter)
    pre.add_argument("--checkpoint", required=True,
                     help="dira3d pretraining checkpoint, or a fine-tuned models/model.pt (parts encoder, decoder or fc)")
    pre.add_argument("--out", required=True, help="output folder")
    pre.add_argument("--parts", nargs="+", default=["encoder", "decoder"])
    pre.add_argument("--overwrite", action="store_true", help="replace the files of an earlier export in --out")
    app = sub.add_parser("monailabel-app", help="copy the MONAI Label app and print its start command", formatter_class=DefaultsHelpFormatter)
    app.add_argument("--out", required=True, help="new folder for the app")
    app.add_argument("--bundles", default=None, help="bundle folder(s) to serve (default <repo>/bundles)")
    app.add_argument("--studies", default=None,
                     help="the folder of scans the server lists and infers on (named in the printed start command)")
    app.add_argument("--build-env", action="store_true", help="also build the MONAI Label environment")
    sub.metavar = "{" + ",".join(sub.choices) + "}"  # as argparse shows it, and what a missing one's error names, not 'what'
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``dira3d export <what>``; returns the exit code (1 when an agreement check fails)."""
    from dira3d.utils.atomic import FolderNotWritableError

    from dira3d.utils.interrupts import WrittenFiles, interrupt_exit_code, interrupted_word, sigterm_as_interrupt

    args = _parser().parse_args(argv)
    out = _output_of(args)
    written = WrittenFiles(*([out] if out else []))
    try:
        with sigterm_as_interrupt():  # SIGTERM as Ctrl-C: the same one line, exit 143
            return _run(args)
    except (FileNotFoundError, ValueError, FileExistsError, ImportError, RuntimeError, FolderNotWritableError) as err:
        print(f"dira3d export: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: what was written, in one line, not a traceback
        print(f"dira3d export: {interrupted_word(err)}; {interrupted_message(args.what, out, written.since())}",
              file=sys.stderr)
        return interrupt_exit_code(err)


def _export_model(args: argparse.Namespace) -> int:
    """``dira3d export torchscript / onnx``. Every refusal (``--out`` exists, a missing ``--check-scan``, checkpoint or
    bundle, weights that do not fit) comes before the scan is read; the graph is checked against the PyTorch network
    before it is renamed into place, so a disagreement exits 1 with the report and leaves an earlier export as it was."""
    from dira3d.deploy.export_checks import check_model_export

    overrides = parse_overrides(args.override)
    fields = [key for key in overrides if key.startswith("_meta_")]
    if args.what == "onnx" and fields:  # an ONNX file holds no metadata.json: the override would change nothing
        raise ValueError(f"--override {fields[0]}: an ONNX export holds no metadata.json to set it in (only a "
                         "TorchScript export embeds one); export with `dira3d export torchscript`, or leave the "
                         "_meta_ override out")
    # the refusals that need no torch (unknown bundle, --out exists, missing --check-scan or weights, an --input-shape
    # the network cannot take) before it loads
    check_model_export(args.bundle, args.out, args.checkpoint, args.overwrite, args.check_scan,
                       input_shape=args.input_shape, overrides=overrides)
    from dira3d.deploy.export import DEFAULT_TOLERANCE, AgreementError

    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance  # 0 (exact) is a tolerance too
    try:
        if args.what == "torchscript":
            from dira3d.deploy.export import export_torchscript_with_report

            out, report = export_torchscript_with_report(
                args.bundle, args.out, args.checkpoint, args.input_shape, overrides=overrides, overwrite=args.overwrite,
                tolerance=tolerance, check_scan=args.check_scan)
        else:
            out, report = _export_onnx(args, overrides, tolerance)
    except AgreementError as err:  # nothing written: the report, and the line saying so
        print(err.report.to_json())
        print(f"dira3d export: error: {err}", file=sys.stderr)
        return 1
    print(f"{'TorchScript' if args.what == 'torchscript' else 'ONNX'} written to {out}\n{report.to_json()}")
    return 0


def _export_onnx(args: argparse.Namespace, overrides: dict[str, Any], tolerance: float) -> tuple[Path, Any]:
    """The bundle's network to ``--out`` (:func:`~dira3d.deploy.export.export_onnx_with_report`), refusals first."""
    import torch

    from dira3d.deploy.bundle_network import load_bundle_network
    from dira3d.deploy.export import (
        bundle_example_shape,
        export_onnx_with_report,
        scan_patch,
    )

    # --out, --check-scan (read last, once the network is built) and the weights were checked (check_model_export)
    network = load_bundle_network(args.bundle, args.checkpoint, overrides=overrides)
    # the bundle's own input (1, in_channels, *roi_size), as for torchscript: a fixed 3D shape
    # would not fit the 2D bundles (or a 3D bundle of another roi_size)
    shape = bundle_example_shape(args.bundle, args.input_shape, overrides=overrides, checkpoint=args.checkpoint)
    # seeded as export_torchscript's default example: the same check on every run
    example = (scan_patch(args.check_scan, shape[2:]) if args.check_scan
               else torch.rand(*shape, generator=torch.Generator().manual_seed(0)))
    return export_onnx_with_report(network, example, args.out, overwrite=args.overwrite, tolerance=tolerance)


def _output_of(args: argparse.Namespace) -> Path | None:
    """Where ``dira3d export <what>`` writes: ``--out``, or for ``torchscript`` without it the bundle's
    ``models/model.ts`` (None when the bundle cannot be found: the export names the problem)."""
    if getattr(args, "out", None):
        return Path(args.out)
    from dira3d.evaluation.finetune import bundle_path

    try:
        return bundle_path(args.bundle, "inference.json") / "models" / "model.ts"
    except FileNotFoundError:
        return None


def interrupted_message(what: str, out: Path | None, written: list[Path]) -> str:
    """What an interrupted ``dira3d export <what>`` wrote to ``out`` (``written``: the files new or changed there).
    The model files are written whole under a temporary name, checked, and renamed, so an earlier export stays as it
    was, and a model file that was renamed into place is whole and checked."""
    if not written:
        return f"nothing was written{f' to {out}' if out else ''}"
    if what in ("torchscript", "onnx"):
        return f"{out} was written (whole, and checked against PyTorch) before it stopped"
    if what == "monailabel-app":
        return (f"the app folder {out} is incomplete ({len(written)} file(s) written); remove it, or choose another "
                "--out, and rerun")
    names = ", ".join(p.name for p in written[:3]) + (f" and {len(written) - 3} more" if len(written) > 3 else "")
    return f"{names} written to {out} before it stopped, an unfinished export: rerun with --overwrite"


def _run(args: argparse.Namespace) -> int:
    if args.what in ("torchscript", "onnx"):
        return _export_model(args)
    if args.what == "pretrained":
        from dira3d.deploy.export_checks import check_pretrained_export

        # a missing --checkpoint, or an --out with an earlier export, before torch loads (export_pretrained checks again)
        check_pretrained_export(args.checkpoint, args.out, args.parts, given_by="--checkpoint", overwrite=args.overwrite)
        from dira3d.deploy.weights import export_pretrained

        for name, path in export_pretrained(args.checkpoint, args.out, args.parts, given_by="--checkpoint",
                                                 overwrite=args.overwrite).items():
            print(f"{name}: {path}")
        return 0
    from dira3d.deploy.monailabel import REPO_ROOT, default_venv, ensure_monailabel_env, find_bundles, prepare_app

    bundles = args.bundles or str(REPO_ROOT / "bundles")
    # the app reads --conf bundles only when the server starts: check the path(s) now, before copying
    if not find_bundles(bundles, require_weights=False, given_by="--bundles"):
        raise FileNotFoundError(f"--bundles {bundles} holds no bundle (configs/inference.json); "
                                "pass a bundle folder or a folder of bundles")
    from dira3d.utils.atomic import removed_if_failed

    with removed_if_failed(args.out):  # an app without its environment (--build-env failed or stopped) goes too
        app = prepare_app(args.out)  # checks that --out can be written before copying
        venv = ensure_monailabel_env() if args.build_env else default_venv()
    # absolute paths, each one shell word: the command works pasted in any folder (a relative --out or --bundles, or
    # a path with a space, gave a command that failed there)
    studies = shell_word(str(Path(args.studies).resolve())) if args.studies else "<studies folder>"
    served = ",".join(str(Path(b).expanduser().resolve()) for b in bundles.split(",") if b.strip())
    print(f"MONAI Label app copied to {app}. Start it with:\n"
          f"  PYTHONPATH={shell_word(str(REPO_ROOT))} {shell_word(str(Path(venv) / 'bin' / 'python'))} -m monailabel.main "
          f"start_server --app {shell_word(str(Path(app).resolve()))} --studies {studies} --conf bundles "
          f"{shell_word(served)} --host 127.0.0.1 --port 8000")
    if args.studies and not Path(args.studies).is_dir():
        print(f"note: --studies {args.studies} is not a folder (yet): the server would start with no scan to list; put "
              "the scans there (NIfTI, NRRD, DICOM folders) or pass the folder that holds them")
    if not find_bundles(bundles):
        print(f"note: no bundle under {bundles} has weights (models/model.pt or model.ts) yet; the server "
              "serves only bundles with weights")
    if not args.build_env and not (Path(venv) / "bin" / "python").exists():
        print(f"(build the environment first: bash {REPO_ROOT / 'dira3d' / 'deploy' / 'monailabel_env.sh'})")
    return 0
