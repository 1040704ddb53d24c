"""Hand-labelled studies fitting the annotator model (``data.gold_split``, data/gold.py, trust.gold_loss): they
identify what the labels leave open, they are read and drawn as documented, and they reach the training step.
(Exact resume and the DeepSpeed path with a gold split: tests/test_checkpoint_resume.py, whose runs use one.)"""

import json
import shutil
from unittest import mock

import pytest
import torch
from torch import nn

from aol_dist import dist as D
from aol_dist.config import ConfigError, config_from_dict, load_config
from aol_dist.data.gold import load_gold
from aol_dist.data.shards import ShardError, read_manifest
from aol_dist.data.stream import EvalStream
from aol_dist.loop import train
from aol_dist.method.trust import LabelTrust, TrustHyper, gold_loss, posterior_trust, set_right, trust_loss
from aol_dist.model.backbone import Classifier


def _one_labeler_who_hedges(n=6000, findings=2, seed=0):
    """u0 and u1 of one labeler: a hedge (20 % of entries, present or absent alike) is 0 in u0 and 1 in u1.
    The image says nothing about the truth (prevalence 0.3), so hedged entries are 30 % present and u0 is
    the better set (accuracy 0.94 against 0.86); from the labels alone that is not identifiable."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    truth = (torch.rand(n, findings, generator=g) < 0.3).float()
    hedge = torch.rand(n, findings, generator=g) < 0.2
    labels = torch.stack([torch.where(hedge, 0.0, truth), torch.where(hedge, 1.0, truth)], 1)
    return x, labels, truth


def _fit(x, labels, truth, gold, steps=400, batch=500):
    torch.manual_seed(0)
    trust = LabelTrust(1, 2, labels.shape[2], annotator="joint", input="none")
    classifier = nn.Linear(x.shape[1], labels.shape[2])
    opt = torch.optim.Adam([*classifier.parameters(), *trust.parameters()], 0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        i = torch.randint(0, len(x), (batch,), generator=g)
        loss, _, _ = posterior_trust(classifier(x[i]), labels[i], trust, trust.scores(None, batch))
        if gold:  # the first `gold` studies are hand-labelled
            j = torch.randint(0, gold, (batch,), generator=g)
            loss = loss + gold_loss(trust, {"image": x[j], "labels": labels[j], "truth": truth[j]})
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, q, _ = posterior_trust(classifier(x), labels, trust, trust.scores(None, len(x)))
    return set_right(q, labels, multiclass=False).mean(0), trust.estimated_confusion().detach()


def test_hand_labelled_studies_identify_what_the_labels_leave_open():
    x, labels, truth = _one_labeler_who_hedges()
    accuracy = (labels == truth.unsqueeze(1)).float().mean(0)  # (M, N): u0 0.94, u1 0.86
    assert (accuracy[0] > accuracy[1] + 0.05).all()
    alone, _ = _fit(x, labels, truth, gold=0)
    assert (alone - accuracy).abs().max() > 0.03  # the labels alone: estimates off, here the order wrong too
    estimated, confusion = _fit(x, labels, truth, gold=1000)  # 1,000 of the 6,000 studies hand-labelled
    torch.testing.assert_close(estimated, accuracy, atol=0.02, rtol=0)
    pos = truth == 1
    for m, says in enumerate(labels.unbind(1)):  # the annotator model's confusion: the rates as drawn
        assert confusion[m, :, 1, 1] == pytest.approx(((says * pos).sum(0) / pos.sum(0)).tolist(), abs=0.05)
        assert confusion[m, :, 0, 1] == pytest.approx(((says * ~pos).sum(0) / (~pos).sum(0)).tolist(), abs=0.05)


def test_gold_loss_by_hand_multiclass():
    torch.manual_seed(3)
    trust = LabelTrust(1, 2, 3, multiclass=True, annotator="independent", input="none")
    with torch.no_grad():
        trust.log_table.normal_()
    labels = nn.functional.one_hot(torch.randint(0, 3, (5, 2)), 3).float()
    t = torch.randint(0, 3, (5,))
    loss = gold_loss(trust, {"image": torch.zeros(5, 1), "labels": labels,
                             "truth": nn.functional.one_hot(t, 3).float()})
    c = torch.softmax(trust.log_table, -1)  # (M, truth, label)
    y = labels.argmax(-1)
    by_hand = -torch.stack([c[0, t[b], y[b, 0]].log() + c[1, t[b], y[b, 1]].log() for b in range(5)]).mean()
    torch.testing.assert_close(loss, by_hand)


def test_load_gold_reads_the_first_studies_and_draws_by_seed_step_rank(run_shards):
    manifest = read_manifest(run_shards)
    gold = load_gold(run_shards, manifest, "test", [1, 0], samples=10)
    assert len(gold) == 10 and gold.split == "test"
    (everything,) = list(EvalStream([(run_shards / "test-000000.tar", 8), (run_shards / "test-000001.tar", 8)],
                                    0, 1, 16, [1, 0]))
    assert torch.equal(gold.image, everything["image"][:10]) and torch.equal(gold.truth, everything["truth"][:10])
    assert torch.equal(gold.labels, everything["labels"][:10])  # in data.label_sets order
    assert len(load_gold(run_shards, manifest, "test", [0, 1])) == 16  # samples = 0: all of them

    a = gold.draw(seed=0, step=5, rank=1, batch_size=6)
    assert a["image"].shape == (6, 1, 8, 8) and a["labels"].shape == (6, 2, 3) and a["truth"].shape == (6, 3)
    assert all(torch.equal(a[k], gold.draw(0, 5, 1, 6)[k]) for k in a)  # a function of (seed, step, rank)
    for other in (gold.draw(0, 5, 0, 6), gold.draw(0, 6, 1, 6), gold.draw(1, 5, 1, 6)):
        assert not torch.equal(a["truth"], other["truth"]) or not torch.equal(a["image"], other["image"])


def test_a_gold_split_without_truth_or_too_small_is_named(run_shards, tmp_path):
    manifest = read_manifest(run_shards)
    with pytest.raises(ShardError, match="'test' holds 16 studies; data.gold_samples asks for 17"):
        load_gold(run_shards, manifest, "test", [0, 1], samples=17)
    with pytest.raises(ShardError, match="no split 'validate'"):
        load_gold(run_shards, manifest, "validate", [0, 1])
    # a split too large to hold on every rank: refused before reading, pointing at data.gold_samples
    image_bytes = manifest["image_size"] ** 2 * manifest.get("channels", 1)
    with mock.patch("aol_dist.data.gold.GOLD_MEMORY", 10 * image_bytes):
        with pytest.raises(ShardError, match=r"data.gold_split 'test': 16 studies would hold .* GiB of images in "
                                             r"memory on every rank .*; set data.gold_samples"):
            load_gold(run_shards, manifest, "test", [0, 1])
        assert len(load_gold(run_shards, manifest, "test", [0, 1], samples=10)) == 10
    copy = tmp_path / "copy"
    shutil.copytree(run_shards, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["splits"]["test"]["has_truth"] = False
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ShardError, match=r"manifest.json: data.gold_split 'test' has no truth"):
        load_gold(copy, read_manifest(copy), "test", [0, 1])


@pytest.mark.parametrize("method", [["method.name=majority"], ["method.name=aol", "method.trust=attention"]])
def test_gold_split_is_refused_where_no_annotator_model_uses_it(method):
    with pytest.raises(ConfigError, match="data.gold_split fits the annotator model of method aol"):
        load_config(None, [*method, "data.gold_split=validate"])
    with pytest.raises(ConfigError, match="data.gold_samples = 5 without data.gold_split"):
        load_config(None, ["data.gold_samples=5"])
    with pytest.raises(ConfigError, match="method.gold_weight must be > 0"):
        load_config(None, ["data.gold_split=validate", "method.gold_weight=0"])


def test_the_gold_batch_reaches_the_training_step(run_shards, tmp_path, capsys):
    """The same run with and without hand-labelled studies: the annotator model differs, the classifier's
    first step does not (the gold term has no gradient into the classifier)."""
    def run(name, **data):
        config = config_from_dict({
            "data": {"shards": str(run_shards), "batch_size": 4, "shuffle_buffer": 8, "num_workers": 0, **data},
            "model": {"arch": "resnet_tiny"}, "method": {"lr": 1e-3},
            "train": {"steps": 1, "log_every": 1, "checkpoint_every": 0, "out_dir": str(tmp_path), "run_name": name,
                      "eval_batch_size": 8, "plots": False}})
        return torch.load(train(config, D.World()) / "model.pt", weights_only=True)

    plain, gold = run("plain"), run("gold", gold_split="test", gold_samples=12)
    said = " ".join(capsys.readouterr().out.split())
    assert "12 hand-labelled studies of split 'test' fit the trust" in said
    assert "data.gold_split 'test' is also in data.eval_splits" in said  # evaluated on studies it was given
    assert not torch.equal(plain["attention"]["log_table"], gold["attention"]["log_table"])
    assert all(torch.equal(plain["model"][k], gold["model"][k]) for k in plain["model"])


def test_gold_weight_scales_the_gold_term():
    torch.manual_seed(0)
    model = Classifier("resnet_tiny", 3, None)
    trust = LabelTrust(model.feature_dim, 2, 3, input="none")
    x, labels = torch.rand(4, 3, 16, 16), torch.randint(0, 2, (4, 2, 3)).float()
    gold = {"image": torch.rand(5, 3, 16, 16), "labels": torch.randint(0, 2, (5, 2, 3)).float(),
            "truth": torch.randint(0, 2, (5, 3)).float()}
    noisy, _, _ = trust_loss(model, trust, x, labels, TrustHyper(input="none"))
    term = gold_loss(trust, gold)
    for weight in (1.0, 0.3):
        loss, _, _ = trust_loss(model, trust, x, labels, TrustHyper(input="none", gold_weight=weight), gold=gold)
        torch.testing.assert_close(loss, noisy + weight * term)
