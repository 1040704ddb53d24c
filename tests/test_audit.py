"""The label audit: Phi against a hand computation, Monte-Carlo batch norm, the relabelling curve, the files
of ``aol audit``, the 2-process audit against the single-process one, and every bad input's message."""

import csv
import gzip
import json
import math
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

from aol_dist import dist as D
from aol_dist.audit.command import AuditError, check_inputs, run_audit
from aol_dist.audit.mc_batchnorm import MCBatchNorm
from aol_dist.audit.quality import label_quality, relabel_curve, relabel_summary, wrong_labels
from aol_dist.audit.scores import multiclass_scores, multilabel_scores
from aol_dist.config import config_from_dict
from helpers import run_gloo, write_fake_shards


def test_phi_equals_the_hand_computation_multilabel():
    p = torch.tensor([[0.9, 0.2]])
    labels = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])  # 2 sets x 2 findings
    s = multilabel_scores(p, p.unsqueeze(0), labels)

    def h(q):
        return -(q * math.log(q) + (1 - q) * math.log(1 - q))
    # finding 0: counts (1 + 0) / 2 = 0.5 -> CE = -(0.5 log 0.9 + 0.5 log 0.1); finding 1: both 1 -> -log 0.2
    ce = -(0.5 * math.log(0.9) + 0.5 * math.log(0.1)) - math.log(0.2)
    assert s.phi.item() == pytest.approx(ce - h(0.9) - h(0.2), rel=1e-5)
    assert s.phi_entry[0, 1, 0].item() == pytest.approx(-math.log(0.1) - h(0.9), rel=1e-5)  # set 1 says 0, p = 0.9
    assert s.phi_entry[0, 0, 0].item() == pytest.approx(-math.log(0.9) - h(0.9), rel=1e-5)
    assert s.phi.item() == pytest.approx(s.phi_entry.mean(1).sum().item(), rel=1e-5)  # CE is linear in the label


def test_phi_equals_the_hand_computation_multiclass():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    labels = torch.tensor([[[1.0, 0, 0], [0, 0, 1.0], [1.0, 0, 0]]])  # counts 2/3 class 0, 1/3 class 2
    s = multiclass_scores(p, p.unsqueeze(0), labels)
    h = -sum(q * math.log(q) for q in (0.7, 0.2, 0.1))
    ce = -(2 / 3 * math.log(0.7) + 1 / 3 * math.log(0.1))
    assert s.phi.item() == pytest.approx(ce - h, rel=1e-5)
    assert s.phi_entry[0, 1, 0].item() == pytest.approx(-math.log(0.1) - h, rel=1e-5)
    assert s.confidence.item() == pytest.approx(0.7 - 1 / 3, rel=1e-5)  # one pass: E[p_i] = p_i
    assert s.uncertainty.item() == 0.0
    assert s.contradiction.item() == pytest.approx((0.7 - 1 / 3) * (1 / 3), rel=1e-5)  # one set of 3 says class 2


def test_expected_wrong_labels_under_the_consensus_by_hand():
    from aol_dist.audit.scores import expected_wrong

    labels = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert expected_wrong(torch.tensor([[0.8, 0.1]]), labels, False).item() == pytest.approx(0.2 + 0.1 + 0.8 + 0.1)
    one_hot = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]])
    assert expected_wrong(torch.tensor([[0.6, 0.3, 0.1]]), one_hot, True).item() == pytest.approx(0.4 + 0.7)


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(6, 3, generator=g) * 4 + i} for i in range(n)]


def _forward(model, batch):
    return model(batch["image"])


def test_without_batch_norm_u_is_zero_and_c_is_the_distance_to_a_coin():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    mc = MCBatchNorm(model, _batches(5), _forward)
    x = {"image": torch.randn(7, 3)}
    logits = mc.predict(x)
    assert logits.shape == (5, 7, 2)
    p = torch.sigmoid(model(x["image"])).detach()
    s = multilabel_scores(p, torch.sigmoid(logits), torch.zeros(7, 1, 2))
    assert torch.all(s.uncertainty == 0)
    assert torch.allclose(s.confidence, (p - 0.5).abs(), atol=1e-6)


