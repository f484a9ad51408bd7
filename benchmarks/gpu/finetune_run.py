"""Two fine-tuning bundles end to end, as a user runs them: ``dira3d finetune --bundle lits_liver_seg`` on a prepared
datalist (default network, ``train.json`` as it is), the same command rerun to a higher ``max_epochs`` (refused), that
rerun with ``--overwrite`` from a pretrained checkpoint (``--pretrained``), then batch inference with the bundle's
``inference.json`` on raw (HU) test scans with the model of that run; then ``luna16_nodule_fpr`` (the classification
side: default network, 2 epochs on candidate cubes, ``inference.json`` on the test cubes).

Fine-tuning has no resume (docs/finetuning.md, "Running again"): the rerun must be refused in one line with the earlier
model left as it was, and the rerun with ``--overwrite`` must start again from epoch 1 with the earlier curves removed.
On a GPU this checks what no CPU test can: AMP training, validation, test scoring, checkpoints, TensorBoard and the
sliding-window inference of the bundle on CUDA. It prints a table (epoch times, seconds per inferred volume) and
``finetune end to end: OK``, or each failed check and exit status 1.

    python benchmarks/gpu/finetune_run.py                       # GPU: 12 volumes of 128x128x64, 48 cubes of 64x64x32
    python benchmarks/gpu/finetune_run.py --pretrained /tmp/dira3d_bundle_run/run/models/best.pt
    python benchmarks/gpu/finetune_run.py --quick               # CPU: tiny.json, 6 volumes of 32x32x16, 16 cubes

The data are written here with numpy and nibabel in the layout ``dira3d prepare lits`` writes (volumes scaled to
[0, 1], label masks, ``lits_datalist.json``), plus the test volumes as raw HU scans for inference, and candidate cubes
with ``ncc_datalist.json`` as ``dira3d prepare luna16`` writes them (label 1: a bright central blob): nothing needs
SimpleITK, which the lent GPU machines lack. Without SimpleITK, ``inference.json`` is told to read NIfTI with MONAI's
``NibabelReader`` (the bundle's ``SimpleITKReader`` imports SimpleITK), and without ``fire`` (which ``python -m
monai.bundle`` parses its command line with) ``monai.bundle.run`` is called with the same settings; the output says
so. Without ``--pretrained`` a
checkpoint of the pretraining's form (``encoder``, ``decoder``, ``meta``) is written from a freshly initialised U-Net at
the run's width: it checks the loading path, not what pretraining gives.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle_run import log_time, run_logged  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MARK = ".finetune_run"  # what --out holds once this script made it: only such a folder (or an empty one) is emptied
STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
PROGRESS = re.compile(STAMP + r" - INFO - Epoch: (\d+)/\d+, Iter: (\d+)/(\d+) -- train_loss: (\S+)")
VAL = re.compile(STAMP + r" - INFO - Epoch\[(\d+)\] Metrics -- val_\w+: (\S+)")  # the key metric: val_dice, val_auc
RESTORED = re.compile(STAMP + r" - .* - INFO - Restored all variables from ")
WRITING = re.compile(STAMP + r" - dira3d\.evaluation\.outputs - INFO - writing: (\S+)")
AFFINE = np.diag([1.5, 1.5, 2.5, 1.0])  # RAS, a CT-like voxel size (mm)


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def write_synthetic_lits(folder: Path, train: int, test: int, shape: list[int], seed: int = 0) -> Path:
    """A folder in the layout of ``dira3d prepare lits``: ``volumes/lits-NNN.nii.gz`` (float32, HU window
    [-1000, 1000] scaled to [0, 1]), ``labels/lits-NNN.nii.gz`` (uint8 liver masks) and ``lits_datalist.json``; and
    ``raw/lits-NNN.nii.gz``, the test volumes as int16 HU scans, listed in ``raw_scans.json`` (what inference takes)."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    for sub in ("volumes", "labels", "raw"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    body = _ellipsoid(shape, [s / 2 for s in shape], [0.46 * s for s in shape])  # soft tissue in air: HU -100 in -1000
    lists: dict[str, list] = {"training": [], "validation": [], "test": []}
    raw = []
    for number in range(train + test):
        liver = _ellipsoid(shape, [rng.uniform(0.4, 0.6) * s for s in shape], [rng.uniform(0.18, 0.28) * s for s in shape])
        image = np.where(body, 0.45, 0.0) + np.where(liver & body, 0.08, 0.0)
        image = np.clip(image + body * 0.02 * rng.standard_normal(shape), 0.0, 1.0).astype(np.float32)
        label = (liver & body).astype(np.uint8)
        name = f"lits-{number:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, AFFINE), str(folder / "volumes" / name))
        nib.save(nib.Nifti1Image(label, AFFINE), str(folder / "labels" / name))
        split = "training" if number < train else "test"
        lists[split].append({"image": f"volumes/{name}", "label": f"labels/{name}", "case_id": name[:-7],
                             "volume": number})
        if split == "test":
            hu = np.round(image * 2000.0 - 1000.0).astype(np.int16)
            nib.save(nib.Nifti1Image(hu, AFFINE), str(folder / "raw" / name))
            raw.append({"image": f"raw/{name}"})
    lists["meta"] = {"dataset": "lits", "window": [-1000.0, 1000.0], "spacing": None, "orientation": "RAS",
                     "label": "liver (1) -> 1", "source": "synthetic (benchmarks/gpu/finetune_run.py)"}
    (folder / "lits_datalist.json").write_text(json.dumps(lists, indent=1))
    (folder / "raw_scans.json").write_text(json.dumps({"test": raw}, indent=1))
    return folder / "lits_datalist.json"


