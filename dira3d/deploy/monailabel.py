"""MONAI Label for dira3d bundles: environment, app folder, bundle discovery, server process.

This module runs in dira3d's own environment (it does not import ``monailabel``); the MONAI Label
server runs in a separate virtual environment built by ``monailabel_env.sh`` (monailabel 0.8.5
needs ``numpy<2`` and ``pydicom<3``). The app itself is ``monailabel_app/main.py`` beside this file,
whose tasks live in :mod:`dira3d.deploy.monailabel_tasks` (importable only in that environment).

Typical use::

    venv = ensure_monailabel_env()                         # builds once, then reuses
    app = prepare_app("/tmp/dira3d-app")                   # a writable copy of the app folder
    with MonaiLabelServer(venv, app, studies="/data/ct", bundles="bundles") as server:
        print(server.url)                                  # REST API, e.g. POST /infer/lits_liver_seg
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dira3d.utils.files import read_json
from dira3d.utils.overrides import shell_word

__all__ = [
    "APP_DIR",
    "ENV_SCRIPT",
    "default_venv",
    "ensure_monailabel_env",
    "find_bundles",
    "bundle_kind",
    "first_output",
    "prepare_app",
    "parse_overrides",
    "check_served_bundle",
    "unknown_image",
    "start_command",
    "free_port",
    "MonaiLabelServer",
]

HERE = Path(__file__).resolve().parent
APP_DIR = HERE / "monailabel_app"
ENV_SCRIPT = HERE / "monailabel_env.sh"
REPO_ROOT = HERE.parents[1]
# files MONAI Label needs in a bundle: an inference config, the metadata, and weights
_INFER_CONFIGS = ("inference.json", "inference.yaml")
_WEIGHTS = ("model.pt", "model.ts")


def default_venv() -> Path:
    """``$DIRA3D_MONAILABEL_VENV`` or ``~/.cache/dira3d/monailabel-venv``."""
    return Path(os.environ.get("DIRA3D_MONAILABEL_VENV") or Path.home() / ".cache" / "dira3d" / "monailabel-venv")


def ensure_monailabel_env(venv: str | os.PathLike | None = None, timeout: float = 1200.0, log: str | os.PathLike | None = None) -> Path:
    """Build the MONAI Label virtual environment with ``monailabel_env.sh`` unless it is ready.

    Args:
        venv: where the environment lives; default :func:`default_venv`.
        timeout: seconds allowed for a build from scratch.
        log: file that receives the build output (default: inherited stdout/stderr).

    Returns:
        the environment folder (its ``bin/python -m monailabel.main start_server`` starts the server,
        see :func:`start_command`).

    Raises:
        RuntimeError: the build failed (the message ends with the tail of its output).
    """
    venv = Path(venv) if venv else default_venv()
    env = {**os.environ, "DIRA3D_MONAILABEL_VENV": str(venv), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ENV_SCRIPT)], env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    if log:
        Path(log).write_text(output, encoding="utf-8")
    if proc.returncode != 0:
        tail = "\n".join(line for line in output.splitlines() if "is ignored" not in line)[-3000:]
        raise RuntimeError(f"building the MONAI Label environment {venv} failed (exit {proc.returncode}); "
                           f"delete it and rerun `bash {ENV_SCRIPT}` to see why:\n{tail}")
    return venv


def bundle_kind(bundle: str | os.PathLike) -> str:
    """``"segmentation"`` when the bundle's first output is an image, else ``"classification"``.

    Raises:
        FileNotFoundError: no ``configs/metadata.json``.
        ValueError: the metadata has no ``network_data_format.outputs``.
    """
    return "segmentation" if first_output(bundle).get("type") == "image" else "classification"


def first_output(bundle: str | os.PathLike) -> dict[str, Any]:
    """The first entry of ``network_data_format.outputs`` in the bundle's ``configs/metadata.json``.

    Raises:
        FileNotFoundError: no ``configs/metadata.json``.
        ValueError: the metadata is not a JSON object (the message names the file, and the line of a
            syntax error), or has no ``network_data_format.outputs`` mapping of objects.
    """
    meta_path = Path(bundle) / "configs" / "metadata.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} does not exist: {bundle} is not a MONAI bundle")
    fix = "fix it there, or copy it again from the bundle it came from"
    meta = read_json(meta_path, "bundle metadata", fix, unique_keys=False)  # as MONAI reads it
    formats = meta.get("network_data_format")
    outputs = formats.get("outputs") if isinstance(formats, dict) else None
    if not outputs or not isinstance(outputs, dict) or not isinstance(next(iter(outputs.values())), dict):
        raise ValueError(f"{meta_path} has no network_data_format.outputs (a mapping of output names to their "
                         f"descriptions); MONAI Label needs it to know the task: {fix}")
    return next(iter(outputs.values()))


def _is_bundle(folder: Path) -> bool:
    return any((folder / "configs" / c).is_file() for c in _INFER_CONFIGS)


def find_bundles(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    names: Sequence[str] | None = None,
    require_weights: bool = True,
    given_by: str = "bundle path",
) -> dict[str, Path]:
    """Bundles under ``paths``: each path is a bundle folder or a folder of bundles.

    Args:
        paths: one path, a list, or a string of paths separated by ``,`` or ``os.pathsep``.
        names: keep only these bundle names (folder names); all when None. They are the app's ``--conf models``,
            as the error names them.
        require_weights: skip bundles without ``models/model.pt`` or ``models/model.ts``.
        given_by: what names ``paths`` in the error (``--conf bundles``, ``--bundles``).

    Returns:
        bundle name → folder, sorted by name.

    Raises:
        FileNotFoundError: a path does not exist, or a requested name was not found.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [p for p in str(paths).replace(os.pathsep, ",").split(",") if p.strip()]
    found: dict[str, Path] = {}
    unweighted: set[str] = set()
    for raw in paths:
        path = Path(raw).expanduser().resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"{given_by} {path} does not exist; pass a bundle folder or a folder of bundles")
        candidates = [path] if _is_bundle(path) else sorted(p for p in path.iterdir() if p.is_dir() and _is_bundle(p))
        for bundle in candidates:
            if require_weights and not any((bundle / "models" / w).is_file() for w in _WEIGHTS):
                unweighted.add(bundle.name)
                continue
            found.setdefault(bundle.name, bundle)
    if names:
        missing = [n for n in names if n not in found]
        if missing:  # was "bundles ['x'] not found (with models/model.pt or model.ts) under [...]", naming no option
            why = [f"{n} has no weights yet (models/model.pt or model.ts: fine-tune it first)" if n in unweighted
                   else f"{n} is no bundle there" for n in missing]
            raise FileNotFoundError(
                f"--conf models {','.join(names)}: {'; '.join(why)}; the bundles with weights under "
                f"{', '.join(map(str, paths))} are: {', '.join(sorted(found)) or 'none'} (leave --conf models out to "
                "serve them all)")
        found = {n: found[n] for n in names}
    return dict(sorted(found.items()))