def test_mc_batch_norm_is_reproducible_and_leaves_the_model_statistics_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model.train()
    for _ in range(3):  # some learned running statistics
        model(torch.randn(16, 3))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = {"image": torch.randn(7, 3)}
    a = MCBatchNorm(model, _batches(4, seed=1), _forward).predict(x)
    b = MCBatchNorm(model, _batches(4, seed=1), _forward).predict(x)
    c = MCBatchNorm(model, _batches(4, seed=2), _forward).predict(x)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.training
    # each pass uses exactly its batch's statistics (paper 004: decay 0, one training batch per pass)
    batch = _batches(4, seed=1)[2]["image"]
    h = model[0](batch)
    norm = model[1]
    manual = model[2]((model[0](x["image"]) - h.mean(0)) / torch.sqrt(h.var(0, unbiased=True) + norm.eps)
                      * norm.weight + norm.bias)
    assert torch.allclose(a[2], manual, atol=1e-5)
    assert a.var(0).sum() > 0  # the passes differ: U > 0 with batch norm
    with pytest.raises(ValueError, match="T >= 1"):
        MCBatchNorm(model, [], _forward)


def test_an_oracle_ranking_finds_every_wrong_label_at_the_error_rate_budget():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, (200, 5)).astype(np.uint8)
    labels = np.repeat(truth[:, None], 3, 1)
    flips = rng.random(labels.shape) < 0.03
    labels = labels ^ flips.astype(np.uint8)
    wrong = wrong_labels(labels, truth, multiclass=False)
    assert wrong.sum() == flips.sum()
    rate = float((wrong > 0).mean())
    curve = relabel_curve(wrong.astype(float), wrong)
    k = int(round(rate * len(wrong)))
    assert curve[k] == 1.0 and curve[k - 1] < 1.0 and curve[0] == 0.0
    summary = relabel_summary({"oracle_copy": wrong.astype(float), "worst": -wrong.astype(float)}, wrong, seed=3)
    assert summary["samples_with_wrong_labels"] == pytest.approx(rate)
    assert summary["found_at_10pct"]["oracle"] == summary["found_at_10pct"]["oracle_copy"] == pytest.approx(
        float(np.sort(wrong)[::-1][:20].sum() / wrong.sum()))
    assert summary["found_at_10pct"]["worst"] == 0.0  # the 10 % without wrong labels first
    assert summary["area"]["oracle"] > summary["area"]["random"] > summary["area"]["worst"]
    assert summary["curves"]["random"][0] == 0.0 and summary["curves"]["random"][-1] == pytest.approx(1.0)


def test_label_quality_counts_by_hand():
    truth = np.array([[1, 0], [1, 1], [0, 0], [0, 1]], np.uint8)
    labels = np.stack([truth, np.array([[1, 1], [0, 1], [0, 0], [0, 0]], np.uint8)], 1)
    q = label_quality(labels, truth, ["good", "bad"], ["F", "G"], multiclass=False)
    assert q["sensitivity"]["good"] == {"F": 1.0, "G": 1.0} and q["specificity"]["good"] == {"F": 1.0, "G": 1.0}
    assert q["sensitivity"]["bad"] == {"F": 0.5, "G": 0.5}  # F: 1 of 2 positives; G: 1 of 2
    assert q["specificity"]["bad"] == {"F": 1.0, "G": 0.5}
    assert q["accuracy"]["bad"] == {"F": 0.75, "G": 0.5}
    assert q["agreement"] == [[1.0, 0.625], [0.625, 1.0]]


