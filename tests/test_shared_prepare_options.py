"""The pieces the dataset prepares share instead of repeating them (session 30 de-duplication).

``add_ct_arguments`` gives LiTS, LUNA16 and PE-CAD one ``--window`` / ``--spacing`` (each keeping its own
``--spacing`` help); ``fraction_split_parser`` / ``run_fraction_prepare`` / ``write_fraction_datalist`` are the ends of
the prepares split by ``--val-fraction`` / ``--test-fraction`` (SIIM-ACR, Montgomery; the parser and run also serve
``radiographs``).
"""

import json

import pytest

from dira3d.data import lits, luna16, montgomery, pecad, radiographs, siim
from dira3d.data.cxr_splits import earlier_patient_split, write_fraction_datalist


@pytest.mark.parametrize("module, spacing_help", [
    (lits, "resample to this spacing in mm (image linear, mask nearest); default native"),
    (luna16, "resample to this spacing in mm (default: native, as the reference)"),
    (pecad, "resample to this spacing in mm (default native)"),
])
def test_ct_prepares_share_window_and_spacing_and_keep_their_own_spacing_help(module, spacing_help):
    parser = module.build_parser()
    args = parser.parse_args(["--src", "a", "--dst", "b"])
    assert tuple(args.window) == (-1000.0, 1000.0) and args.spacing is None
    args = parser.parse_args(["--src", "a", "--dst", "b", "--window", "-100", "200", "--spacing", "1", "1", "2.5"])
    assert list(args.window) == [-100.0, 200.0] and list(args.spacing) == [1.0, 1.0, 2.5]
    text = " ".join(parser.format_help().split())  # --help, its wrapping undone
    assert f"--spacing X Y Z {spacing_help}" in text, text
    assert "--window LO HI HU window mapped to [0, 1] (default -1000 1000)" in text, text
    with pytest.raises(SystemExit):  # three numbers, not one
        parser.parse_args(["--src", "a", "--dst", "b", "--spacing", "1"])


@pytest.mark.parametrize("module, name, test_fraction", [
    (montgomery, "montgomery", 0.2), (siim, "siim", 0.2), (radiographs, "radiographs", 0.0)])
def test_fraction_split_prepares_share_their_options_and_name_themselves(module, name, test_fraction, tmp_path, capsys):
    parser = module.build_parser()
    assert parser.prog == f"dira3d prepare {name}"
    assert parser.description == module.__doc__.split("\n\n")[0]
    args = parser.parse_args(["--src", "a", "--dst", "b"])
    assert (args.size, args.val_fraction, args.test_fraction, args.seed) == (512, 0.1, test_fraction, 0)
    # main runs prepare through run_prepare under the command's own name: a bad setting is one line, exit code 2
    code = module.main(["--src", str(tmp_path / "raw"), "--dst", str(tmp_path / "out"), "--val-fraction", "1"])
    err = capsys.readouterr().err
    assert code == 2 and f"dira3d prepare {name}: error: --val-fraction 1.0 must be in [0, 1)" in err, err


def test_write_fraction_datalist_writes_the_datalist_and_its_split_beside_it(tmp_path, capsys):
    dst = tmp_path / "prepared"
    dst.mkdir()
    split = {"training": ["p1", "p2"], "validation": ["p3"], "test": ["p4"]}
    lists = {part: [{"image": f"images/{p}.png", "case_id": p} for p in ids] for part, ids in split.items()}
    write_fraction_datalist(dst / "x_datalist.json", lists, {"dataset": "x"}, split, 3, 0.25, 0.25)
    datalist = json.loads((dst / "x_datalist.json").read_text())
    assert [len(datalist[part]) for part in ("training", "validation", "test")] == [2, 1, 1]
    # split.json beside the datalist, under the rule a rerun with the same settings reads back (and only that rule)
    assert earlier_patient_split(dst, 3, val_fraction=0.25, test_fraction=0.25) == split
    assert earlier_patient_split(dst, 3, val_fraction=0.1, test_fraction=0.25) is None
    assert "WARNING x_datalist.json: its 'validation' list holds 1 image" in capsys.readouterr().err
