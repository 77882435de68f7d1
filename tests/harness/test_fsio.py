"""Plain data for JSON and YAML: one cleaner for config.yaml, metrics.json and best.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from bench.fsio import plain


class _Version(str):
    """A str subclass, as ``torch.__version__`` is: YAML's safe dumper refuses it."""


def test_plain_turns_results_into_builtins():
    record = {
        "folds": {0: {"auc": np.float32(0.5), "n": np.int64(3)}},
        "path": Path("/a/b"),
        "shape": (1, 2),
        "torch": _Version("2.13.0+cpu"),
        7.5: "odd key",
    }
    out = plain(record)
    assert out == {
        "folds": {0: {"auc": 0.5, "n": 3}},
        "path": "/a/b",
        "shape": [1, 2],
        "torch": "2.13.0+cpu",
        "7.5": "odd key",
    }
    assert type(out["torch"]) is str and type(out["folds"][0]["n"]) is int
    assert yaml.safe_load(yaml.safe_dump(out))["folds"][0]["n"] == 3  # best.yaml keeps integer fold keys
    assert json.loads(json.dumps(out))["folds"]["0"]["auc"] == 0.5
