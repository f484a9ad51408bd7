"""A task bundle's train.json run directly (`python -m monai.bundle run`, README / the bundles' docs) refuses a datalist
of another task, one of images only (for pretraining), and a missing --pretrained checkpoint in one `error:` line
naming the file, before any volume is cached (check_before_caching, the first run step): it cached the whole training
set first (183 GiB for LUNA16), then failed in MONAI's tracebacks naming no file, or after caching. train.json with
evaluate.json refuses a test split of the other task the same way, and load_split's other errors about the user's
datalist or settings (an empty split, a one-class holdout, a bad label fraction...) are one line too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dira3d.evaluation.finetune import bundle_path

# a 3D classification bundle and a 2D segmentation bundle
BUNDLES = ("luna16_nodule_fpr", "montgomery_lung_seg")


def _own_task(bundle: str, root: Path) -> Path:
    """A datalist of the bundle's own task (tiny synthetic data in its prepared layout)."""
    if bundle == "montgomery_lung_seg":
        from test_bundles_2d import write_cxr

        return write_cxr(root, "montgomery_datalist.json", None)
    from test_bundles_finetune import make_classification

    return make_classification(root, "ncc_datalist.json", (16, 16, 8), folds=False)


def _other_task(bundle: str, root: Path) -> Path:
    """A datalist of the other kind: masks for the classification bundle, classes for the segmentation bundle."""
    if bundle == "montgomery_lung_seg":
        from test_bundles_2d import write_cxr

        return write_cxr(root, "chexpert_datalist.json", 5)
    from test_bundles_finetune import make_segmentation

    return make_segmentation(root, "lidc_datalist.json", (16, 16, 8), None)[0]


def _images_only(bundle: str, root: Path) -> Path:
    """What `dira3d prepare` writes as pretrain_datalist.json: the bundle's own images, no labels."""
    path = _own_task(bundle, root)
    content = json.loads(path.read_text(encoding="utf-8"))
    for entries in content.values():
        for entry in entries if isinstance(entries, list) else []:
            entry.pop("label", None)
    images_only = root / "pretrain_datalist.json"
    images_only.write_text(json.dumps(content), encoding="utf-8")
    return images_only


def _run(bundle: str, tmp_path: Path, *options: str, evaluate: bool = False) -> subprocess.CompletedProcess:
    """train.json (with ``evaluate``: train.json and evaluate.json, the bundles' documented evaluation) and tiny.json,
    run by ``python -m monai.bundle run``."""
    configs = bundle_path(bundle) / "configs"
    files = ["train.json", "evaluate.json", "tiny.json"] if evaluate else ["train.json", "tiny.json"]
    cmd = [sys.executable, "-m", "monai.bundle", "run",
           "--config_file", json.dumps([str(configs / name) for name in files]),
           "--meta_file", str(configs / "metadata.json"), "--logging_file", str(configs / "logging.conf"),
           "--bundle_root", str(tmp_path / "run"), "--device", "cpu", *options]
    return subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)