def write_synthetic_cubes(folder: Path, train: int, test: int, shape: list[int], seed: int = 0) -> Path:
    """Candidate cubes in the layout of ``dira3d prepare luna16``'s ``ncc_datalist.json`` (float32 in [0, 1], label 1:
    a bright blob at the centre; two candidates per scan, one of each class); ``test_cubes.json`` lists the test
    cubes for inference."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    (folder / "cubes").mkdir(parents=True, exist_ok=True)
    blob = _ellipsoid(shape, [s / 2 for s in shape], [s / 5 for s in shape])
    lists: dict[str, list] = {"training": [], "validation": [], "test": []}
    for number in range(train + test):
        label = number % 2
        cube = np.clip(0.3 + 0.05 * rng.standard_normal(shape) + np.where(blob & bool(label), 0.5, 0.0), 0.0, 1.0)
        name = f"cubes/cand_{number:03d}.nii.gz"
        nib.save(nib.Nifti1Image(cube.astype(np.float32), AFFINE), str(folder / name))
        split = "training" if number < train else "test"
        lists[split].append({"image": name, "case_id": f"scan-{number // 2:03d}", "label": label, "subset": 0,
                             "candidate": number})
    lists["meta"] = {"dataset": "luna16", "window": [-1000.0, 1000.0], "spacing": None, "orientation": "RAS",
                     "cube_size": list(shape), "source": "synthetic (benchmarks/gpu/finetune_run.py)"}
    (folder / "ncc_datalist.json").write_text(json.dumps(lists, indent=1))
    (folder / "test_cubes.json").write_text(json.dumps({"test": [{"image": e["image"]} for e in lists["test"]]}))
    return folder / "ncc_datalist.json"


def write_stand_in_checkpoint(path: Path, width: float) -> Path:
    """A checkpoint in the pretraining's form (``encoder``, ``decoder``, ``meta``) of a freshly initialised U-Net."""
    import torch

    from dira3d.networks import UNet
    from dira3d.utils import atomic_save

    torch.manual_seed(1234)
    unet = UNet(spatial_dims=3, in_channels=1, out_channels=1, width=width)
    return atomic_save({"encoder": unet.encoder.state_dict(), "decoder": unet.decoder.state_dict(),
                        "meta": {"spatial_dims": 3, "in_channels": 1, "width": width}}, path)



def epochs_of(log: str) -> list[dict]:
    """Per epoch: steps, seconds from the first to the last progress line, epoch seconds (from the previous epoch's
    holdout metrics line to this one's, validation included; epoch 1 from its first progress line), the holdout's key metric (val_dice, val_auc)."""
    steps: dict[int, list[tuple[float, float]]] = {}
    vals: dict[int, tuple[float, float]] = {}
    for line in log.splitlines():
        if match := PROGRESS.match(line):
            steps.setdefault(int(match[2]), []).append((log_time(match[1]), float(match[5])))
        elif match := VAL.match(line):
            vals[int(match[2])] = (log_time(match[1]), float(match[3]))
    rows, previous = [], None
    for epoch in sorted(set(steps) | set(vals)):
        marks = steps.get(epoch, [])
        end = vals.get(epoch, (None, math.nan))
        start = previous if previous is not None else (marks[0][0] if marks else None)
        rows.append({"epoch": epoch, "steps": len(marks), "losses": [loss for _, loss in marks],
                     "train_s": marks[-1][0] - marks[0][0] if len(marks) > 1 else None,
                     "epoch_s": end[0] - start if end[0] is not None and start is not None else None,
                     "val": end[1]})
        previous = end[0]
    return rows