def _conf_overrides(conf: Mapping[str, Any], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(shared, own)`` overrides of bundle ``name`` from the app conf ``bundle_overrides`` (JSON)."""
    raw = conf.get("bundle_overrides", "")
    if not raw:
        return {}, {}
    try:
        value = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"--conf bundle_overrides {raw!r} is not JSON; e.g. '{{\"width\": 0.125}}'") from err
    if not isinstance(value, dict):
        raise ValueError(f"--conf bundle_overrides must be a JSON object, got {raw!r}")
    own = value.get(name, {})
    if not isinstance(own, dict):
        raise ValueError(f"--conf bundle_overrides: the value of {name!r} must be a JSON object of settings, got {own!r}")
    return {k: v for k, v in value.items() if not isinstance(v, dict)}, own


def parse_overrides(conf: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Config overrides for bundle ``name`` from the app conf ``bundle_overrides`` (JSON).

    ``{"width": 0.125}`` applies to every bundle; ``{"lits_liver_seg": {"width": 0.125}}`` to one.

    Raises:
        ValueError: ``bundle_overrides`` is not a JSON object (or a bundle's value is not one).
    """
    shared, own = _conf_overrides(conf, name)
    return {**shared, **own}


def _inference_config(bundle: Path) -> Path:
    return next((bundle / "configs" / c for c in _INFER_CONFIGS if (bundle / "configs" / c).is_file()),
                bundle / "configs" / _INFER_CONFIGS[0])


def check_served_bundle(name: str, bundle: str | os.PathLike, overrides: Mapping[str, Any],
                        conf: Mapping[str, Any] | None = None) -> None:
    """Refuse a bundle that MONAI Label would serve wrongly, before it is served (the app's tasks call it).

    - an id of the bundle's own ``bundle_overrides`` entry (``{"lits_liver_seg": {"pixdm": ...}}``, from ``conf``)
      that its inference config does not define: MONAI Label adds it without a word and serves the default;
    - ``models/model.pt`` that does not load into the network the config builds with ``overrides`` (a model
      fine-tuned with ``--tiny`` served without its ``width``; another bundle's or a pretraining checkpoint):
      every request failed with PyTorch's list of tensors (HTTP 500), and weights whose names differ were
      skipped by MONAI Label's non-strict load, which served a network with random weights. The error names
      the ``--conf bundle_overrides`` that fit (the weights of a bundle with ``models/model.ts`` only are not checked);
    - a classifier whose ``class_names`` do not name its ``out_channels`` outputs (``{"out_channels": 14}`` without 14
      names): its answer names the outputs after ``class_names`` (:class:`ClassificationBundleTask`), and MONAI Label
      leaves out the outputs without a name.

    Raises:
        ValueError: any of these problems, naming the bundle and what to pass.
    """
    from monai.bundle import ConfigParser

    from dira3d.deploy.bundle_network import load_bundle_network
    from dira3d.utils.overrides import check_overrides

    bundle = Path(bundle)
    config = _inference_config(bundle)
    if conf is not None:
        check_overrides([config], _conf_overrides(conf, name)[1], where=f"--conf bundle_overrides {{{name!r}: ...}}")
    weights = bundle / "models" / "model.pt"
    parser = ConfigParser()
    parser.read_config(str(config))
    known = {k: v for k, v in overrides.items() if k in parser}  # shared ones another bundle may define

    def option(fits: Mapping[str, Any]) -> str:
        return f"--conf bundle_overrides {shell_word(json.dumps({name: {**known, **fits}}))}"

    if weights.is_file():
        load_bundle_network(bundle, weights, config_file=config.name, overrides=known, hint_option=option)
    if "class_names" in parser:
        for key, value in known.items():
            parser[key] = value
        names, outputs = parser.get_parsed_content("class_names"), parser.get_parsed_content("out_channels")
        if not isinstance(names, (list, tuple)) or len(names) != int(outputs):
            count = f"{len(names)} name(s)" if isinstance(names, (list, tuple)) else "not a list"
            raise ValueError(f"class_names={names!r} ({count}) does not name the {outputs} outputs of {name} "
                             "(out_channels), so its answers would leave outputs out or name them wrongly; add "
                             "class_names, one name per output in the order of the training datalist's meta.labels, "
                             f"to --conf bundle_overrides (e.g. {option({'class_names': ['...']})})")


def unknown_image(request: Mapping[str, Any], datastore: Any, studies: str | os.PathLike) -> str | None:
    """The error for an infer request whose ``image`` is neither a file nor an id of the studies folder, else None.

    MONAI Label replaces an unknown id by ``""``, so the bundle's input check said ``: does not exist; check the
    path`` (HTTP 500) without naming the id. A DICOMweb ``studies`` (``http(s)://``) is not checked: its datastore
    fetches the series to answer."""
    image = request.get("image")
    if (not isinstance(image, str) or not image or str(studies).startswith(("http://", "https://"))
            or os.path.exists(image) or datastore.get_image_uri(image)):
        return None
    ids = sorted(datastore.list_images())
    shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
    return (f"image {image!r} is not in the studies folder {studies} (its {len(ids)} image id(s): {shown or 'none'}); "
            "image= takes the name of a file there without its extension (lung1_image for lung1_image.nrrd), "
            "or send the scan itself with -F file=@scan.nii.gz")


def prepare_app(dest: str | os.PathLike) -> Path:
    """Copy the dira3d MONAI Label app to ``dest`` (MONAI Label writes logs/ and model/ into its app). A copy
    that fails or is interrupted (Ctrl-C) removes what it wrote, and ``dest`` too when it created it.

    Returns:
        ``dest`` as a Path.

    Raises:
        FileExistsError: ``dest`` is a file, or a folder that is not empty.
        FolderNotWritableError: ``dest`` cannot be created or written to.
    """
    from dira3d.utils.atomic import check_writable, removed_if_failed

    dest = Path(dest)
    if dest.exists() and not dest.is_dir():  # was a NotADirectoryError traceback
        raise FileExistsError(f"{dest} is a file, not a folder; choose a new folder for the MONAI Label app (--out)")
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty; choose a new folder for the MONAI Label app")
    with removed_if_failed(dest):  # a half-copied app would make the rerun refuse the folder
        check_writable(dest, what="the app folder (--out)")
        shutil.copytree(APP_DIR, dest, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "logs", "model", "bin"))
    return dest


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_command(
    venv: str | os.PathLike,
    app: str | os.PathLike,
    studies: str | os.PathLike,
    bundles: str | os.PathLike | Sequence[str | os.PathLike],
    port: int,
    host: str = "127.0.0.1",
    conf: Mapping[str, Any] | None = None,
) -> list[str]:
    """The ``<venv>/bin/python -m monailabel.main start_server`` command line for the dira3d app.

    ``conf`` adds ``--conf key value`` pairs; dict values are passed as JSON (e.g.
    ``{"bundle_overrides": {"width": 0.125}}``).
    """
    if not isinstance(bundles, (str, os.PathLike)):
        bundles = ",".join(str(b) for b in bundles)
    # ``python -m monailabel.main`` is what the ``monailabel`` script runs, minus its reliance on
    # an activated environment and its unquoted ``$*`` (which splits JSON values at spaces)
    cmd = [str(Path(venv) / "bin" / "python"), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
           "--conf", "bundles", str(bundles), "--host", host, "--port", str(port)]
    for key, value in (conf or {}).items():
        cmd += ["--conf", key, value if isinstance(value, str) else json.dumps(value)]
    return cmd


