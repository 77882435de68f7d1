"""The command line: listings, data check, and bad input ending in one paragraph with exit code 2."""

from __future__ import annotations

import sys

import pandas as pd

from bench.cli import main


def bench(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["bench", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_methods_and_tasks_listed(monkeypatch, capsys):
    code, out, _ = bench(monkeypatch, capsys, "methods")
    assert code == 0 and "abmil" in out and "ilse" in out
    code, out, _ = bench(monkeypatch, capsys, "tasks")
    assert code == 0 and all(t in out for t in ("her2", "pr", "odx"))


def test_data_check_passes_on_good_data(monkeypatch, capsys, small_task):
    code, out, _ = bench(monkeypatch, capsys, "data", "check", "--task", str(small_task))
    assert code == 0 and "no problems found" in out and "internal: 40 patients" in out


def test_data_check_lists_every_problem_at_once(monkeypatch, capsys, small_task):
    root = small_task.parent
    labels = pd.read_csv(root / "internal" / "labels.csv", dtype=str)
    labels.loc[3, "odx_risk"] = "unknown"
    labels.to_csv(root / "internal" / "labels.csv", index=False)
    (
        root / "ext" / "features" / f"{pd.read_csv(root / 'ext' / 'labels.csv', dtype=str).slide_id[0]}.h5"
    ).unlink()
    code, _, err = bench(monkeypatch, capsys, "data", "check", "--task", str(small_task))
    assert code == 2
    assert "'unknown'" in err and "no feature file for 1 slide" in err and "Traceback" not in err


def test_unknown_method_suggests_names(monkeypatch, capsys, small_task):
    code, _, err = bench(
        monkeypatch, capsys, "run", "--methods", "abmi", "--task", str(small_task), "--quiet"
    )
    assert code == 2 and "Did you mean abmil" in err and "Traceback" not in err


def test_unknown_task(monkeypatch, capsys):
    code, _, err = bench(monkeypatch, capsys, "run", "--methods", "abmil", "--task", "nosuchtask")
    assert code == 2 and "unknown task 'nosuchtask'" in err


def test_typo_in_task_yaml_is_an_error(monkeypatch, capsys, small_task):
    small_task.write_text(small_task.read_text() + "fodls: 3\n")
    code, _, err = bench(monkeypatch, capsys, "data", "check", "--task", str(small_task))
    assert code == 2 and "fodls" in err and str(small_task) in err.replace("\n", "")


def test_external_width_mismatch_fails_before_training_and_keeps_results(
    monkeypatch, capsys, small_task, tmp_path
):
    out = tmp_path / "res"
    code, stdout, _ = bench(
        monkeypatch,
        capsys,
        "run",
        "--methods",
        "abmil",
        "--task",
        str(small_task),
        "--out",
        str(out),
        "--quiet",
        "--folds",
        "2",
        "--epochs",
        "1",
    )
    assert code == 0 and "abmil" in stdout
    kept = sorted(p.name for p in (out / "toy" / "abmil").iterdir())
    import h5py
    import numpy as np

    for f in (small_task.parent / "ext" / "features").glob("*.h5"):
        with h5py.File(f, "a") as h:
            n = h["features"].shape[0]
            del h["features"]
            h["features"] = np.ones((n, 8), np.float32)
    code, _, err = bench(
        monkeypatch,
        capsys,
        "run",
        "--methods",
        "abmil",
        "--task",
        str(small_task),
        "--out",
        str(out),
        "--quiet",
        "--folds",
        "2",
        "--epochs",
        "1",
    )
    assert code == 2 and "D=8" in err and "D=16" in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "toy" / "abmil").iterdir()) == kept


def test_one_class_fold_is_rejected(monkeypatch, capsys, small_task):
    small_task.write_text(small_task.read_text().replace("folds: 3", "folds: 20"))
    code, _, err = bench(
        monkeypatch, capsys, "run", "--methods", "abmil", "--task", str(small_task), "--quiet"
    )
    assert code == 2 and "at least 20 patients of each class" in err


def test_report_writes_tables(monkeypatch, capsys, small_task, tmp_path):
    out = tmp_path / "res"
    _, printed, _ = bench(
        monkeypatch,
        capsys,
        "run",
        "--methods",
        "abmil,abmil[ilse]",
        "--task",
        str(small_task),
        "--out",
        str(out),
        "--quiet",
        "--folds",
        "2",
        "--epochs",
        "1",
    )
    assert "ACC@0.5" in printed and "best F1 on each fold's validation patients" in printed
    code, _, _ = bench(monkeypatch, capsys, "report", "--task", str(small_task), "--out", str(out))
    assert code == 0
    folder = out / "toy" / "report"
    for stem in ("table1_internal", "table2_external", "operating_points_toy", "calibration_toy"):
        assert (folder / f"{stem}.md").is_file() and (folder / f"{stem}.tex").is_file()
    points = (folder / "operating_points_toy.md").read_text()
    assert "Threshold (val.)" in points and "F1@0.5" in points and points.count("| abmil[ilse] |") == 2
    calibration = (folder / "calibration_toy.md").read_text()
    assert "| Brier | ECE | ECE bins |" in calibration and calibration.count("| abmil[ilse] |") == 2
    report = (out / "report.md").read_text()
    assert calibration.splitlines()[2] in report and "Splits grouped **by patient**" in report
    tex = (folder / "table1_internal.tex").read_text()
    assert r"\toprule" in tex and r"\textbf{" in tex and "abmil{[}ilse{]}" in tex