def volume_seconds(log: str) -> list[tuple[str, float]]:
    """Seconds per inferred volume (load, preprocessing, sliding window, inversion, writing) from the log's times."""
    start = next((log_time(m[1]) for m in map(RESTORED.match, log.splitlines()) if m), None)
    out = []
    for match in filter(None, map(WRITING.match, log.splitlines())):
        if start is not None:
            out.append((Path(match[2]).name, log_time(match[1]) - start))
        start = log_time(match[1])
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/dira3d_finetune_run"),
                        help="run folder (emptied: one this script made, or an empty one)")
    parser.add_argument("--log-dir", type=Path, help="where the runs' logs are written as they run (default: --out)")
    parser.add_argument("--train", type=int, default=10, help="training volumes (10 %% of them are the holdout)")
    parser.add_argument("--test", type=int, default=2, help="test volumes (scored, then given to inference raw)")
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 128, 64])
    parser.add_argument("--epochs", type=int, default=2, help="max_epochs of the first run")
    parser.add_argument("--rerun-epochs", type=int, default=3, help="max_epochs of the rerun (refused, then --overwrite)")
    parser.add_argument("--pretrained", type=Path, help="a dira3d pretraining checkpoint at the run's width "
                        "(default: a stand-in of that form, freshly initialised)")
    parser.add_argument("--no-luna16", dest="luna16", action="store_false",
                        help="leave out luna16_nodule_fpr (--epochs on 32 synthetic candidate cubes, then inference on 16 "
                        "test cubes)")
    parser.add_argument("--quick", action="store_true", help="CPU smoke: the bundles' tiny.json, small volumes")
    args = parser.parse_args(argv)
    cubes = (32, 16, [64, 64, 32])
    if args.quick:
        args.train, args.test, args.shape, cubes = 5, 1, [32, 32, 16], (12, 4, [16, 16, 8])
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {device}; the bundles' "
          f"{'tiny.json (CPU dry run)' if args.quick else 'default networks, train.json as it is'}", flush=True)
    if not args.quick and not torch.cuda.is_available():
        print("finetune end to end: no CUDA device; run with --quick for a CPU dry run")
        return 1
    args.out = args.out.resolve()  # the runs' working folder is the repository's
    args.log_dir = args.log_dir and args.log_dir.resolve()
    if args.out.is_dir() and any(args.out.iterdir()) and not (args.out / MARK).is_file():
        print(f"finetune end to end: --out {args.out} holds files this script did not write; give a new or empty folder")
        return 2
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    (args.out / MARK).write_text("benchmarks/gpu/finetune_run.py empties this folder when it runs again\n")
    logs_dir = args.log_dir or args.out
    logs_dir.mkdir(parents=True, exist_ok=True)
    datalist = write_synthetic_lits(args.out / "data", args.train, args.test, args.shape)
    pretrained = args.pretrained.resolve() if args.pretrained else write_stand_in_checkpoint(args.out / "stand_in_pretrained.pt",
                                                              0.125 if args.quick else 1.0)
    ft = args.out / "ft"

    def finetune(label: str, output: Path, epochs: int, *extra: str, bundle: str = "lits_liver_seg",
                 data: Path = datalist) -> tuple[int, str]:
        command = [sys.executable, "-m", "dira3d", "finetune", "--bundle", bundle, "--datalist", str(data),
                   "--output-dir", str(output), "--set", f"max_epochs={epochs}", *extra]
        if args.quick:
            command.append("--tiny")
        rc, log, wall = run_logged(command, logs_dir / f"finetune_{label}.log", cwd=REPO)
        print(f"{label}: exit {rc} after {wall:.1f} s (max_epochs {epochs})", flush=True)
        return rc, log

    failures: list[str] = []
    runs: dict[str, str] = {}
    rc, runs["first run"] = finetune("first_run", ft, args.epochs)
    failures += check_run("first run", rc, runs["first run"], ft, args.epochs)
    model_before = sha256(ft / "models" / "model.pt")
    rc, log = finetune("rerun", ft, args.rerun_epochs)
    last = log.strip().splitlines()[-1] if log.strip() else ""
    if rc != 2 or "already holds a fine-tuning run" not in last or "--overwrite" not in last:
        failures.append(f"the rerun without --overwrite was not refused in one line (exit {rc}): {last}")
    if sha256(ft / "models" / "model.pt") != model_before:
        failures.append("the refused rerun changed models/model.pt")
    # the rerun that replaces it, from a pretrained checkpoint (one process less than a separate run)
    label = "rerun --overwrite --pretrained"
    rc, runs[label] = finetune("rerun_overwrite", ft, args.rerun_epochs, "--overwrite", "--pretrained", str(pretrained))
    failures += check_run(label, rc, runs[label], ft, args.rerun_epochs)
    if rc == 0 and not re.search(r"^pretrained weights from \S+ into encoder, decoder: \d+ tensors loaded, 0 missing",
                                 runs[label], re.M):
        failures.append(f"{label}: no report of the checkpoint loaded into encoder and decoder")
    recorded = json.loads((ft / "metrics.json").read_text())["settings"].get("pretrained") if rc == 0 else None
    if rc == 0 and (not recorded or Path(recorded).resolve() != pretrained.resolve()):
        failures.append(f"{label}: metrics.json does not record the pretrained checkpoint {pretrained}")
    rc, inference_log = infer(args, "lits_liver_seg", ft / "models", datalist.parent / "raw_scans.json", "inference",
                              {"output_dir": str(args.out / "preds")})
    failures += check_inference(rc, inference_log, datalist.parent, args.out / "preds")
    if args.luna16:
        ncc = write_synthetic_cubes(args.out / "luna16", *cubes)
        label = "luna16_nodule_fpr"
        rc, runs[label] = finetune("luna16", args.out / "ft_luna16", args.epochs, bundle=label, data=ncc)
        failures += check_run(label, rc, runs[label], args.out / "ft_luna16", args.epochs, metric="auc")
        probabilities = args.out / "preds_luna16" / "probabilities.json"
        rc, log = infer(args, label, args.out / "ft_luna16" / "models", ncc.parent / "test_cubes.json",
                        "inference_luna16", {"output_path": str(probabilities)})
        failures += check_probabilities(rc, log, ncc.parent, probabilities)
    print("| run | epoch | steps | s between progress lines | epoch s (incl. validation) | holdout metric |")
    print("|---|---|---|---|---|---|")
    for label, log in runs.items():
        for row in epochs_of(log):
            train_s = "-" if row["train_s"] is None else f"{row['train_s']:.2f}"
            epoch_s = "-" if row["epoch_s"] is None else f"{row['epoch_s']:.2f}"
            print(f"| {label} | {row['epoch']} | {row['steps']} | {train_s} | {epoch_s} | {row['val']:.4f} |")
    print("| inferred volume | shape | s (load, sliding window, invert, write) |")
    print("|---|---|---|")
    for name, seconds in volume_seconds(inference_log):
        print(f"| {name} | {'x'.join(map(str, args.shape))} | {seconds:.2f} |")
    for failure in failures:
        print(f"CHECK FAILED: {failure}")
    print("finetune end to end: " + ("OK" if not failures else f"{len(failures)} check(s) failed"))
    return 1 if failures else 0


