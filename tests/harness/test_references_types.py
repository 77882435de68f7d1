"""The reference rows beyond binary tasks: the Cox probe against a hand-solved case and torchsurv's partial
likelihood, the floor of a multiclass and of a survival task in the contract's columns and fit on training
patients only, and the ground-truth ceilings of the synthetic subtype and survival outcomes (held-out cohort
included, never read by a fit)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.optimize import brentq

import bench.baselines as baselines
from bench.coxph import fit_cox, neg_partial_log_likelihood
from bench.data.groundtruth import true_cumulative_hazard
from bench.data.splits import fold_parts
from bench.data.synthetic import HELDOUT, SUBTYPES
from bench.data.synthetic.outcomes import TRUTH_FILE
from bench.evaluate import patient_level
from bench.taskdata import RunOptions, fold_time_edges, prepare_task
from bench.tasktypes import prob_columns, survival_columns


@pytest.fixture(autouse=True)
def small_grid(monkeypatch):
    """Two candidate Cs instead of seven: the tests check what is fit on what, not the grid."""
    monkeypatch.setattr(baselines, "C_GRID", (0.01, 1.0))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One synthetic cohort for the module's tasks (they share its spec)."""
    return tmp_path_factory.mktemp("cache")


def _synthetic(tmp_path, write_task, monkeypatch, cache, **fields):
    """A tiny synthetic outcome task (80 patients, D = 8) with an external and a held-out cohort."""
    monkeypatch.setenv("BENCH_CACHE", str(cache))
    return write_task(
        tmp_path / f"{fields['name']}.yaml",
        source="synthetic",
        labels="outcomes.csv",
        folds=2,
        seed=0,
        synthetic={
            "n_patients": 80,
            "n_genes": 16,
            "feature_dim": 8,
            "bag_min": 10,
            "bag_max": 20,
            "heldout": 40,
            "external": [{"name": "site_b", "n_patients": 20, "bag_min": 10, "bag_max": 20}],
        },
        external=[{"name": "site_b"}, {"name": HELDOUT}],
        **fields,
    )


@pytest.fixture
def syn_subtype(tmp_path, cohort_tools, monkeypatch, cache):
    fields = {"type": "multiclass", "label_col": "subtype", "classes": list(SUBTYPES)}
    return _synthetic(tmp_path, cohort_tools[1], monkeypatch, cache, name="syn-subtype", **fields)


@pytest.fixture
def syn_os(tmp_path, cohort_tools, monkeypatch, cache):
    fields = {"type": "survival", "time_col": "os_days", "event_col": "os_event"}
    return _synthetic(tmp_path, cohort_tools[1], monkeypatch, cache, name="syn-os", **fields)


def _data(task, tmp_path):
    return prepare_task(str(task), RunOptions(out=tmp_path / "res", quiet=True))


def test_cox_two_patients_by_hand():
    """x = +1 has its event at t = 1, x = −1 is censored at t = 2: −log PL = log(1 + e^{−2β}), so the
    minimiser of C·log(1 + e^{−2β}) + β²/2 solves β = 2C / (1 + e^{2β}); Breslow's H₀ jumps at t = 1 by
    1 / (e^β + e^{−β})."""
    x, time, event = np.array([[1.0], [-1.0]]), np.array([1.0, 2.0]), np.array([1, 0])
    for c in (0.5, 2.0):
        beta = brentq(lambda b, c=c: b - 2 * c / (1 + math.exp(2 * b)), 0.0, 10.0, xtol=1e-14)
        model = fit_cox(x, time, event, c)
        assert model.coef[0] == pytest.approx(beta, abs=1e-7)
        h = 1 / (math.exp(beta) + math.exp(-beta))
        np.testing.assert_allclose(model.cumulative_hazard(np.array([0.5, 1.0, 3.0])), [0, h, h], atol=1e-7)
        s = model.survival(x, np.array([1.0]))[:, 0]
        np.testing.assert_allclose(s, np.exp(-h * np.exp([beta, -beta])), atol=1e-7)


def test_cox_likelihood_is_torchsurvs_breslow_and_the_fit_is_its_penalised_optimum():
    from torchsurv.loss.cox import neg_partial_log_likelihood as reference

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    time, event = np.round(rng.exponential(5, 40)), (rng.random(40) < 0.6).astype(int)  # tied times
    beta = rng.normal(size=3)

    def torchsurv(b: torch.Tensor) -> torch.Tensor:
        with pytest.warns(UserWarning, match="Ties"):
            return reference(
                torch.as_tensor(x) @ b, torch.as_tensor(event).bool(), torch.as_tensor(time), "breslow", "sum"
            )

    value, grad = neg_partial_log_likelihood(x @ beta, time, event, x)
    b = torch.tensor(beta, requires_grad=True)
    ref = torchsurv(b)
    ref.backward()
    assert value == pytest.approx(float(ref.detach()), rel=1e-6)  # torchsurv computes in float32
    np.testing.assert_allclose(grad, b.grad.numpy(), atol=1e-5)
    model = fit_cox(x, time, event, 1.0)
    b = torch.tensor(model.coef, requires_grad=True)
    (torchsurv(b) + 0.5 * (b**2).sum()).backward()  # C·(−log PL) + ½‖β‖², stationary at the fit
    assert np.abs(b.grad.numpy()).max() < 1e-5


