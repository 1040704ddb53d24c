"""The built-in synthetic dataset: determinism, format, calibration, label-set quality, image signal, speed."""

import re
import time

import numpy as np
import pytest

from aol_dist.data import synth
from aol_dist.data.findings import FINDINGS, LABEL_SETS, LABELERS, label_sets_from_raw
from aol_dist.data.synth import CHEXPERT_RATES, synth_split_indices, synth_study

F = {name: i for i, name in enumerate(FINDINGS)}
N_STATS = 2000


def auc(score, y):
    """Rank-based ROC AUC (Mann-Whitney U), ties averaged."""
    score, y = np.asarray(score, float), np.asarray(y).astype(bool)
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inverse, ranks) / counts)[inverse]
    n1, n0 = y.sum(), (~y).sum()
    return (ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)


def same_study(a, b):
    return (a["key"] == b["key"] and a["ids"] == b["ids"] and a["report"] == b["report"]
            and np.array_equal(a["image"], b["image"]) and np.array_equal(a["truth"], b["truth"])
            and all(np.array_equal(a["raw"][k], b["raw"][k], equal_nan=True) for k in LABELERS))


@pytest.fixture(scope="module")
def studies():
    s = [synth_study(i, 7, 64) for i in range(N_STATS)]
    return {"truth": np.array([x["truth"] for x in s]),
            "raw": {k: np.array([x["raw"][k] for x in s]) for k in LABELERS},
            "images": np.array([x["image"] for x in s]),
            "sev": np.array([synth._sample_truth(np.random.default_rng([7, i, 0]))[1] for i in range(N_STATS)])}


def test_auc_helper():
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5


def test_deterministic_in_any_order():
    forward = [synth_study(i, 3, 48) for i in (0, 1, 2, 9)]
    backward = [synth_study(i, 3, 48) for i in (9, 2, 1, 0)][::-1]
    assert all(same_study(a, b) for a, b in zip(forward, backward))
    other = [synth_study(i, 4, 48) for i in (0, 1, 2, 9)]
    assert not any(np.array_equal(a["image"], b["image"]) for a, b in zip(forward, other))
    assert any(a["report"] != b["report"] for a, b in zip(forward, other))
    assert len({s["report"] for s in forward}) == len(forward)


@pytest.mark.parametrize("size", [32, 64, 512])
def test_format(size):
    for index in (0, 12345678):
        s = synth_study(index, 0, size)
        assert s["key"] == f"synth-{index:08d}"
        assert s["image"].shape == (size, size) and s["image"].dtype == np.uint8
        assert s["image"].std() > 10  # an actual picture, not a constant
        assert s["truth"].shape == (14,) and s["truth"].dtype == np.uint8 and set(s["truth"]) <= {0, 1}
        assert set(s["raw"]) == set(LABELERS)
        for raw in s["raw"].values():
            assert raw.shape == (14,) and raw.dtype == np.float32
            assert np.all(np.isnan(raw) | np.isin(raw, (1.0, 0.0, -1.0)))
        assert set(label_sets_from_raw(s["raw"])) == set(LABEL_SETS)
        ids = s["ids"]
        assert all(isinstance(ids[k], int) and 10_000_000 <= ids[k] < 100_000_000 for k in ("subject_id", "study_id"))
        assert re.fullmatch(r"([0-9a-f]{8}-){4}[0-9a-f]{8}", ids["dicom_id"])
        assert s["report"].startswith("FINDINGS: ") and "\nIMPRESSION: " in s["report"]


def test_ids_unique():
    ids = [synth._ids(i) for i in range(5000)]
    for k in ("subject_id", "study_id", "dicom_id"):
        assert len({x[k] for x in ids}) == len(ids)


def test_bad_arguments():
    with pytest.raises(ValueError):
        synth_study(-1, 0)
    with pytest.raises(ValueError):
        synth_study(0, 0, 8)
    with pytest.raises(ValueError):
        synth_split_indices("val", 10, 2, 3)


def test_split_indices_disjoint():
    splits = {s: synth_split_indices(s, 100, 20, 30) for s in ("train", "validate", "test")}
    assert splits["train"] == range(0, 100) and splits["validate"] == range(100, 120)
    assert splits["test"] == range(120, 150)
    assert sum(len(set(a) & set(b)) for a in splits.values() for b in splits.values() if a is not b) == 0


def test_truth_prevalence_and_cooccurrence(studies):
    truth = studies["truth"]
    prevalence = truth.mean(0)
    for i, name in enumerate(FINDINGS):
        if name not in ("Lung Opacity", "No Finding"):  # both derived from the others
            assert abs(prevalence[i] - synth._TRUTH[i, 0]) < 0.035, name
    assert 0.45 < prevalence[F["Lung Opacity"]] < 0.7 and 0.1 < prevalence[F["No Finding"]] < 0.3
    # Structural rules: No Finding = no pathology except devices; Lung Opacity covers airspace disease.
    pathology = np.delete(truth, [F["No Finding"], F["Support Devices"]], axis=1)
    assert np.array_equal(truth[:, F["No Finding"]], (pathology.sum(1) == 0).astype(np.uint8))
    for kid in ("Atelectasis", "Consolidation", "Edema", "Lung Lesion", "Pneumonia"):
        assert np.all(truth[truth[:, F[kid]] == 1, F["Lung Opacity"]] == 1)
    corr = np.corrcoef(truth.T.astype(float))
    for a, b in (("Cardiomegaly", "Edema"), ("Edema", "Pleural Effusion"), ("Pleural Effusion", "Support Devices")):
        assert corr[F[a], F[b]] > 0.05, (a, b)


