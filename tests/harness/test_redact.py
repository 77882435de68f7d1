"""A storage URL's password, in its user-info or its query string, is in no message, traceback or file."""

from __future__ import annotations

import sys
import traceback

import optuna
import pytest
import yaml

import bench.jobs as jobs
import bench.studies as storages
import bench.sweep as sweep
import bench.taskdata as taskdata
from bench.cli import main
from bench.errors import BenchError
from bench.redact import redact, remember
from bench.taskdata import RunOptions

SECRET = "Secr3t-pw"
URLS = {  # a closed port on this machine: connecting fails at once
    "user-info": f"postgresql://alice:{SECRET}@127.0.0.1:1/studies",
    "query string": f"postgresql://alice@127.0.0.1:1/studies?sslmode=disable&password={SECRET}",
}


def test_redact_masks_both_forms_and_keeps_the_rest_readable():
    assert redact(URLS["user-info"]) == "postgresql://alice:***@127.0.0.1:1/studies"
    assert (
        redact(URLS["query string"]) == "postgresql://alice@127.0.0.1:1/studies?sslmode=disable&password=***"
    )
    assert redact("mysql+pymysql://root:p%40ss@db:3306/x") == "mysql+pymysql://root:***@db:3306/x"
    assert redact("libpq says host=h password=abc123 dbname=x") == "libpq says host=h password=*** dbname=x"
    for url in ("sqlite:////data/odx.db", "journal:/shared/odx.journal", "postgresql://bob@h/db"):
        assert redact(url) == url
    # a password echoed alone, as given or percent-decoded, is masked once its URL is known
    assert redact("auth failed for 'p@ss-word'", "postgresql://u:p%40ss-word@h/db") == "auth failed for '***'"
    remember("postgresql://u:hunter2-x@h/db")
    assert redact("driver: bad password hunter2-x") == "driver: bad password ***"


@pytest.mark.parametrize("form", sorted(URLS))
def test_unreachable_server_error_does_not_echo_the_password(form, monkeypatch):
    monkeypatch.setattr(
        storages.time, "sleep", lambda s: None
    )  # the retries of make_storage, without waiting
    url = storages.storage_url(URLS[form], "unused", "odx", "momkd")
    with pytest.raises(BenchError) as info:
        storages.make_storage(url)
    message = str(info.value)
    assert "cannot open the study storage" in message and "127.0.0.1" in message and "***" in message
    printed = "".join(traceback.format_exception(info.value))  # what a traceback log would hold
    assert SECRET not in printed


@pytest.mark.parametrize("form", sorted(URLS))
def test_cli_with_an_unreachable_storage_shows_no_password(form, small_task, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(storages.time, "sleep", lambda s: None)
    args = ["bench", "sweep", "abmil", "--task", str(small_task), "--storage", URLS[form], "--folds", "2"]
    monkeypatch.setattr(sys, "argv", [*args, "--out", str(tmp_path / "res"), "--quiet"])
    with pytest.raises(SystemExit) as info:
        main()
    out, err = capsys.readouterr()
    assert info.value.code == 2 and "cannot open the study storage" in err
    assert SECRET not in out + err
    for path in (tmp_path / "res").rglob("*"):  # claims.log, splits.tsv, logs: whatever was written
        assert path.is_dir() or SECRET not in path.read_text(errors="replace")


def test_best_yaml_and_config_record_the_storage_without_its_password(small_task, tmp_path):
    data = taskdata.prepare_task(str(small_task), RunOptions(out=tmp_path, folds=2))
    lr = optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)
    studies = {}
    for k in range(2):
        studies[k] = optuna.create_study(direction="maximize", study_name=f"toy-abmil-fold{k}")
        studies[k].set_user_attr("search", sweep._design(data, k, 1))
        studies[k].add_trial(
            optuna.trial.create_trial(params={"lr": 1e-3}, distributions={"lr": lr}, value=0.7)
        )
    for form, url in URLS.items():
        path = sweep.write_best(
            studies, tmp_path, "toy", "abmil", storages.storage_url(url, tmp_path, "toy", "abmil")
        )
        text = path.read_text()
        assert SECRET not in text and "127.0.0.1:1/studies" in text, form
        assert yaml.safe_load(text)["folds"][1]["overrides"] == {"lr": 1e-3}
        plan = jobs.plan_job(data, jobs.Job("toy", "abmil[best]", 1), RunOptions(out=tmp_path, folds=2))
        assert plan.cfg.lr == 1e-3 and SECRET not in str(plan.config)
        assert plan.config["tuned_by"]["study"] == "toy-abmil-fold1"


def test_unexpected_error_log_holds_no_password(small_task, tmp_path, monkeypatch, capsys):
    """An unexpected error of a sweep: its one line and the traceback log (command line included) are masked."""

    def crash(*args, **kwargs):
        raise RuntimeError(f"lost the connection to {URLS['query string']}")

    monkeypatch.setattr(sweep, "search", crash)
    out = tmp_path / "res"
    args = ["bench", "sweep", "abmil", "--task", str(small_task), "--storage", URLS["user-info"]]
    monkeypatch.setattr(sys, "argv", [*args, "--out", str(out), "--quiet"])
    with pytest.raises(SystemExit) as info:
        main()
    _, err = capsys.readouterr()
    logs = list((out / "logs").glob("*.log"))
    assert info.value.code == 1 and "lost the connection" in err and len(logs) == 1
    text = logs[0].read_text()
    assert "RuntimeError" in text and "alice:***@127.0.0.1" in text
    assert SECRET not in err and SECRET not in text
