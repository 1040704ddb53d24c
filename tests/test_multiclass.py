"""Multi-class mode (issue 9 items 2, 5, 6): label kind in the manifest, plurality vote, softmax loss, K x K CM,
CM's own learning rate recovering known flip rates, top-1 accuracy synced across ranks, the listing/threshold
refusal, per-image noise in ``aol shards inspect``, and a tiny multi-class training run end to end."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aol_dist import dist as D
from aol_dist.config import ConfigError, MethodConfig, config_from_dict, load_config
from aol_dist.data import shards
from aol_dist.data.convert.common import ConversionError
from aol_dist.data.convert.generic import convert_generic
from aol_dist.data.label_stats import inspect
from aol_dist.data.shards import label_kind, read_manifest, split_shards
from aol_dist.data.stream import EvalStream, make_loader
from aol_dist.evaluate import evaluate
from aol_dist.method.baselines import (ClassConfusionMatrices, ConfusionMatrices, cm_class_loss, cm_step,
                                       plurality_target, resolve_loss, soft_cross_entropy)
from aol_dist.parts import build_parts
from helpers import run_gloo

K = 4


def one_hot(classes, k=K):
    return torch.eye(k, dtype=torch.float64)[torch.as_tensor(classes)]


# --------------------------------------------------------------------------- targets and losses


def test_plurality_vote_splits_ties_evenly_and_is_never_all_zero():
    cat, dog, frog = 0, 1, 2
    labels = torch.stack([one_hot([cat, dog, frog]), one_hot([cat, cat, dog]), one_hot([dog, frog, frog])])
    torch.testing.assert_close(plurality_target(labels), torch.tensor(
        [[1 / 3, 1 / 3, 1 / 3, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64))
    two_two = torch.stack([one_hot([cat, dog, dog, cat])])  # even M: a 2-2 tie
    torch.testing.assert_close(plurality_target(two_two), torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    many = one_hot(torch.randint(0, K, (500, 3), generator=g))  # (500, 3, K)
    target = plurality_target(many)
    torch.testing.assert_close(target.sum(-1), torch.ones(500, dtype=torch.float64))
    assert (target.amax(-1) >= 1 / 3).all()  # never all-zero, unlike a per-class 2-of-3 vote
    votes = many.sum(1)
    assert ((target > 0) == (votes == votes.amax(-1, keepdim=True))).all()  # mass exactly on the tied winners


def test_class_cm_is_row_stochastic_and_near_identity_at_init():
    a = ClassConfusionMatrices(3, 10).matrices()
    assert a.shape == (3, 10, 10)
    torch.testing.assert_close(a.sum(-1), torch.ones(3, 10))
    diag = a.diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(diag, torch.full((3, 10), math.exp(6) / (math.exp(6) + 9)))
    assert (diag > 0.97).all() and (a.sum(-1) - diag < 0.03).all()


def test_softmax_loss_equals_the_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]], dtype=torch.float64)
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]], dtype=torch.float64)
    by_hand = 0.0
    for z, t in zip(logits.tolist(), targets.tolist()):
        log_norm = math.log(sum(math.exp(v) for v in z))
        by_hand += -sum(tk * (zk - log_norm) for zk, tk in zip(z, t))
    assert float(soft_cross_entropy(logits, targets)) == pytest.approx(by_hand / 2, rel=1e-12)


def test_class_cm_loss_is_ce_of_the_confused_prediction_plus_the_trace():
    """sum_m CE(A_m^T p, y_m) + lambda mean_m trace(A_m), written out; with A = I and lambda = 0 it is the
    plain softmax cross-entropy summed over the label sets."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = one_hot(torch.randint(0, 3, (5, 2), generator=g), 3)
    eye = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    torch.testing.assert_close(cm_class_loss(z, y, eye, 0.0), soft_cross_entropy(z, y[:, 0]) + soft_cross_entropy(z, y[:, 1]))
    a = torch.softmax(torch.randn(2, 3, 3, generator=g, dtype=torch.float64), -1)
    p = torch.softmax(z, -1)
    by_hand = 0.0
    for m in range(2):
        for b in range(5):
            j = int(y[b, m].argmax())
            by_hand -= math.log(sum(float(p[b, i] * a[m, i, j]) for i in range(3))) / 5
    trace = float(a.diagonal(dim1=-2, dim2=-1).sum(-1).mean())
    assert float(cm_class_loss(z, y, a, 0.3)) == pytest.approx(by_hand + 0.3 * trace, rel=1e-12)