# ----------------------------------------------------------------------------- aol audit on a trained run

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from aol_dist.loop import train

    root = tmp_path_factory.mktemp("audit")
    write_fake_shards(root / "shards", {"train": [12, 12], "test": [9, 8]})
    runs = {}
    for name, method in (("posterior", {"name": "aol"}), ("paper", {"name": "aol", "trust": "attention"}),
                         ("majority", {"name": "majority"})):
        config = config_from_dict({
            "data": {"shards": str(root / "shards"), "batch_size": 4, "shuffle_buffer": 4, "num_workers": 0},
            "model": {"arch": "resnet_tiny"}, "method": {"lr": 1e-3, **method},
            "train": {"steps": 3, "log_every": 3, "out_dir": str(root / "runs"), "run_name": name,
                      "eval_batch_size": 8, "plots": False, "checkpoint_every": 0}})
        runs[name] = train(config, D.World())
    return root, runs


def _rows(path):
    with gzip.open(path, "rt") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name,source", [("posterior", "posterior"), ("paper", "attention"), ("majority", "majority")])
def test_audit_writes_every_file_ranked_by_phi(trained, tmp_path, name, source):
    root, runs = trained
    summary = run_audit(runs[name], "test", mc_samples=3, out=tmp_path, batch_size=5, rank_by="phi")
    assert summary["consensus"] == source and summary["samples"] == 17
    rows = _rows(tmp_path / "audit_test.csv.gz")
    assert sorted(r["key"] for r in rows) == [f"s{i:06d}" for i in range(24, 41)]  # every test sample once
    phi = [float(r["phi"]) for r in rows]
    assert phi == sorted(phi, reverse=True) and [int(r["rank"]) for r in rows] == list(range(1, 18))
    assert all(r["study_id"] == str(int(r["key"][1:])) for r in rows)  # the ids travel with the sample
    assert all(int(r["wrong_labels"]) == 3 for r in rows)  # set s1 is 1 - truth on every finding
    assert ("trust" in rows[0]) == (source != "majority")
    consensus = _rows(tmp_path / "consensus_test.csv.gz")
    assert len(consensus) == 17 and set(consensus[0]) == {"key", "study_id", "A", "B", "C"}
    assert all(0.0 <= float(r["A"]) <= 1.0 for r in consensus)
    quality = json.loads((tmp_path / "label_quality_test.json").read_text())
    assert quality["reference"] == "truth" and quality["accuracy"]["s0"] == {"A": 1.0, "B": 1.0, "C": 1.0}
    assert quality["accuracy"]["s1"] == {"A": 0.0, "B": 0.0, "C": 0.0} and quality["agreement"][0][1] == 0.0
    relabel = json.loads((tmp_path / "relabel_test.json").read_text())
    assert set(relabel["found_at_10pct"]) >= {"phi", "expected_wrong", "uncertainty", "confidence", "random"}
    assert relabel["wrong_labels"] == 51 and relabel["definition"]
    for png in ("label_quality_test.png", "relabel_test.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def _audit_rank(rank, world_size, run, out):
    world = D.world_from_process_group()
    run_audit(run, "train", mc_samples=2, out=out, batch_size=3, world=world)


def test_a_two_process_audit_equals_the_single_process_one(trained, tmp_path):
    _, runs = trained
    run_gloo(_audit_rank, 2, runs["posterior"], tmp_path / "two")
    run_audit(runs["posterior"], "train", mc_samples=2, out=tmp_path / "one", batch_size=7)
    two, one = (_rows(tmp_path / d / "audit_train.csv.gz") for d in ("two", "one"))
    assert len(two) == len(one) == 24 and len({r["key"] for r in two}) == 24
    by_key = {r["key"]: r for r in one}
    for r in two:
        for col in ("phi", "confidence", "uncertainty", "model_p", "consensus", "trust"):
            assert float(r[col]) == pytest.approx(float(by_key[r["key"]][col]), rel=1e-3, abs=1e-5)
    c2, c1 = (_rows(tmp_path / d / "consensus_train.csv.gz") for d in ("two", "one"))
    assert [r["key"] for r in c2] == [r["key"] for r in c1]  # split order, each sample once


def test_bad_inputs_are_named_before_any_work(trained, tmp_path, capsys):
    root, runs = trained
    run = runs["posterior"]
    with pytest.raises(AuditError, match="--mc-samples must be >= 1"):
        check_inputs(run, "test", None, 0)
    with pytest.raises(AuditError, match="no split 'validate'.*train, test"):
        check_inputs(run, "validate", None, 2)
    with pytest.raises(AuditError, match="no config.toml"):
        check_inputs(tmp_path, "test", None, 2)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.toml").write_text((run / "config.toml").read_text())
    with pytest.raises(AuditError, match="no model.pt; give a finished run directory"):
        check_inputs(unfinished, "test", None, 2)
    other = write_fake_shards(tmp_path / "other", {"test": [4]})
    manifest_path = tmp_path / "other" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "findings": ["A", "B", "X"]}))
    with pytest.raises(AuditError, match="findings .* differ from the run's"):
        check_inputs(run, "test", str(tmp_path / "other"), 2)
    manifest_path.write_text(json.dumps({**other, "label_sets": ["s0", "chexpert"]}))
    with pytest.raises(AuditError, match=r"label sets \['s1'\] of the run are not in the shards"):
        check_inputs(run, "test", str(tmp_path / "other"), 2)
    manifest_path.write_text(json.dumps({**other, "image_size": 16}))  # the run trained on 8 x 8 images
    with pytest.raises(AuditError, match="holds images of image_size 16, the run trained on 8"):
        check_inputs(run, "test", str(tmp_path / "other"), 2)
    # an output folder that cannot be made: said before the scoring, in one line
    from aol_dist.cli import main

    (tmp_path / "a_file").write_text("")
    with mock.patch("aol_dist.audit.command.score_split", side_effect=AssertionError("scored before the check")):
        assert main(["audit", str(run), "--split", "test", "--out", str(tmp_path / "a_file" / "audit")]) == 1
    assert capsys.readouterr().err.strip() == (f"aol audit: cannot make the output folder {tmp_path}/a_file/audit: "
                                               f"a part of the path is a file, not a folder")


