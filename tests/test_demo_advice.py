"""The demo's (`dira3d demo`) advice is in its own options: a --size too small for its visual words is refused up front
(it failed at the visual-word step advising `--max-dense-fraction` / `--lung-filter`), and a rerun over an earlier
demo's --out with other settings, or copied elsewhere, is refused before any step naming what to pass (it advised
`--overwrite`, `--src`, `--dst`: options of other commands); a rerun says which steps it reuses."""

from __future__ import annotations

import json

import pytest


def _errors(captured: str) -> list[str]:
    return [line for line in captured.splitlines() if line.startswith("dira3d demo: error:")]


@pytest.fixture
def no_steps(monkeypatch):
    """The demo's steps replaced by one that fails loudly: a refusal must come before any of them."""
    import dira3d.demo as demo

    def step(*args):
        raise RuntimeError("a step was reached")

    monkeypatch.setattr(demo, "_phantoms_and_prepare", step)
    return demo


@pytest.mark.parametrize("option, earlier, asked", [("--classes", 2, 3), ("--seed", 0, 4)])
def test_rerun_with_other_visual_word_settings_names_the_demo_option(tmp_path, capsys, no_steps, option, earlier, asked):
    """--classes 3 over the words of --classes 2 was refused by the visual-word step after steps 1-2 with "pass
    --overwrite to start again", which the demo has no option for."""
    out = tmp_path / "demo"
    (out / "visual_words").mkdir(parents=True)
    manifest = {"seed": 0, "params": {"classes": 2}, "status": "complete"}
    (out / "visual_words" / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    settings = {"--classes": "2", "--seed": "0"} | {option: str(asked)}
    argv = ["--out", str(out), "--count", "10", "--skip-finetune", *[w for item in settings.items() for w in item]]
    assert no_steps.main(argv) == 2
    captured = capsys.readouterr()
    lines = _errors(captured.err)
    assert len(lines) == 1, captured.err
    assert f"with {option} {earlier}, not {asked}; rerun with {option} {earlier} to go on with them" in lines[0]
    assert "choose another --out" in lines[0] and "--overwrite" not in lines[0]
    assert "===" not in captured.out  # before any step


def test_rerun_with_another_size_names_the_phantoms_size(tmp_path, capsys, monkeypatch):
    """--size other than the earlier demo's phantoms was reused without a word (the phantoms kept their size)."""
    import dira3d.data.luna16 as luna16
    import dira3d.demo as demo

    def prepare(*args, **kwargs):
        raise RuntimeError("step 2 was reached")

    monkeypatch.setattr(luna16, "prepare", prepare)  # step 1 itself runs: it checks what it finds
    out = tmp_path / "demo"
    _phantom_headers(out)
    argv = ["--out", str(out), "--count", "10", "--classes", "2", "--skip-finetune"]
    assert demo.main([*argv, "--size", "128", "128", "96"]) == 2
    lines = _errors(capsys.readouterr().err)
    assert len(lines) == 1 and "holds phantoms of --size 128 128 64 from an earlier demo, not 128 128 96" in lines[0]
    assert "rerun with --size 128 128 64 to go on with them, or choose another --out" in lines[0]
    with pytest.raises(RuntimeError, match="step 2 was reached"):  # the same size goes on
        demo.main([*argv, "--size", "128", "128", "64"])


def test_step_two_says_it_reuses_the_cases_an_earlier_run_prepared(tmp_path, capsys, monkeypatch):
    """A rerun whose preparation skipped every case (prepared before) says so under step 2; one case written again
    is not "reused"."""
    from types import SimpleNamespace

    import dira3d.data.luna16 as luna16
    import dira3d.demo as demo

    out = tmp_path / "demo"
    _phantom_headers(out)
    statuses = ["skipped"] * 10
    monkeypatch.setattr(luna16, "prepare", lambda *a, **k: [SimpleNamespace(status=s) for s in statuses])
    demo._phantoms_and_prepare(out, 10, (128, 128, 64), 0)
    assert "all 10 cases already prepared: reused" in capsys.readouterr().out
    statuses[3] = "written"
    demo._phantoms_and_prepare(out, 10, (128, 128, 64), 0)
    assert "already prepared" not in capsys.readouterr().out


@pytest.mark.parametrize("moved", [False, True])
def test_a_copied_or_moved_out_names_where_the_demo_goes_on(tmp_path, capsys, no_steps, moved):
    """An --out copied elsewhere and rerun failed in the preparation step, advising `dira3d prepare`'s --src, --dst
    and --overwrite; now one line in the demo's terms (its --out), before any step."""
    earlier, out = tmp_path / "first", tmp_path / "copy"
    (out / "luna16_prepared").mkdir(parents=True)
    record = {"written_by": "dira3d prepare", "desc": "luna16", "source": str(earlier.resolve() / "luna16_raw")}
    (out / "luna16_prepared" / "prepared.json").write_text(json.dumps(record), encoding="utf-8")
    if not moved:
        (earlier / "luna16_raw").mkdir(parents=True)
    assert no_steps.main(["--out", str(out), "--count", "10", "--classes", "2", "--skip-finetune"]) == 2
    captured = capsys.readouterr()
    lines = _errors(captured.err)
    assert len(lines) == 1, captured.err
    assert f"{out.resolve()} holds a demo written in {earlier.resolve()} and copied or moved here" in lines[0]
    assert f"rerun with --out {earlier.resolve()} to go on with it" in lines[0] and "choose a new --out" in lines[0]
    assert not any(word in lines[0] for word in ("--src", "--dst", "--overwrite")) and "===" not in captured.out


def test_the_demo_s_own_prepared_record_goes_on(tmp_path, no_steps):
    """The record of the demo's own phantoms folder (a plain rerun) is no refusal: the steps are reached."""
    out = tmp_path / "demo"
    (out / "luna16_prepared").mkdir(parents=True)
    record = {"source": str(out.resolve() / "luna16_raw")}
    (out / "luna16_prepared" / "prepared.json").write_text(json.dumps(record), encoding="utf-8")
    with pytest.raises(RuntimeError, match="a step was reached"):
        no_steps.main(["--out", str(out), "--count", "10", "--classes", "2", "--skip-finetune"])


def test_step_three_says_it_reuses_the_words_of_an_earlier_run(tmp_path):
    """A rerun said "discovering 2 TransVW visual words" although it reused them (as the pretraining step says)."""
    from dira3d.demo import words_heading

    vw = tmp_path / "visual_words"
    assert words_heading(vw, 2, 5).startswith("3/5 discovering 2 TransVW visual words × 5 instances into")
    vw.mkdir()
    (vw / "manifest.json").write_text(json.dumps({"status": "planned"}), encoding="utf-8")  # stopped part-way
    assert "discovering" in words_heading(vw, 2, 5)
    (vw / "manifest.json").write_text(json.dumps({"status": "complete"}), encoding="utf-8")
    heading = words_heading(vw, 2, 5)
    assert heading == f"3/5 visual words already in {vw}: 2 TransVW visual words × 5 instances reused"


@pytest.mark.parametrize("size", [["64", "64", "32"], ["104", "104", "64"], ["112", "112", "40"], ["128", "128", "24"],
                                  ["24", "128", "64"]])
def test_a_size_too_small_for_the_visual_words_is_refused_up_front(tmp_path, capsys, no_steps, size):
    """--size 64 64 32 wrote and prepared the phantoms, then failed at the visual-word step advising
    --max-dense-fraction / --lung-filter, options the demo does not have; now a usage error naming the smallest
    size, before anything is written."""
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as exit_info:
        no_steps.main(["--out", str(out), "--count", "10", "--classes", "2", "--size", *size])
    assert exit_info.value.code == 2
    lines = _errors(capsys.readouterr().err)
    smallest = "112 112 48 or 128 128 32"  # found by trying (the comment of SMALLEST_SIZES)
    assert len(lines) == 1 and f"--size {' '.join(size)}: the demo needs phantoms of at least {smallest}" in lines[0]
    assert "--max-dense-fraction" not in lines[0] and "--lung-filter" not in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("size", [["112", "112", "48"], ["128", "128", "32"], ["112", "160", "48"]])
def test_the_smallest_sizes_are_taken(tmp_path, no_steps, size):
    with pytest.raises(RuntimeError, match="a step was reached"):
        no_steps.main(["--out", str(tmp_path / "demo"), "--count", "10", "--classes", "2", "--size", *size])


def _phantom_headers(out):
    """The raw folder an earlier demo's step 1 left: 10 phantoms of 128 x 128 x 64 (headers only) and annotations."""
    raw = out / "luna16_raw"
    for i in range(10):
        (raw / f"subset{i}").mkdir(parents=True)
        (raw / f"subset{i}" / f"{i}.mhd").write_text("NDims = 3\nDimSize = 128 128 64\nElementType = MET_SHORT\n")
    (raw / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