@pytest.mark.parametrize(
    ("task", "columns"),
    [
        ("small_task", ["prob"]),
        ("grade_task", prob_columns(3)),
        ("os_task", ["time", "event", *survival_columns(4)]),
    ],
)
def test_floor_probe_of_each_type_reads_training_patients_only(task, columns, request, tmp_path):
    """The floor's predictions (binary, multiclass, survival) are in the columns a method's fold writes; scaler
    and C are fit on the fold's training slides: scrambling every validation, test and external slide's
    features leaves the chosen C and the training predictions unchanged."""
    data = _data(request.getfixturevalue(task), tmp_path)
    inputs = baselines._floor_inputs(data)
    cohorts, chosen = baselines._fold(data, inputs, 0)
    assert list(cohorts["test"].columns) == ["slide_id", "case_id", "label", *columns, "cohort"]
    parts = fold_parts(data.splits, 0)
    others = parts["val"] + parts["test"]
    scrambled = {k: v.copy() for k, v in inputs.tables.items()}
    scrambled["internal"].loc[others] = 1e3 * np.random.default_rng(0).normal(
        size=(len(others), data.internal.dim)
    )
    scrambled["ext"] = scrambled["ext"] * -50.0
    cohorts2, chosen2 = baselines._fold(data, baselines.RowInputs(scrambled), 0)
    assert chosen2 == chosen and chosen["C"] in baselines.C_GRID
    pd.testing.assert_frame_equal(cohorts2["train"], cohorts["train"])
    score = columns[2] if "risk" in columns else columns[0]
    assert not np.allclose(cohorts2["test"][score], cohorts["test"][score])


def test_subtype_ceilings_and_heldout(syn_subtype, tmp_path):
    data = _data(syn_subtype, tmp_path)
    assert (
        set(data.externals) == {"site_b", HELDOUT} and data.externals[HELDOUT].slides.case_id.nunique() == 40
    )
    applied = baselines.ensure_references(data, tmp_path / "res")
    assert applied == ["floor-probe", "ceiling-bayes", "ceiling-omics", "ceiling-oracle"]
    cohorts, chosen = baselines._fold(data, baselines._bayes_inputs(data), 0)
    assert chosen == {}  # nothing is fit: the generator's own class probabilities
    for cohort, name in ((data.task.labels, "test"), (data.task.external[1].labels, HELDOUT)):
        truth = pd.read_csv(cohort.parent / TRUTH_FILE, dtype={"case_id": str}).set_index("case_id")
        pat = patient_level(cohorts[name]).set_index("case_id")
        expected = truth.loc[pat.index, [f"p_{c}" for c in SUBTYPES]].to_numpy()
        np.testing.assert_allclose(pat[prob_columns(4)].to_numpy(), expected)


def test_survival_ceilings_and_heldout_never_fit_on(syn_os, tmp_path):
    """The Bayes ceiling is the true log-hazard and the true S(t) = exp(−H₀(t) e^η) at the bin ends; the
    floor's C and training predictions do not move when the held-out (and every non-training) slide's
    features are scrambled."""
    data = _data(syn_os, tmp_path)
    applied = baselines.ensure_references(data, tmp_path / "res")
    assert applied == ["floor-probe", "ceiling-bayes", "ceiling-oracle"]  # no Cox on every gene
    cohorts, _ = baselines._fold(data, baselines._bayes_inputs(data), 1)
    truth = pd.read_csv(data.task.labels.parent / TRUTH_FILE, dtype={"case_id": str}).set_index("case_id")
    test = patient_level(cohorts["test"]).set_index("case_id")
    np.testing.assert_allclose(test.risk, truth.log_hazard.loc[test.index])
    edges = fold_time_edges(data, 1)
    surv = np.exp(-np.outer(np.exp(test.risk), true_cumulative_hazard(edges[1:])))
    np.testing.assert_allclose(test[[f"surv_{k}" for k in range(4)]].to_numpy(), surv)
    inputs = baselines._floor_inputs(data)
    first, chosen = baselines._fold(data, inputs, 1)
    scrambled = {k: v * (1.0 if k == "internal" else -7.0) for k, v in inputs.tables.items()}
    second, chosen2 = baselines._fold(data, baselines.RowInputs(scrambled), 1)
    assert chosen2 == chosen
    pd.testing.assert_frame_equal(first["train"], second["train"])
    assert not np.allclose(first[HELDOUT].risk, second[HELDOUT].risk)