def test_loss_resolution_and_refusals():
    assert resolve_loss("auto", "multiclass") == "softmax" and resolve_loss("auto", "multilabel") == "bce"
    assert resolve_loss("bce", "multiclass") == "bce"
    with pytest.raises(ValueError, match="method.loss = softmax needs multi-class shards"):
        resolve_loss("softmax", "multilabel")
    with pytest.raises(ConfigError, match="method.loss must be auto, softmax or bce"):
        load_config(None, ["method.loss=hinge"])
    with pytest.raises(ConfigError, match="paper's attention .* one-hot BCE"):
        load_config(None, ["method.name=aol", "method.trust=attention", "method.loss=softmax"])


# --------------------------------------------------------------------------- manifest label kind


def test_manifest_label_kind_and_its_fallback_for_old_manifests(tmp_path):
    common = dict(dataset="d", findings=["a", "b"], label_sets=["s"], splits={}, image_size=8)
    assert label_kind(shards.write_manifest(tmp_path, **common)) == "multilabel"
    written = shards.write_manifest(tmp_path, label_kind="multiclass", **common)
    assert written["label_kind"] == "multiclass" and label_kind(read_manifest(tmp_path)) == "multiclass"
    with pytest.raises(ValueError, match="label_kind must be one of"):
        shards.write_manifest(tmp_path, label_kind="classes", **common)
    old = {k: v for k, v in written.items() if k != "label_kind"}
    assert label_kind({**old, "source": {"multi_label": False}}) == "multiclass"  # the generic converter's record
    assert label_kind({**old, "source": {"multi_label": True}}) == "multilabel"
    assert label_kind({**old, "source": {}}) == "multilabel"  # synth, MIMIC, OpenI


# --------------------------------------------------------------------------- CM learns the flip rates


class Linear(nn.Module):
    """The classifier of the controlled problem: one linear layer, zero-initialised (no prior knowledge)."""

    def __init__(self, d: int, n: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, n)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x, text=None):
        return self.fc(x)


def _controlled_problem(kind: str, g: torch.Generator, samples: int = 4000):
    """Separable inputs, truth, two label sets with known flips, and the label sets' empirical confusion
    matrices (what CM should learn): multilabel 3 findings, set 0 flips 10 % both ways, set 1 misses 30 % of
    positives and adds 10 % false positives; multiclass 4 classes, set 0 flips 10 % to a random other class,
    set 1 flips 30 % to the next class (cat -> dog)."""
    if kind == "multilabel":
        n = 3
        t = torch.randint(0, 2, (samples, n), generator=g).float()
        x = 3 * (2 * t - 1) + 0.5 * torch.randn(samples, n, generator=g)
        u = torch.rand(samples, 2, n, generator=g)
        y0 = torch.where(u[:, 0] < 0.1, 1 - t, t)
        y1 = torch.where(t == 1, (u[:, 1] >= 0.3).float(), (u[:, 1] < 0.1).float())
        expected = torch.stack([torch.stack([torch.stack([((t == i) & (y == j)).sum(0) / (t == i).sum(0)
                                                          for j in range(2)], -1) for i in range(2)], -2)
                                for y in (y0, y1)])  # (M, N, 2, 2)
        return x, torch.stack([y0, y1], 1), expected, ConfusionMatrices(2, n), n
    c = torch.randint(0, K, (samples,), generator=g)
    x = 3 * torch.eye(K)[c] + 0.5 * torch.randn(samples, K, generator=g)
    u = torch.rand(samples, 2, generator=g)
    y0 = torch.where(u[:, 0] < 0.1, (c + torch.randint(1, K, (samples,), generator=g)) % K, c)
    y1 = torch.where(u[:, 1] < 0.3, (c + 1) % K, c)
    expected = torch.stack([torch.stack([torch.bincount(y[c == i], minlength=K).float() / (c == i).sum()
                                         for i in range(K)]) for y in (y0, y1)])  # (M, K, K)
    labels = torch.stack([torch.eye(K)[y0], torch.eye(K)[y1]], 1)
    return x, labels, expected, ClassConfusionMatrices(2, K), K