def infer(args: argparse.Namespace, bundle: str, models: Path, inputs: Path, name: str,
          output: dict[str, str]) -> tuple[int, str]:
    """The bundle's ``inference.json`` on the inputs listed in ``inputs``, as ``python -m monai.bundle run`` does."""
    root = REPO / "bundles" / bundle
    configs = [str(root / "configs" / "inference.json")] + ([str(root / "configs" / "tiny.json")] if args.quick else [])
    settings = {"bundle_root": str(root), "ckpt_dir": str(models), "datalist": str(inputs), **output}
    if not importable("SimpleITK"):  # the lent GPU machines: MONAI's own NIfTI reader, not the bundle's SimpleITKReader
        print(f"{name}: no SimpleITK here; reading NIfTI with MONAI's NibabelReader "
              "(--preprocessing#transforms#0#reader#_target_ NibabelReader)")
        settings["preprocessing#transforms#0#reader#_target_"] = "NibabelReader"
    if importable("fire"):  # what `python -m monai.bundle` parses its command line with
        command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(configs)]
        command += [part for key, value in settings.items() for part in (f"--{key}", value)]
    else:  # the same call without its command line
        print(f"{name}: no fire here; calling monai.bundle.run(...) as `python -m monai.bundle run` does")
        command = [sys.executable, "-c", "import json, sys; from monai.bundle import run; run(**json.loads(sys.argv[1]))",
                   json.dumps({"config_file": configs, **settings})]
    rc, log, wall = run_logged(command, (args.log_dir or args.out) / f"{name}.log", cwd=REPO)
    print(f"{name}: exit {rc} after {wall:.1f} s", flush=True)
    return rc, log


