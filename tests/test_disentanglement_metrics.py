"""DCI, MIG and SAP on constructed codes whose answers are known, and against reference computations written here
independently (sklearn's gradient-boosted trees normalised per factor and scipy's entropy for DCI, as
disentanglement_lib does; sklearn's mutual_info_score for MIG). Also the official KF code's label smoothing form."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kbricks.methods.kf.analysis import (
    DCI_QUICK,
    DCI_REFERENCE,
    dci,
    dci_budget,
    dci_from_importance,
    mutual_info_gap,
    representation_metrics,
    sap,
)
from kbricks.methods.kf.method import effective_label_smoothing

sklearn_ensemble = pytest.importorskip("sklearn.ensemble")
scipy_stats = pytest.importorskip("scipy.stats")

N = 800  # samples per case: small enough for the trees to stay cheap, large enough for MI estimates to settle


def uniform_factors(sizes, n=N, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, k, n) for k in sizes], 1)


def split(codes, factors):
    half = len(codes) // 2
    return codes[:half], factors[:half], codes[half:], factors[half:]


def mix45(a, b):
    """Two codes that are the factors rotated by 45 degrees: each code carries both factors equally."""
    a, b = (a - a.mean()) / a.std(), (b - b.mean()) / b.std()
    return np.stack([a + b, a - b], 1) / np.sqrt(2)


# ---- DCI -------------------------------------------------------------------------------------------------------


def test_dci_codes_equal_to_factors_score_one():
    f = uniform_factors((3, 5, 4))
    out = dci(*split(f.astype(float), f))
    assert out["dci_d"] > 0.97 and out["dci_c"] > 0.97
    assert out["dci_i"] == pytest.approx(1.0)


def test_dci_noise_scores_near_zero():
    f = uniform_factors((3, 5))
    codes = np.random.default_rng(1).standard_normal((N, 4))
    out = dci(*split(codes, f))
    assert out["dci_d"] < 0.15
    assert out["dci_i"] < 0.5  # near chance (1/3 and 1/5)


def test_dci_45_degree_mix_scores_near_zero_even_with_unequal_class_counts():
    # the bug of issue 22: raw probe weights grow with a factor's classes, so the 10-class factor owned both codes
    # and this case scored D = 0.89
    f = uniform_factors((2, 10))
    out = dci(*split(mix45(f[:, 0].astype(float), f[:, 1].astype(float)), f))
    assert out["dci_d"] < 0.1
    linear = dci(*split(mix45(f[:, 0].astype(float), f[:, 1].astype(float)), f), importance="linear")
    assert linear["dci_d"] < 0.1


def test_dci_duplicated_dimension_keeps_d_and_lowers_c():
    # codes [f0, f1, f0]: every code still serves one factor (D = 1); f0's importance is shared by two codes, so its
    # completeness is 1 - H_3(share) < 1 (0.37 for an even split), the others stay at 1
    f = uniform_factors((4, 3))
    codes = np.concatenate([f, f[:, :1]], 1).astype(float)
    out = dci(*split(codes, f))
    assert out["dci_d"] > 0.97
    assert out["dci_c"] < 0.97


def test_dci_importance_is_normalised_per_factor():
    r = np.array([[0.9, 0.1], [0.1, 0.9], [0.0, 0.0]])
    scaled = r * np.array([1.0, 10.0])  # a factor whose estimator reports larger numbers (more classes)
    assert dci_from_importance(scaled) == pytest.approx(dci_from_importance(r))
    # hand computation: rows are (0.9, 0.1) and (0.1, 0.9), rho = (0.5, 0.5, 0); D = C = 1 - H_2(0.9, 0.1)
    h = -(0.9 * np.log(0.9) + 0.1 * np.log(0.1)) / np.log(2)
    assert dci_from_importance(r)["dci_d"] == pytest.approx(1 - h)
    h3 = -(0.9 * np.log(0.9) + 0.1 * np.log(0.1)) / np.log(3)
    assert dci_from_importance(r)["dci_c"] == pytest.approx(1 - h3)


def reference_dci(train_codes, train_factors, test_codes, test_factors, seed=0, n_estimators=100):
    """disentanglement_lib's computation, written independently: GBT importances per factor (they sum to 1),
    D = sum_code rho * (1 - H_K(row)), C = sum_factor weight * (1 - H_D(column)), I = test accuracy."""
    importance, accuracy = [], []
    for k in range(train_factors.shape[1]):
        model = sklearn_ensemble.GradientBoostingClassifier(n_estimators=n_estimators, random_state=seed).fit(train_codes, train_factors[:, k])
        importance.append(np.abs(model.feature_importances_))
        accuracy.append(np.mean(model.predict(test_codes) == test_factors[:, k]))
    r = np.stack(importance, 1)  # [codes, factors]
    per_code = 1 - scipy_stats.entropy(r.T + 1e-11, base=r.shape[1])
    d = np.sum(per_code * r.sum(1) / r.sum())
    per_factor = 1 - scipy_stats.entropy(r + 1e-11, base=r.shape[0])
    c = np.sum(per_factor * r.sum(0) / r.sum())
    return {"dci_d": d, "dci_c": c, "dci_i": np.mean(accuracy)}


@pytest.mark.parametrize("case", ["partial_mix", "noisy_factors"])
def test_dci_equals_the_reference_computation(case):
    rng = np.random.default_rng(3)
    f = uniform_factors((3, 4, 5), n=600, seed=3)
    z = (f - f.mean(0)) / f.std(0)
    if case == "partial_mix":  # factor 0 alone, factors 1 and 2 mixed at 30 degrees, one noise code
        codes = np.stack([z[:, 0], 0.87 * z[:, 1] + 0.5 * z[:, 2], -0.5 * z[:, 1] + 0.87 * z[:, 2], rng.standard_normal(600)], 1)
    else:
        codes = np.concatenate([z + 0.4 * rng.standard_normal(z.shape), rng.standard_normal((600, 2))], 1)
    ours = dci(*split(codes, f), max_train=None)
    ref = reference_dci(*split(codes, f))
    for key in ("dci_d", "dci_c", "dci_i"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-6), key


def test_linear_importance_agrees_with_gbt_on_linear_codes():
    # the fast estimator: on codes linear in the factors with no nuisance dimensions it is close to the reference
    # (measured: D 0.51 linear vs 0.65 trees here; trees split a mixed code's importance less evenly)
    f = uniform_factors((3, 4, 5), seed=4)
    z = (f - f.mean(0)) / f.std(0)
    codes = np.stack([z[:, 0], 0.87 * z[:, 1] + 0.5 * z[:, 2], -0.5 * z[:, 1] + 0.87 * z[:, 2]], 1)
    gbt, linear = dci(*split(codes, f)), dci(*split(codes, f), importance="linear")
    assert abs(gbt["dci_d"] - linear["dci_d"]) < 0.2
    assert abs(gbt["dci_c"] - linear["dci_c"]) < 0.2


def test_dci_refuses_bad_input():
    f = uniform_factors((3, 4))
    with pytest.raises(Exception, match="same N"):
        dci(f[:10].astype(float), f[:9], f[:10].astype(float), f[:10])
    with pytest.raises(Exception, match="unknown DCI importance"):
        dci(*split(f.astype(float), f), importance="lasso")


# ---- MIG -------------------------------------------------------------------------------------------------------


def test_mig_known_answers():
    f = uniform_factors((4, 5, 6))
    z = f.astype(float)
    assert mutual_info_gap(z, f)["mig"] > 0.95  # codes = factors
    noise = np.random.default_rng(5).standard_normal((N, 3))
    assert mutual_info_gap(noise, f)["mig"] < 0.05
    two = mix45(z[:, 0], z[:, 1])
    assert mutual_info_gap(two, f[:, :2])["mig"] < 0.05  # 45 degree mix of two factors
    # two of three factors mixed: gaps 0, 0 for the mixed factors and 1 for the third -> MIG = 1/3
    assert mutual_info_gap(np.concatenate([two, z[:, 2:]], 1), f)["mig"] == pytest.approx(1 / 3, abs=0.05)
    # a duplicated dimension, codes [f0, f1, f2, f0]: f0's two best dimensions carry the same information (gap 0),
    # f1 and f2 keep gap H(f)/H(f) - ~0 = 1 -> MIG = (0 + 1 + 1) / 3 = 2/3
    assert mutual_info_gap(np.concatenate([z, z[:, :1]], 1), f)["mig"] == pytest.approx(2 / 3, abs=0.05)


def test_mig_equals_the_reference_computation():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(6)
    f = uniform_factors((3, 6), seed=6)
    codes = np.stack([f[:, 0] + 0.3 * rng.standard_normal(N), f[:, 1] + 0.5 * f[:, 0] + rng.standard_normal(N),
                      rng.standard_normal(N)], 1)
    # disentanglement_lib: 20 equal-width bins per code (np.histogram edges), MI in nats, gap / H(factor)
    binned = np.stack([np.digitize(c, np.histogram(c, 20)[1][:-1]) for c in codes.T], 1)
    gaps = []
    for k in range(f.shape[1]):
        mi = sorted((metrics.mutual_info_score(f[:, k], b) for b in binned.T), reverse=True)
        gaps.append((mi[0] - mi[1]) / metrics.mutual_info_score(f[:, k], f[:, k]))
    assert mutual_info_gap(codes, f)["mig"] == pytest.approx(np.mean(gaps), abs=1e-9)


# ---- SAP -------------------------------------------------------------------------------------------------------


def test_sap_known_answers():
    sizes = (4, 5)
    f = uniform_factors(sizes)
    z = f.astype(float)
    # codes = factors: the right code predicts its factor perfectly, the other one no better than the majority
    # class (independent factors): SAP = mean over factors of 1 - max class frequency ~ 1 - 1/K
    expected = np.mean([1 - np.bincount(f[N // 2:, k]).max() / (N // 2) for k in range(2)])
    assert sap(*split(z, f))["sap"] == pytest.approx(expected, abs=0.05)
    assert sap(*split(np.random.default_rng(7).standard_normal((N, 2)), f))["sap"] < 0.05
    assert sap(*split(mix45(z[:, 0], z[:, 1]), f))["sap"] < 0.05
    # a duplicated dimension, codes [f0, f1, f0]: f0's two best dimensions tie (gap 0), f1's gap is unchanged
    gap_f1 = 1 - np.bincount(f[N // 2:, 1]).max() / (N // 2)
    assert sap(*split(np.concatenate([z, z[:, :1]], 1), f))["sap"] == pytest.approx(gap_f1 / 2, abs=0.05)


# ---- the official code's label smoothing ----------------------------------------------------------------------


def test_official_label_smoothing_is_the_mmcls_classy_vision_form():
    torch.manual_seed(0)
    logits, y, eps = 4 * torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0]), 0.1
    # by hand: mmcls LabelSmoothLoss(mode="classy_vision") smooths to (onehot + eps/K) / (1 + eps)
    target = (F.one_hot(y, 5).float() + eps / 5) / (1 + eps)
    by_hand = -(target * logits.log_softmax(1)).sum(1).mean()
    ours = F.cross_entropy(logits, y, label_smoothing=effective_label_smoothing(eps, "classy_vision"))
    assert ours.item() == pytest.approx(by_hand.item(), abs=1e-6)
    assert effective_label_smoothing(eps, "classy_vision") == pytest.approx(0.1 / 1.1)
    assert abs(F.cross_entropy(logits, y, label_smoothing=eps).item() - by_hand.item()) > 1e-3  # torch's form differs
    assert effective_label_smoothing(eps) == eps


def test_official_ablation_uses_the_official_form():
    from kbricks.methods.kf import KnowledgeFactorization
    from kbricks.studies.kf import ABLATIONS

    overrides = dict(o.split("=", 1) for o in ABLATIONS["official"][1])
    assert overrides["method.label_smoothing"] == "0.1"
    assert overrides["method.label_smoothing_form"] == "classy_vision"
    assert "classy_vision" in str(KnowledgeFactorization.Config.model_fields["label_smoothing_form"].annotation)


# ---- the quick budget (kbricks reproduce --quick) ---------------------------------------------------------------


def quick_dci(codes, factors):
    """DCI at the quick studies' budget on twice as many training codes as it keeps (so the subsample is exercised)."""
    half = len(codes) // 2
    assert half > DCI_QUICK.max_train
    return dci(codes[:half], factors[:half], codes[half:], factors[half:], max_train=DCI_QUICK.max_train,
               n_estimators=DCI_QUICK.n_estimators)