@pytest.mark.parametrize("kind,steps", [("multiclass", 500), ("multilabel", 1800)])
def test_cm_recovers_known_flip_rates_at_its_own_learning_rate(kind, steps):
    """Joint training (paper 002) with the default ``method.cm_lr`` and ``cm_lambda``: the learned matrices
    come within 0.05 of the label sets' true confusion matrices (measured, seeds 0-2: K x K from step 400,
    2 x 2 per finding from step 1,400-1,500, where the classifier first absorbs set 0's flips and only the
    trace term pulls it out). At a rate of 1e-3 the matrices do not leave the identity in 600 steps."""
    mc = MethodConfig()
    g = torch.Generator().manual_seed(0)
    x, labels, expected, cm, n = _controlled_problem(kind, g)
    model = Linear(x.shape[1], n)
    optimizer = torch.optim.Adam([{"params": model.parameters()}, {"params": cm.parameters(), "lr": mc.cm_lr}],
                                 lr=1e-2)
    start = cm.matrices().detach().clone()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (256,), generator=g)
        cm_step(model, cm, optimizer, x[idx], labels[idx], mc.cm_lambda)
    learned = cm.matrices().detach()
    assert (start - expected).abs().max() > 0.25  # the flips are far from the identity it starts at
    assert (learned - expected).abs().max() < 0.05, (learned - expected).abs().amax(-1)


# --------------------------------------------------------------------------- listing / threshold


def test_listing_with_an_unreachable_threshold_is_refused():
    paper = "method.trust=attention"
    with pytest.raises(ConfigError, match=r"method.combine = listing with method.threshold = 0.5 and M = 4 .*"
                                          r"y_bar <= 1/M = 0.25"):
        load_config(None, [paper, "method.combine=listing", "data.label_sets=a,b,c,d"])
    load_config(None, [paper, "method.combine=listing", "method.threshold=0.1", "data.label_sets=a,b,c,d"])
    # combine and threshold belong to the paper's attention: the default trust ignores them
    load_config(None, ["method.combine=listing", "data.label_sets=a,b,c,d"])
    config = load_config(None, [paper, "method.combine=listing", "method.threshold=0.3", "model.arch=resnet_tiny"])
    manifest = {"label_sets": ["a", "b", "c", "d"], "findings": ["x", "y"], "source": {}}  # M unknown until here
    with pytest.raises(ConfigError, match=r"method.threshold = 0.3 and M = 4 .* every binarized target is about 0"):
        build_parts(config, manifest, D.World())
    ok = load_config(None, [paper, "method.combine=listing", "method.threshold=0.1", "model.arch=resnet_tiny"])
    assert build_parts(ok, manifest, D.World()).label_sets == ["a", "b", "c", "d"]


def test_truth_method_needs_truth_in_the_training_batch():
    config = load_config(None, ["method.name=truth", "model.arch=resnet_tiny", "data.shards=somewhere"])
    parts = build_parts(config, {"label_sets": ["a"], "findings": ["x", "y"], "label_kind": "multiclass"}, D.World())
    batch = {"image": torch.rand(2, 1, 16, 16), "labels": one_hot([[0], [1]], 2).float()}
    with pytest.raises(ValueError, match="method.name = truth: somewhere split 'train' has no truth vector"):
        parts.step(batch, lambda: None)
    out = parts.step({**batch, "truth": one_hot([0, 1], 2).float()}, lambda: None)
    assert math.isfinite(float(out["loss"]))


