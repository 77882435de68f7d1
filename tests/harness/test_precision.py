"""`--precision`: fp32 by default on the CPU, bf16 autocast on request (the CPU included), part of the hash."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from bench.cli import main
from bench.device import resolve_precision
from bench.evaluate import predict
from bench.jobs import Job, plan_job
from bench.taskdata import RunOptions, prepare_task
from bench.train import fit
from methods import Bag, resolve_config


def test_resolve_precision():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) is False and resolve_precision("auto", cuda) is True
    assert resolve_precision("bf16", cpu) is True and resolve_precision("fp32", cuda) is False
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", cpu)


def _bags(n: int = 8) -> list[Bag]:
    g = torch.Generator().manual_seed(0)
    return [Bag(torch.randn(20 + i, 16, generator=g), torch.tensor(i % 2), case_id=f"c{i}") for i in range(n)]


def test_bf16_on_cpu_trains_and_predicts_under_autocast():
    cfg = resolve_config("abmil", {"epochs": 1, "min_epochs": 0})
    cpu, bags = torch.device("cpu"), _bags()
    fp32 = fit("abmil", cfg, 16, None, bags, bags, cpu, seed=0)
    bf16 = fit("abmil", cfg, 16, None, bags, bags, cpu, seed=0, precision="bf16")
    p32, p16 = predict(fp32.model, bags, cpu), predict(bf16.model, bags, cpu, autocast=True)
    assert ((p16 > 0) & (p16 < 1)).all()
    assert not np.array_equal(p32, p16)  # autocast did run (bf16 matrix products)
    assert np.abs(p32 - p16).max() < 0.05


def test_precision_other_than_auto_is_part_of_the_hash(small_task, tmp_path):
    data = prepare_task(str(small_task), RunOptions(out=tmp_path))
    job = Job(str(small_task), "abmil", 0)
    auto = plan_job(data, job, RunOptions(out=tmp_path))
    bf16 = plan_job(data, job, RunOptions(out=tmp_path, precision="bf16"))
    assert auto.config["bf16_autocast"] is False and bf16.config["bf16_autocast"] is True
    assert "precision" not in auto.config and bf16.config["precision"] == "bf16"
    assert auto.hash != bf16.hash


def test_unknown_precision_is_a_usage_error(monkeypatch, capsys, small_task, tmp_path):
    argv = ["bench", "run", "--task", str(small_task), "--methods", "abmil", "--precision", "fp16"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2 and "--precision" in capsys.readouterr().err