def test_the_cli_prints_the_top_suspects_and_documents_its_files(trained, tmp_path, capsys):
    from aol_dist.cli import build_parser, main

    _, runs = trained
    assert main(["audit", str(runs["majority"]), "--split", "test", "--mc-samples", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "label audit, test" in out and "wrong labels found by relabelling 10 %" in out
    assert main(["audit", str(runs["majority"]), "--split", "test", "--mc-samples", "1", "--out", str(tmp_path),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rank_by"] == "expected_wrong"  # the default
    expected = [float(r["expected_wrong"]) for r in _rows(tmp_path / "audit_test.csv.gz")]
    assert expected == sorted(expected, reverse=True)
    assert main(["audit", str(runs["majority"]), "--split", "nope"]) == 2
    assert "no split 'nope'" in capsys.readouterr().err
    help_text = build_parser()._subparsers._group_actions[0].choices["audit"].format_help()
    for name in ("audit_<split>.csv.gz", "consensus_<split>.csv.gz", "label_quality_<split>.json",
                 "label_quality_<split>.png", "relabel_<split>.json"):
        assert name in help_text


def test_a_relative_shard_path_is_found_from_the_directory_the_run_was_trained_in(tmp_path, monkeypatch):
    from aol_dist.finished_run import run_relative

    (tmp_path / "project" / "shards" / "demo").mkdir(parents=True)
    run = tmp_path / "project" / "runs" / "r"
    run.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # elsewhere: shards/demo does not exist from here
    assert run_relative("shards/demo", run) == tmp_path / "project" / "shards" / "demo"
    monkeypatch.chdir(tmp_path / "project")  # where it was trained: as given
    assert run_relative("shards/demo", run) == Path("shards/demo")
    assert run_relative("nowhere", run) == Path("nowhere")  # the error names it as given