# --------------------------------------------------------------------------- top-1 accuracy across ranks


def _mc_sample(index: int) -> dict:
    """Sample ``index``: pixels = index; truth class index % K; set a = truth; set b = next class on every third."""
    truth = index % K
    b = (index + 1) % K if index % 3 == 0 else truth
    return {"key": f"s{index:06d}", "image": np.full((8, 8), index, np.uint8),
            "labels": np.eye(K, dtype=np.uint8)[[truth, b]], "truth": np.eye(K, dtype=np.uint8)[truth]}


def _predicted_class(index: int) -> int:
    return index % K if index % 2 == 0 else (index + 2) % K


def _predict(batch):
    index = torch.round(batch["image"][:, 0, 0, 0] * 255).long()
    return 5.0 * F.one_hot(torch.where(index % 2 == 0, index % K, (index + 2) % K), K).float()


def _write_mc_shards(out, sizes):
    jobs, start = [], 0
    for i, n in enumerate(sizes):
        jobs.append(shards.ShardJob(f"test-{i:06d}.tar", tuple(range(start, start + n))))
        start += n
    records, _ = shards.write_split(out, jobs, _mc_sample)
    shards.write_manifest(out, dataset="mc", findings=[f"c{k}" for k in range(K)], label_sets=["a", "b"],
                          splits={"test": records}, image_size=8, has_truth={"test": True}, label_kind="multiclass")
    return start


def _evaluate_ranks(rank, world_size, shard_dir, out):
    world = D.world_from_process_group()
    manifest = read_manifest(shard_dir)
    stream = EvalStream(split_shards(shard_dir, manifest, "test"), rank, world_size, batch_size=4)
    result = evaluate(nn.Linear(1, 1), make_loader(stream, 0), ["a", "b"], manifest["findings"], world,
                      predict=_predict, label_kind=label_kind(manifest))
    (out / f"eval{rank}.json").write_text(json.dumps(result))


def test_top1_accuracy_synced_over_two_gloo_ranks_equals_the_single_process_value(tmp_path):
    total = _write_mc_shards(tmp_path, [9, 7, 7])  # 23 samples: the ranks get 12 and 11
    run_gloo(_evaluate_ranks, 2, tmp_path, tmp_path)
    (tmp_path / "single").mkdir()
    _evaluate_ranks(0, 1, tmp_path, tmp_path / "single")  # no process group: the whole split in one process
    r0, r1, single = (json.loads(p.read_text()) for p in
                      (tmp_path / "eval0.json", tmp_path / "eval1.json", tmp_path / "single" / "eval0.json"))
    by_hand = {"truth": sum(_predicted_class(i) == i % K for i in range(total)) / total,
               "a": sum(_predicted_class(i) == i % K for i in range(total)) / total,
               "b": sum(_predicted_class(i) == int(_mc_sample(i)["labels"][1].argmax()) for i in range(total)) / total}
    assert r0 == r1 and r0["samples"] == single["samples"] == total
    assert r0["metric"] == "accuracy" and set(r0["accuracy"]) == {"truth", "a", "b"}
    for target, value in by_hand.items():  # a sample counted twice (or dropped) would move these fractions
        assert r0["accuracy"][target] == pytest.approx(value, abs=1e-6) == single["accuracy"][target]
    assert by_hand["truth"] != by_hand["b"]