class MonaiLabelServer:
    """A MONAI Label server in its own process group, started and stopped within bounded times.

    Args:
        venv: the MONAI Label environment (:func:`ensure_monailabel_env`).
        app: a writable app folder (:func:`prepare_app`).
        studies: the studies folder (images MONAI Label lists and infers on).
        bundles: bundle folder(s) (see :func:`find_bundles`).
        port: TCP port; a free one when None.
        host: address to bind (keep 127.0.0.1 unless you mean to serve a network).
        conf: extra ``--conf`` pairs (see :func:`start_command`).
        log: file that receives the server's output; default ``<app>/server.log``.
        startup_timeout: seconds to wait for ``/info/`` to answer.

    Raises (on ``start``):
        RuntimeError: the server exited or did not answer in time (the message ends with its log).
    """

    def __init__(self, venv: str | os.PathLike, app: str | os.PathLike, studies: str | os.PathLike,
                 bundles: str | os.PathLike | Sequence[str | os.PathLike], port: int | None = None,
                 host: str = "127.0.0.1", conf: Mapping[str, Any] | None = None,
                 log: str | os.PathLike | None = None, startup_timeout: float = 180.0) -> None:
        self.port = port or free_port(host)
        self.host = host
        self.url = f"http://{host}:{self.port}"
        self.command = start_command(venv, app, studies, bundles, self.port, host, conf)
        self.log = Path(log) if log else Path(app) / "server.log"
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None

    def start(self) -> MonaiLabelServer:
        env = dict(os.environ)
        # the bundles' dira3d.* _target_s come from this checkout, not from a copy in the venv
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        env.setdefault("MONAI_LABEL_DATASTORE_AUTO_RELOAD", "false")
        # MONAI Label keeps sessions under ~/.cache/monailabel by default: keep them with the app
        env.setdefault("MONAI_LABEL_SESSION_PATH", str(Path(self.log).parent / "sessions"))
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"MONAI Label exited with code {self.process.returncode} before answering; "
                                   f"log {self.log}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/info/", timeout=5) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"MONAI Label did not answer {self.url}/info/ within {self.startup_timeout:.0f} s; "
                           f"log {self.log}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-chars:] if self.log.is_file() else ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the server's process group, then SIGKILL it if it is still there after ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout)
        except ProcessLookupError:
            pass

    def __enter__(self) -> MonaiLabelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
