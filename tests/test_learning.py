"""Does the method learn? One clean label set among heavily corrupted ones (CPU, seconds): the paper's attention
(trust = attention) and the default likelihood-trained trust (trust = posterior), against majority vote and the
soft average trained on the same data, steps and seeds."""

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multilabel_auroc

from aol_dist.data.synth import synth_study
from aol_dist.method.aol import AolHyper, aol_step
from aol_dist.method.baselines import majority_target, plain_step, soft_average_target
from aol_dist.method.trust import LabelTrust, TrustHyper, trust_step
from aol_dist.model.attention import LabelAttention
from aol_dist.model.backbone import Classifier

N_TRAIN, N_TEST, STEPS, BATCH, FLIP = 1200, 500, 200, 32, 0.4
TARGETS = {"majority": majority_target, "soft_average": soft_average_target}


def data():
    studies = [synth_study(i, 0, 32) for i in range(N_TRAIN + N_TEST)]
    x = torch.tensor(np.stack([s["image"] for s in studies]))[:, None].float() / 255
    truth = torch.tensor(np.stack([s["truth"] for s in studies])).float()
    rng = np.random.default_rng(0)
    corrupted = [(truth + torch.tensor(rng.random(truth.shape) < FLIP).float()) % 2 for _ in range(3)]
    labels = torch.stack([truth, *corrupted], dim=1)  # label set 0 is clean, 1..3 flip 40% of entries
    return x[:N_TRAIN], labels[:N_TRAIN], x[N_TRAIN:], truth[N_TRAIN:]


def train(method, x, labels, scope="full"):
    torch.manual_seed(0)
    model = Classifier("resnet_tiny", labels.shape[2])
    attention = LabelAttention(model.feature_dim, labels.shape[1], labels.shape[2])
    opt, att_opt = torch.optim.Adam(model.parameters(), 1e-3), torch.optim.SGD(attention.parameters(), 0.05)
    trust = LabelTrust(model.feature_dim, labels.shape[1], labels.shape[2], input="none")  # the multi-label default
    trust_opt = torch.optim.Adam(trust.parameters(), 5e-2)  # method.trust_lr
    g = torch.Generator().manual_seed(1)
    weights = []
    for _ in range(STEPS):
        idx = torch.randint(0, len(x), (BATCH,), generator=g)
        if method == "aol":
            out = aol_step(model, attention, opt, att_opt, x[idx], labels[idx], AolHyper(scope=scope))
            weights.append(out["weights"].mean(0).squeeze(-1))
        elif method == "posterior":
            out = trust_step(model, trust, opt, trust_opt, x[idx], labels[idx], TrustHyper(input="none"))
            weights.append(out["weights"].mean((0, 2)))
        elif method in TARGETS:
            plain_step(model, opt, x[idx], TARGETS[method](labels[idx]))
        else:
            plain_step(model, opt, x[idx], labels[idx][:, method])
    return model.eval(), (torch.stack(weights[-50:]).mean(0) if weights else None)


def truth_auc(model, x, truth):
    with torch.no_grad():
        return multilabel_auroc(torch.sigmoid(model(x)), truth.long(), truth.shape[1], average="macro").item()


@pytest.mark.parametrize("scope", ["full", "partial"])
def test_attention_trusts_the_clean_label_set_and_beats_a_corrupted_one(scope):
    torch.set_num_threads(2)
    x, labels, x_test, truth = data()
    model, weights = train("aol", x, labels, scope)
    assert weights.argmax() == 0 and weights[0] > 0.5, weights
    corrupted_model, _ = train(1, x, labels)
    aol_auc, corrupted_auc = truth_auc(model, x_test, truth), truth_auc(corrupted_model, x_test, truth)
    assert aol_auc > corrupted_auc + 0.1, (aol_auc, corrupted_auc)


def test_default_trust_finds_the_clean_set_and_beats_majority_vote_and_soft_average():
    torch.set_num_threads(2)
    x, labels, x_test, truth = data()
    model, weights = train("posterior", x, labels)
    # w_m: the posterior probability that set m is right, normalised over m: 1/M wherever the sets agree
    assert weights.argmax() == 0 and weights[0] > 1.5 * weights[1:].max(), weights
    auc = {m: truth_auc(train(m, x, labels)[0], x_test, truth) for m in TARGETS}
    auc["posterior"] = truth_auc(model, x_test, truth)
    assert auc["posterior"] > max(auc["majority"], auc["soft_average"]) + 0.02, auc