def test_multilabel_evaluation_keeps_auroc_as_its_metric(tmp_path):
    from helpers import FINDINGS, LABEL_SETS, write_fake_shards

    write_fake_shards(tmp_path, {"test": [5, 4]})
    manifest = read_manifest(tmp_path)
    assert label_kind(manifest) == "multilabel"
    stream = EvalStream(split_shards(tmp_path, manifest, "test"), 0, 1, batch_size=4)
    result = evaluate(nn.Linear(1, 1), make_loader(stream, 0), list(LABEL_SETS), list(FINDINGS), D.World(),
                      predict=lambda batch: batch["image"][:, 0, 0, :3] * 10)
    assert result["metric"] == "auroc" and "accuracy" not in result and result["samples"] == 9


def test_a_finding_without_positives_is_nan_said_once_in_the_table_without_library_warnings():
    import warnings

    from rich.console import Console

    from aol_dist.report import auc_table

    g = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 2, (12, 3), generator=g).to(torch.uint8)
    truth[:, 0] = 0  # finding A: no positive study in the split
    batch = {"image": torch.rand(12, 1, 2, 2, generator=g), "truth": truth,
             "labels": torch.stack([truth, 1 - truth], 1)}  # set b: every entry wrong, A all positive there
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchmetrics' "No positive samples in targets" would fail here
        result = evaluate(nn.Linear(1, 1), [batch], ["a", "b"], ["A", "B", "C"], D.World(), roc_thresholds=5,
                          predict=lambda b: torch.randn(len(b["image"]), 3, generator=g))
    assert math.isnan(result["auc"]["truth"][0]) and math.isnan(result["auc"]["a"][0])
    assert math.isnan(result["auc"]["b"][0])  # all positive: no negative study either
    assert not any(math.isnan(v) for v in result["auc"]["truth"][1:])
    console = Console(width=160, record=True)
    console.print(auc_table(result, "test"))
    assert "n/a: no positive or no negative study of that finding" in " ".join(console.export_text().split())


# --------------------------------------------------------------------------- generic converter, inspect, training


@pytest.fixture(scope="module")
def mc_npz(tmp_path_factory):
    """48 grey 8 x 8 images whose brightness says the class; truth y and two label sets with known flips."""
    tmp = tmp_path_factory.mktemp("mcnpz")
    n = 48
    y = np.arange(n) % K
    rng = np.random.default_rng(0)
    x = np.clip(60 * y[:, None, None] + 20 + rng.integers(0, 10, (n, 8, 8)), 0, 255).astype(np.uint8)
    a = np.where(np.arange(n) % 6 == 0, (y + 1) % K, y)  # 8 of 48 wrong
    b = np.where(np.arange(n) % 4 == 1, (y + 2) % K, y)  # 12 of 48 wrong
    np.savez(tmp / "mc.npz", x=x, y=y, a=a, b=b)
    return tmp / "mc.npz", y, a, b


def test_generic_converter_writes_the_label_kind_and_refuses_multi_hot_as_classes(mc_npz, tmp_path):
    path, y, a, b = mc_npz
    convert_generic(tmp_path / "mc", npz=str(path), npz_truth="y", npz_labels=["a", "b"])
    assert read_manifest(tmp_path / "mc")["label_kind"] == "multiclass"
    np.savez(tmp_path / "hot.npz", x=np.load(path)["x"], h=np.eye(K, dtype=np.uint8)[y] | np.eye(K, dtype=np.uint8)[a])
    with pytest.raises(ConversionError, match="h: image 0 has 2 classes, a multi-class label set needs exactly one"):
        convert_generic(tmp_path / "bad", npz=str(tmp_path / "hot.npz"), npz_labels=["h"])
    convert_generic(tmp_path / "ml", npz=str(tmp_path / "hot.npz"), npz_labels=["h"], multi_label=True)
    assert label_kind(read_manifest(tmp_path / "ml")) == "multilabel"


