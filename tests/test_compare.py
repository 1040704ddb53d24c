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