def test_labeler_rates_calibrated_to_chexpert(studies):
    raw = studies["raw"]["chexpert"]
    for i, name in enumerate(FINDINGS):
        pos, unc = np.mean(raw[:, i] == 1), np.mean(raw[:, i] == -1)
        tol = 0.1 if name == "No Finding" else 0.05
        assert abs(pos - CHEXPERT_RATES[i, 0]) < tol, name
        assert abs(unc - CHEXPERT_RATES[i, 1]) < 0.03, name
    for labeler, raw in studies["raw"].items():
        assert np.isnan(raw).mean() > 0.5, labeler  # most findings go unmentioned
        pos, unc = (raw == 1).mean(0), (raw == -1).mean(0)
        ratio = np.delete(unc / pos, F["No Finding"])
        assert ratio.min() <= 0.15 and ratio.max() >= 0.9, (labeler, ratio)
    nb, cx = ((studies["raw"][k] == -1).mean(0) / (studies["raw"][k] == 1).mean(0) for k in ("negbio", "chexpert"))
    assert nb[F["Cardiomegaly"]] > 2 * cx[F["Cardiomegaly"]]  # negbio hedges on the heart,
    assert cx[F["Pneumonia"]] > 2 * nb[F["Pneumonia"]]  # chexpert on pneumonia


def test_label_sets_differ_in_quality_by_finding(studies):
    truth = studies["truth"]
    sets = label_sets_from_raw(studies["raw"])  # element-wise, so whole (studies, 14) arrays at once
    acc = np.array([(sets[name] == truth).mean(0) for name in LABEL_SETS])  # (4 label sets, 14 findings)
    best = acc.argmax(0)
    assert len(set(best.tolist())) >= 3, acc  # no single label set is best everywhere
    a = dict(zip(LABEL_SETS, acc))
    for labeler in LABELERS:  # uncertain mostly truly positive here, mostly truly negative there
        assert a[f"{labeler}_u1"][F["Atelectasis"]] > a[f"{labeler}_u0"][F["Atelectasis"]]
        assert a[f"{labeler}_u1"][F["Pleural Effusion"]] > a[f"{labeler}_u0"][F["Pleural Effusion"]]
        assert a[f"{labeler}_u0"][F["Consolidation"]] > a[f"{labeler}_u1"][F["Consolidation"]]
        assert a[f"{labeler}_u0"][F["Pneumonia"]] > a[f"{labeler}_u1"][F["Pneumonia"]]
    # each labeler wins somewhere
    assert max(a["negbio_u0"][F["Edema"]], a["negbio_u1"][F["Edema"]]) > \
        max(a["chexpert_u0"][F["Edema"]], a["chexpert_u1"][F["Edema"]])
    assert max(a["chexpert_u0"][F["Support Devices"]], a["chexpert_u1"][F["Support Devices"]]) > \
        max(a["negbio_u0"][F["Support Devices"]], a["negbio_u1"][F["Support Devices"]])


def test_labeler_errors_are_instance_dependent(studies):
    truth, sev = studies["truth"], studies["sev"]
    cols = np.delete(np.arange(14), [F["No Finding"], F["Lung Opacity"]])
    t, s = truth[:, cols] == 1, sev[:, cols]
    for labeler, raw in studies["raw"].items():
        wrong = raw[:, cols] != 1  # a true finding not labelled positive
        assert wrong[t & (s < 0.3)].mean() > 2 * wrong[t & (s > 0.7)].mean(), labeler
        hallucinated = (raw[:, cols] == 1) & ~t
        assert hallucinated.sum() > 0, labeler


def test_images_depend_on_findings(studies):
    images, truth = studies["images"].astype(float), studies["truth"]

    def contrast(name, rows, cols):
        region = images[:, rows[0]:rows[1], cols[0]:cols[1]].mean((1, 2))
        return region[truth[:, F[name]] == 1].mean() - region[truth[:, F[name]] == 0].mean()

    assert contrast("Pleural Effusion", (30, 48), (6, 58)) > 4  # fluid whitens the lung bases
    assert contrast("Cardiomegaly", (30, 48), (36, 50)) > 8  # the heart spreads to the patient's left
    assert contrast("Pneumothorax", (6, 30), (6, 58)) < -3  # air darkens the apex

    # A linear model on 16x16 pixels (numpy logistic regression) finds the strong findings.
    x = images.reshape(len(images), 16, 4, 16, 4).mean((2, 4)).reshape(len(images), -1)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    n = int(0.7 * len(x))
    w, b = np.zeros((x.shape[1], 14)), np.zeros(14)
    for _ in range(200):
        g = 1 / (1 + np.exp(-(x[:n] @ w + b))) - truth[:n]
        w -= 0.5 * (x[:n].T @ g / n + 1e-3 * w)
        b -= 0.5 * g.mean(0)
    score = x[n:] @ w + b
    for name in ("Cardiomegaly", "Edema", "Pleural Effusion", "Support Devices"):
        assert auc(score[:, F[name]], truth[n:, F[name]]) > 0.75, name


def test_fast_enough():
    start = time.perf_counter()
    for i in range(500):
        synth_study(i, 11, 64)
    assert time.perf_counter() - start < 5