def test_inspect_reports_per_image_noise_and_agreement(mc_npz, tmp_path, capsys):
    from aol_dist.cli import main

    path, y, a, b = mc_npz
    convert_generic(tmp_path / "mc", npz=str(path), npz_truth="y", npz_labels=["a", "b"], samples_per_shard=16)
    summary = inspect(tmp_path / "mc")
    assert summary["label_kind"] == "multiclass"
    per_image = summary["splits"]["train"]["per_image"]
    assert per_image["noise_vs_truth"] == {"a": pytest.approx(8 / 48, abs=1e-4), "b": pytest.approx(12 / 48, abs=1e-4)}
    assert per_image["agreement"]["a|b"] == pytest.approx(float((a == b).mean()), abs=1e-4)
    assert per_image["all_agree"] == pytest.approx(float((a == b).mean()), abs=1e-4)
    # the per-class view of the same labels looks far cleaner: that is why the per-image rates are reported
    assert np.mean(summary["splits"]["train"]["accuracy_vs_truth"]["b"]) == pytest.approx(1 - 2 * 12 / (48 * K))
    assert main(["shards", "inspect", str(tmp_path / "mc")]) == 0
    out = capsys.readouterr().out
    assert "per image" in out and "noise vs truth" in out and "0.250" in out and "all label sets" in out


@pytest.fixture(scope="module")
def mc_shards(mc_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("mcshards")
    convert_generic(out, npz=str(mc_npz[0]), npz_truth="y", npz_labels=["a", "b"], test_fraction=0.25,
                    samples_per_shard=12)
    return out


def _train(shard_dir, out, name, method):
    from aol_dist.loop import train

    config = config_from_dict({
        "data": {"shards": str(shard_dir), "batch_size": 8, "shuffle_buffer": 8, "num_workers": 0},
        "model": {"arch": "resnet_tiny"},
        "method": {"lr": 1e-3, **method},
        "train": {"steps": 3, "log_every": 3, "out_dir": str(out), "run_name": name, "eval_batch_size": 16,
                  "plots": False, "checkpoint_every": 0},
    })
    return train(config, D.World())


@pytest.mark.parametrize("method", [{"name": "majority"}, {"name": "cm"}, {"name": "truth"}, {"name": "best_choice"},
                                    {"name": "soft_average", "loss": "bce"}, {"name": "aol", "trust": "attention"}],
                         ids=lambda m: "-".join(m.values()))
def test_multiclass_training_run_reports_top1_accuracy(mc_shards, tmp_path, method):
    run = _train(mc_shards, tmp_path, "r", method)
    result = json.loads((run / "auc_test.json").read_text())
    assert result["samples"] == 12 and result["metric"] == "accuracy" and result["label_kind"] == "multiclass"
    assert set(result["accuracy"]) == {"truth", "a", "b"}
    assert all(0.0 <= v <= 1.0 for v in result["accuracy"].values())
    assert "Top-1 accuracy" in (run / "auc_test.csv").read_text().splitlines()[-1]
    if method["name"] == "cm":  # K x K matrices, stepped at their own rate
        state = torch.load(run / "model.pt", weights_only=True)
        assert state["cm"]["raw"].shape == (2, K, K)


def test_eval_and_compare_show_the_accuracy(mc_shards, tmp_path, capsys):
    from aol_dist.cli import main
    from aol_dist.report import compare_runs

    runs = [_train(mc_shards, tmp_path, name, {"name": name}) for name in ("majority", "truth")]
    trained = json.loads((runs[0] / "auc_test.json").read_text())
    assert main(["eval", str(runs[0]), "--split", "test", "--out", str(tmp_path / "eval")]) == 0
    assert "Top-1 accuracy" in capsys.readouterr().out
    again = json.loads((tmp_path / "eval" / "auc_test.json").read_text())
    assert again["accuracy"] == trained["accuracy"]  # same model, same split
    comparison = compare_runs(runs, "test")
    assert comparison["runs"]["majority"]["accuracy"] == trained["accuracy"]["truth"]
    assert main(["compare", *map(str, runs)]) == 0
    assert "Top-1 accuracy" in capsys.readouterr().out