def test_quick_budget_keeps_the_known_answers():
    assert DCI_QUICK.n_estimators < DCI_REFERENCE.n_estimators and DCI_QUICK.max_train < DCI_REFERENCE.max_train
    n = 2 * DCI_QUICK.max_train + 400
    f = uniform_factors((3, 5, 4), n=n, seed=8)
    identity = quick_dci(f.astype(float), f)
    assert identity["dci_d"] > 0.97 and identity["dci_c"] > 0.97
    assert identity["dci_i"] == pytest.approx(1.0)
    f2 = uniform_factors((2, 10), n=n, seed=9)
    mixed = quick_dci(mix45(f2[:, 0].astype(float), f2[:, 1].astype(float)), f2)
    assert mixed["dci_d"] < 0.1
    noise = quick_dci(np.random.default_rng(10).standard_normal((n, 4)), f2)
    assert noise["dci_d"] < 0.15 and noise["dci_i"] < 0.55
    # partly mixed codes land between: factor 0 alone, factors 1 and 2 rotated by 30 degrees
    z = (f - f.mean(0)) / f.std(0)
    partial = quick_dci(np.stack([z[:, 0], 0.87 * z[:, 1] + 0.5 * z[:, 2], -0.5 * z[:, 1] + 0.87 * z[:, 2]], 1), f)
    assert mixed["dci_d"] < partial["dci_d"] < identity["dci_d"]


