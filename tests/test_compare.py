"""`aol compare`: several runs' AUROC per finding side by side."""

import json
import math
import subprocess
import sys

import pytest

from aol_dist.report import compare_runs


def fake_run(path, aucs, findings=("A", "B")):
    path.mkdir()
    auc = {"truth": aucs, "s0": [0.5, 0.5]}
    (path / "auc_test.json").write_text(json.dumps({"findings": list(findings), "samples": 10, "auc": auc,
                                                     "mean_auc": {k: sum(v) / 2 for k, v in auc.items()}}))
    return path


def test_compare_lines_up_runs(tmp_path):
    a = fake_run(tmp_path / "aol", [0.9, 0.7])
    b = fake_run(tmp_path / "single", [0.8, math.nan])
    c = compare_runs([a, b], "test")
    assert c["runs"]["aol"]["auc"] == [0.9, 0.7] and math.isnan(c["runs"]["single"]["auc"][1])
    assert c["runs"]["aol"]["mean"] == pytest.approx(0.8)
    proc = subprocess.run([sys.executable, "-m", "aol_dist.cli", "compare", str(a), str(b)], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "aol" in proc.stdout and "n/a" in proc.stdout


def test_compare_names_the_run_that_lacks_results(tmp_path):
    a = fake_run(tmp_path / "aol", [0.9, 0.7])
    with pytest.raises(FileNotFoundError, match="auc_validate.json"):
        compare_runs([a], "validate")
    b = fake_run(tmp_path / "other", [0.9, 0.7], findings=("A", "C"))
    with pytest.raises(ValueError, match="findings differ"):
        compare_runs([a, b], "test")
    with pytest.raises(ValueError, match=r"auc_test.json: no AUROC against 'negbio'; has \['s0', 'truth'\]"):
        compare_runs([a], "test", "negbio")
    # the command says it in one line
    proc = subprocess.run([sys.executable, "-m", "aol_dist.cli", "compare", str(a), str(tmp_path / "gone")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"aol compare: {tmp_path / 'gone'}/auc_test.json: no results for split 'test' in this run"


def test_trust_vs_truth_names_the_trusted_set_its_accuracy_and_skips_ties():
    from rich.console import Console

    from aol_dist.report import attention_table, trust_vs_truth

    record = {"mean": {"a": 0.6, "b": 0.4}, "steps": [151, 300],
              "per_finding": {"F1": {"a": 0.7, "b": 0.3}, "F2": {"a": 0.6, "b": 0.4}, "tie": {"a": 0.9, "b": 0.1}},
              "accuracy_vs_truth": {"F1": {"a": 0.95, "b": 0.90}, "F2": {"a": 0.80, "b": 0.85},
                                    "tie": {"a": 0.9, "b": 0.9}}}
    rows = trust_vs_truth(record)
    assert [(r["finding"], r["trusted"], r["trusted_accuracy"], r["best"], r["right"]) for r in rows] == [
        ("F1", "a", 0.95, "a", True), ("F2", "a", 0.80, "b", False)]
    console = Console(record=True, width=120)
    console.print(attention_table(record))
    text = " ".join(console.export_text().split())  # titles wrap at the table's width
    assert "right on 1 of 2 findings" in text and "its accuracy" in text and "0.800" in text
    assert "steps 151-300" in text and "trusted most overall: a, the most accurate on average" in text

    # the likelihood-trained trust: "trusted most" ranks by estimated accuracy, not by weight
    record["estimated_accuracy"] = {"F1": {"a": 0.97, "b": 0.91}, "F2": {"a": 0.82, "b": 0.88},
                                    "tie": {"a": 0.95, "b": 0.95}}
    rows = trust_vs_truth(record)
    assert [(r["finding"], r["trusted"], r["trust"], r["right"]) for r in rows] == [("F1", "a", 0.97, True),
                                                                                     ("F2", "b", 0.88, True)]
    console = Console(record=True, width=120)
    console.print(attention_table(record))
    text = " ".join(console.export_text().split())
    assert "right on 2 of 2 findings" in text and "estimated accuracy" in text


def test_trust_scores_count_the_u0_u1_picks_and_the_top_two():
    from rich.console import Console

    from aol_dist.report import attention_table, trust_scores

    sets = ["nb_u0", "nb_u1", "cx_u0", "cx_u1"]

    def per(*rows):
        return {f: dict(zip(sets, r)) for f, r in rows}
    record = {"label_sets": sets, "mean": dict(zip(sets, [0.25] * 4)),
              "per_finding": per(("E", (0.25,) * 4), ("P", (0.25,) * 4), ("C", (0.25,) * 4), ("N", (0.25,) * 4)),
              # E: u1 better, trusted to u1 (right); P: u0 better, trusted to u1 (wrong); C: u0 better, trusted
              # to u0 by the sum over both labelers though negbio leans u1 (right); N: u0 = u1 (not counted)
              "estimated_accuracy": per(("E", (0.90, 0.95, 0.90, 0.96)), ("P", (0.90, 0.93, 0.91, 0.94)),
                                        ("C", (0.95, 0.96, 0.97, 0.90)), ("N", (0.99, 0.99, 0.98, 0.98))),
              "accuracy_vs_truth": per(("E", (0.88, 0.95, 0.89, 0.96)), ("P", (0.96, 0.93, 0.97, 0.94)),
                                       ("C", (0.96, 0.95, 0.97, 0.94)), ("N", (0.97, 0.97, 0.99, 0.99)))}
    scores = trust_scores(record)
    assert scores["uncertain_right"] == 2 and scores["uncertain_of"] == 3
    assert scores["u0_better_right"] == 1 and scores["u0_better_of"] == 2
    # per finding, the one set trusted most against the one most accurate: E cx_u1 yes, P cx_u1 no, C cx_u0 yes,
    # N nb_u0 (0.99) against cx_u0 / cx_u1 (0.99) no
    assert (scores["per_finding_right"], scores["per_finding_of"]) == (2, 4)
    # overall estimated: nb_u1 0.9575 first; accuracy on average: cx_u0 0.9725, cx_u1 0.9575, nb_u1 0.95
    assert scores["trusted_most"] == "nb_u1" and scores["trusted_in_top_two"] is False
    console = Console(record=True, width=140)
    console.print(attention_table(record))
    text = " ".join(console.export_text().split())
    assert "leans to the more accurate of u0 / u1 on 2 of 3 findings (1 of 2 where u0 is)" in text
    assert trust_scores({**record, "accuracy_vs_truth": None}) is None  # no truth: nothing to score
    plain = {**record, "label_sets": ["a", "b"], "mean": {"a": 0.5, "b": 0.5},
             "per_finding": {"F": {"a": 0.6, "b": 0.4}}, "accuracy_vs_truth": {"F": {"a": 0.9, "b": 0.8}}}
    plain.pop("estimated_accuracy")
    assert trust_scores(plain) == {"per_finding_right": 1, "per_finding_of": 1, "trusted_most": "a",
                                   "trusted_in_top_two": True}  # no u0 / u1 pairs: no picks counted