CASES = {
    "images only": (_images_only, "has no 'label': a datalist of images only (for pretraining) cannot fine-tune"),
    "other task": (_other_task, "(a {other} datalist?), but this {kind} bundle takes a"),
    "missing pretrained": (_own_task, "does not exist"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("bundle", BUNDLES)
def test_train_json_refuses_a_bad_input_in_one_line_before_caching(bundle, case, tmp_path):
    make, expected = CASES[case]
    datalist = make(bundle, tmp_path / "data")
    options = ["--datalist", str(datalist)]
    if case == "missing pretrained":
        missing = tmp_path / "runs" / "dira_pretrain" / "models" / "best.pt"
        options += ["--pretrained", str(missing)]
    proc = _run(bundle, tmp_path, *options)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out[-3000:]
    kind = "classification" if bundle.endswith("_fpr") else "segmentation"
    other = "segmentation" if kind == "classification" else "classification"
    if case == "missing pretrained":
        assert errors[0].startswith(f"error: pretrained checkpoint {missing} does not exist"), errors[0]
    else:
        assert errors[0].startswith(f"error: datalist {datalist}: entry 0 of split 'train'"), errors[0]
        assert expected.format(kind=kind, other=other) in errors[0], errors[0]
    assert "Traceback" not in out and "Failed to" not in out, out[-3000:]
    # nothing cached (in memory, the bundles' default: a disk cache_dir is written at each entry's first use), nothing
    # trained or saved
    assert "caching" not in out and "Engine run" not in out, out[-3000:]
    models = tmp_path / "run" / "models"
    assert not [p.name for p in models.iterdir() if not p.name.startswith(".")] if models.is_dir() else True


def test_every_task_bundle_checks_its_inputs_before_caching(repo_root):
    """All nine task bundles, train.json and multi_gpu_train.json: the training and holdout lists are loaded with the
    bundle's kind (and so is evaluate.json's test split), and the check (which builds the network, reading --pretrained)
    is the first run step."""
    from dira3d.evaluation.finetune import BUNDLES as TASKS_3D, BUNDLES_2D

    step = "$dira3d.evaluation.check_before_caching(@train#datalist, @validate#datalist, @network)"
    for bundle in (*TASKS_3D, *BUNDLES_2D):
        configs = repo_root / "bundles" / bundle / "configs"
        train = json.loads((configs / "train.json").read_text(encoding="ascii"))
        for split in ("train", "validate"):
            assert "kind=@network_def#kind, spatial_dims=" in train[split]["datalist"], (bundle, split)
        # evaluate.json (run with train.json) loads the test split with the bundle's kind too
        evaluate = json.loads((configs / "evaluate.json").read_text(encoding="ascii"))
        assert "kind=@network_def#kind, spatial_dims=" in evaluate["validate#datalist"], (bundle, "evaluate.json")
        for name in ("train.json", "multi_gpu_train.json"):
            config = json.loads((configs / name).read_text(encoding="ascii"))
            assert config["run"][0] == step, (bundle, name)


@pytest.fixture
def calls(monkeypatch):
    """The splits load_split loads, the networks built and the datasets cached ("cache"), in order, as the bundles'
    configs call them."""
    import dira3d.engines
    import dira3d.evaluation
    import dira3d.evaluation.datalists

    made: list[str] = []
    load_split, build, build_2d = (dira3d.evaluation.load_split, dira3d.evaluation.build_task_network,
                                   dira3d.evaluation.build_resnet_task_network)

    def loading(datalist, split, *args, **kwargs):
        made.append(split)
        return load_split(datalist, split, *args, **kwargs)

    def building(builder):
        def network(*args, **kwargs):
            made.append("network")
            return builder(*args, **kwargs)
        return network

    monkeypatch.setattr(dira3d.evaluation, "load_split", loading)  # as the configs call it
    monkeypatch.setattr(dira3d.evaluation.datalists, "load_split", loading)  # as dira3d finetune imports it
    monkeypatch.setattr(dira3d.evaluation, "build_task_network", building(build))
    monkeypatch.setattr(dira3d.evaluation, "build_resnet_task_network", building(build_2d))
    cache = dira3d.engines.checked_task_cache_data

    def caching(*args, **kwargs):
        made.append("cache")
        return cache(*args, **kwargs)

    monkeypatch.setattr(dira3d.engines, "checked_task_cache_data", caching)
    return made


@pytest.mark.parametrize("bundle", BUNDLES)
def test_the_first_run_step_loads_the_lists_and_builds_the_network_once_for_the_trainer(bundle, tmp_path, calls):
    """initialize needs no data (a notebook's initialize() then finalize()); the first run step loads the training and
    holdout lists and builds the network, and building the trainer (which caches the data) reuses them: nothing is
    read or built twice."""
    from monai.bundle import ConfigWorkflow

    configs = bundle_path(bundle) / "configs"
    datalist = _own_task(bundle, tmp_path / "data")
    flow = ConfigWorkflow(config_file=[str(configs / "train.json"), str(configs / "tiny.json")],
                          meta_file=str(configs / "metadata.json"), logging_file=False, workflow_type=None,
                          bundle_root=str(tmp_path / "run"), datalist=str(datalist), device="cpu", cache_rate=0.0)
    flow.initialize()
    try:
        assert calls == []
        flow.parser.get_parsed_content("run#0")
        assert calls == ["train", "holdout", "network"]
        trainer = flow.parser.get_parsed_content("train#trainer")
        assert calls == ["train", "holdout", "network", "cache"]
        assert trainer.network is flow.parser.get_parsed_content("network")
    finally:
        flow.finalize()


def test_dira3d_finetune_loads_the_training_list_once(tmp_path, calls, monkeypatch):
    """`dira3d finetune` checks the training list that train.json's initialize loaded, without loading it again (it
    loaded it twice); the test split, which evaluate.json scores, is checked before caching too."""
    import dira3d.engines
    from dira3d.evaluation.finetune import main as finetune_main

    def cached(*args, **kwargs):
        raise FileNotFoundError("stopped where the data would be cached")

    monkeypatch.setattr(dira3d.engines, "checked_task_cache_data", cached)
    datalist = _own_task("luna16_nodule_fpr", tmp_path / "data")
    code = finetune_main(["--bundle", "luna16_nodule_fpr", "--tiny", "--datalist", str(datalist), "--output-dir",
                          str(tmp_path / "out")])
    assert code == 2
    assert sorted(calls) == ["holdout", "network", "test", "train"], calls  # each once, before the data are cached


@pytest.mark.parametrize("meta", [True, False])
def test_a_pretrained_checkpoint_that_does_not_fit_is_one_error_line_under_monai_bundle(meta, tmp_path):
    """A checkpoint of another width: with its meta the error names the setting to change, without it lists the shapes;
    both are DataErrors, which `python -m monai.bundle run` prints as one `error:` line (dira3d.utils.bundle_errors)
    where it printed MONAI's traceback around a ValueError."""
    from test_bundles_finetune import tiny_checkpoint

    from dira3d.evaluation import build_task_network
    from dira3d.utils import atomic_save, load_checkpoint
    from dira3d.utils.bundle_errors import user_error_in

    path = tiny_checkpoint(tmp_path / "tiny.pt")  # width 0.125
    if not meta:
        atomic_save({k: v for k, v in load_checkpoint(path).items() if k != "meta"}, path)
    with pytest.raises(ValueError) as err:
        build_task_network("segmentation", 3, 1, 1, width=0.25, pretrained=str(path))
    assert user_error_in(err.value) is err.value, type(err.value)
    assert str(path) in str(err.value)
    if meta:
        assert "were pretrained at width 0.125" in str(err.value), err.value
    else:
        assert "shape mismatch" in str(err.value), err.value


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a refused run (no traceback, nothing trained)."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out[-3000:]
    assert "Traceback" not in out and "Failed to" not in out and "Engine run" not in out, out[-3000:]
    return errors[0]


def test_evaluate_json_refuses_a_datalist_of_the_other_task_in_one_line(tmp_path):
    """train.json + evaluate.json (the bundles' evaluation command) loads the test split with kind=@network_def#kind:
    a mask datalist given to a classification bundle is refused in one line naming it, before the evaluator runs
    (it ran, and failed on the missing model.pt or in the first transform, in a traceback)."""
    datalist = _other_task("luna16_nodule_fpr", tmp_path / "data")
    line = _one_error_line(_run("luna16_nodule_fpr", tmp_path, "--datalist", str(datalist), evaluate=True))
    assert line.startswith(f"error: datalist {datalist}: entry 0 of split 'test'"), line
    assert "(a segmentation datalist?), but this classification bundle takes a" in line, line


def test_train_json_refuses_an_empty_training_split_in_one_line(tmp_path):
    """An empty split is the user's datalist (a DataError): one `error:` line naming it, not MONAI's "Failed to evaluate
    ConfigExpression" traceback around a ValueError (a 2D bundle: its first run step loads the list)."""
    datalist = _own_task("montgomery_lung_seg", tmp_path / "data")
    content = json.loads(datalist.read_text(encoding="utf-8"))
    content["training"] = []
    datalist.write_text(json.dumps(content), encoding="utf-8")
    line = _one_error_line(_run("montgomery_lung_seg", tmp_path, "--datalist", str(datalist)))
    assert line.startswith(f"error: split 'train' of datalist {datalist} is empty ("), line


def _one_class_training(root: Path) -> Path:
    """A classification datalist whose training entries are all of class 0 (its test split keeps both)."""
    datalist = _own_task("luna16_nodule_fpr", root)
    content = json.loads(datalist.read_text(encoding="utf-8"))
    for entry in content["training"]:
        entry["label"] = 0
    datalist.write_text(json.dumps(content), encoding="utf-8")
    return datalist


@pytest.mark.parametrize("settings, expected", [
    (dict(split="holdout"), "AUC is undefined on the early-stopping holdout of datalist"),
    (dict(split="train", label_fraction=2.0), "label_fraction=2.0 is outside (0, 1]"),
    (dict(split="train", holdout=1.5), "holdout=1.5 is outside [0, 1)"),
    (dict(split="train", holdout="most"), "holdout='most' is neither a share"),
    (dict(split="test", fold=4), "fold=4 is not in datalist"),
    (dict(split="tset"), "split='tset' is unknown"),
    (dict(split="holdout", holdout="validation"), "early-stops on the 'validation' list of datalist"),
    (dict(split="train", num_labels=5), "has label 0; expected a list of 5 numbers"),
])
def test_load_split_errors_about_the_datalist_or_settings_are_one_line_errors(settings, expected, tmp_path):
    """Each load_split error about the user's datalist or settings is a DataError (still a ValueError), which
    `python -m monai.bundle run` prints as one `error:` line (dira3d.utils.bundle_errors.user_error_in finds it behind
    MONAI's wrapper); they were plain ValueErrors, printed in MONAI's traceback."""
    from dira3d.evaluation import load_split
    from dira3d.utils.bundle_errors import user_error_in

    datalist = _one_class_training(tmp_path / "data")
    settings = dict(settings)
    with pytest.raises(ValueError, match=None) as err:
        load_split(datalist, settings.pop("split"), **settings)
    assert expected in str(err.value), err.value
    wrapped = RuntimeError("Failed to evaluate ConfigExpression")
    wrapped.__cause__ = err.value
    assert user_error_in(wrapped) is err.value, type(err.value)


def test_check_before_caching_keeps_a_plain_value_error_for_a_config_bug():
    """A bundle whose train#datalist is not a datalist split is a programming bug: its ValueError keeps its traceback."""
    from dira3d.evaluation import check_before_caching
    from dira3d.utils.bundle_errors import user_error_in

    with pytest.raises(ValueError, match="train#datalist must be a list of datalist entries") as err:
        check_before_caching("not a list", [])
    assert user_error_in(err.value) is None