def test_quick_budget_is_the_reference_estimator_with_fewer_rounds_and_codes():
    # same sklearn estimator and definitions: at max_train=None the quick rounds equal the reference computation
    # with n_estimators set the same way
    rng = np.random.default_rng(11)
    f = uniform_factors((3, 4), n=600, seed=11)
    codes = np.concatenate([f + 0.4 * rng.standard_normal(f.shape), rng.standard_normal((600, 1))], 1)
    tr_c, tr_f, te_c, te_f = split(codes, f)
    ours = dci(tr_c, tr_f, te_c, te_f, max_train=None, n_estimators=DCI_QUICK.n_estimators)
    ref = reference_dci(tr_c, tr_f, te_c, te_f, n_estimators=DCI_QUICK.n_estimators)
    for key in ("dci_d", "dci_c", "dci_i"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-6), key


def test_representation_metrics_record_the_budget_they_ran_at():
    f = uniform_factors((3, 4), n=1400, seed=12)
    codes = torch.from_numpy(f.astype(np.float32))
    t = torch.from_numpy(f)
    full = representation_metrics(codes[:1200], t[:1200], codes[1200:], t[1200:])
    assert (full["dci_train"], full["dci_trees"]) == (DCI_REFERENCE.max_train, DCI_REFERENCE.n_estimators)
    with dci_budget(DCI_QUICK):
        quick = representation_metrics(codes[:1200], t[:1200], codes[1200:], t[1200:])
        small = representation_metrics(codes[:300], t[:300], codes[1200:], t[1200:])
    assert (quick["dci_train"], quick["dci_trees"]) == (DCI_QUICK.max_train, DCI_QUICK.n_estimators)
    assert small["dci_train"] == 300  # fewer codes than the budget: all of them
    assert quick["dci_d"] > 0.97 and full["dci_d"] > 0.97
    assert representation_metrics(codes[:300], t[:300], codes[1200:], t[1200:])["dci_trees"] == DCI_REFERENCE.n_estimators


def test_quick_representation_table_states_its_dci_budget():
    from kbricks.studies.kf import representation_table

    f = uniform_factors((3, 4), n=700, seed=13)
    codes, t = torch.from_numpy(f.astype(np.float32)), torch.from_numpy(f)
    with dci_budget(DCI_QUICK):
        m = representation_metrics(codes[:600], t[:600], codes[600:], t[600:])
    report = {f"rep/kf_codes/{k}": v for k, v in m.items()}
    lines = representation_table([report])
    assert any(line.startswith("| KF task codes") for line in lines)
    assert f"{DCI_QUICK.n_estimators} boosting rounds on 500 training codes" in lines[-1]
    report.update({"rep/kf_codes/dci_trees": 100.0, "rep/kf_codes/dci_train": 600.0})
    assert "quick budget" not in "\n".join(representation_table([report]))


def test_dci_refuses_an_empty_budget():
    f = uniform_factors((3, 4))
    with pytest.raises(Exception, match="n_estimators >= 1"):
        dci(*split(f.astype(float), f), n_estimators=0)