def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def check_probabilities(rc: int, log: str, data: Path, path: Path) -> list[str]:
    """The classification bundle's inference: exit status, one row of one probability in [0, 1] per input cube."""
    if rc != 0:
        return [f"luna16 inference exited with {rc}: {log.strip().splitlines()[-1] if log.strip() else ''}"]
    inputs = json.loads((data / "test_cubes.json").read_text())["test"]
    try:
        rows = json.loads(path.read_text())["predictions"]
    except (OSError, ValueError, KeyError) as err:
        return [f"luna16 inference: {path} is not readable: {err}"]
    probabilities = [p for row in rows for p in row.get("probabilities", [])]
    if len(rows) != len(inputs) or len(probabilities) != len(inputs) or not all(
            isinstance(p, float) and 0.0 <= p <= 1.0 for p in probabilities):
        return [f"luna16 inference: {path.name} holds {len(rows)} rows for {len(inputs)} cubes: {rows[:2]}"]
    return []


def check_run(label: str, rc: int, log: str, out: Path, epochs: int, metric: str = "dice") -> list[str]:
    """Exit status, metrics.json, the model, the epochs the log shows and the TensorBoard scalars of one run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if rc != 0:
        return [f"{label} exited with {rc}: {log.strip().splitlines()[-1] if log.strip() else ''}"]
    failures = []
    try:
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError) as err:
        return [f"{label}: {out / 'metrics.json'} is not readable: {err}"]
    value = (metrics.get("metrics") or {}).get(metric)
    if not isinstance(value, float) or not 0.0 <= value <= 1.0:
        failures.append(f"{label}: metrics.json holds no test {metric} in [0, 1]: {metrics.get('metrics')}")
    if metrics.get("epochs") != epochs or (metrics.get("settings") or {}).get("max_epochs") != epochs:
        failures.append(f"{label}: metrics.json says epochs {metrics.get('epochs')}, not {epochs}")
    if not (out / "models" / "model.pt").is_file():
        failures.append(f"{label}: {out / 'models' / 'model.pt'} was not written")
    trained = [row["epoch"] for row in epochs_of(log)]
    if trained != list(range(1, epochs + 1)):  # a rerun must start again at epoch 1 (fine-tuning has no resume)
        failures.append(f"{label}: the log shows epochs {trained}, not 1 to {epochs}")
    losses = [loss for row in epochs_of(log) for loss in row["losses"]]
    if not losses or not all(math.isfinite(loss) for loss in losses):
        failures.append(f"{label}: train_loss not finite in every step: {losses}")
    acc = EventAccumulator(str(out), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    key = f"val_{metric}"
    for tag in ("train_loss", key, f"test/{metric}") + (("val_iou", "test/iou") if metric == "dice" else ()):
        if tag not in tags:
            failures.append(f"{label}: TensorBoard has no {tag} (tags: {sorted(tags)})")
    if key in tags:  # an earlier run's curves left in the folder would add steps twice
        steps = [e.step for e in acc.Scalars(key)]
        if steps != list(range(1, epochs + 1)):
            failures.append(f"{label}: TensorBoard {key} at steps {steps}, not 1 to {epochs}")
        if not all(math.isfinite(e.value) for e in acc.Scalars(key)):
            failures.append(f"{label}: TensorBoard {key} not finite")
    return failures


def check_inference(rc: int, log: str, data: Path, preds: Path) -> list[str]:
    """Exit status, the report, and each prediction: readable, the input's shape and grid, binary."""
    import nibabel as nib

    if rc != 0:
        return [f"inference exited with {rc}: {log.strip().splitlines()[-1] if log.strip() else ''}"]
    failures = []
    inputs = json.loads((data / "raw_scans.json").read_text())["test"]
    try:
        summary = json.loads((preds / "inference_report.json").read_text())["summary"]
    except (OSError, ValueError, KeyError) as err:
        return [f"inference: {preds / 'inference_report.json'} is not readable: {err}"]
    if summary.get("written") != len(inputs):
        failures.append(f"inference: the report says {summary}, not {len(inputs)} written")
    for entry in inputs:
        scan = nib.load(data / entry["image"])
        path = preds / Path(entry["image"]).name.replace(".nii.gz", "_seg.nii.gz")
        try:
            pred = nib.load(path)
            values = np.unique(np.asarray(pred.dataobj))
        except Exception as err:  # noqa: BLE001 - any reading error is the failed check
            failures.append(f"inference: {path} is not readable: {err}")
            continue
        if pred.shape != scan.shape or not np.allclose(pred.affine, scan.affine, atol=1e-4):
            failures.append(f"inference: {path.name} has shape {pred.shape} / affine {pred.affine.tolist()}, "
                            f"not the input's {scan.shape} / {scan.affine.tolist()}")
        if not set(values.tolist()) <= {0, 1}:
            failures.append(f"inference: {path.name} holds values other than 0 and 1: {values[:8].tolist()}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
