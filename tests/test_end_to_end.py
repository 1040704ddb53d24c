"""The user's path: `aol shards synth` -> inspect/verify -> `accelerate launch -m aol_dist.train` on 2 CPU processes
-> AUC tables in a finished run directory -> `aol eval`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    run([BIN / "aol", "shards", "synth", "--out", out, "--train", "160", "--validate", "0", "--test", "80",
         "--image-size", "32", "--samples-per-shard", "20", "--workers", "2"])
    return out


def test_synth_shards_verify_and_inspect(synth_dir):
    assert "ok" in run([BIN / "aol", "shards", "verify", synth_dir]).stdout
    summary = json.loads(run([BIN / "aol", "shards", "inspect", synth_dir, "--json"]).stdout)
    assert summary["splits"]["train"]["samples"] == 160 and summary["splits"]["test"]["samples"] == 80
    assert summary["label_sets"] == ["negbio_u0", "negbio_u1", "chexpert_u0", "chexpert_u1"]
    assert len(summary["findings"]) == 14
    # a re-run finds every shard finished and rewrites nothing
    again = run([BIN / "aol", "shards", "synth", "--out", synth_dir, "--train", "160", "--validate", "0", "--test",
                 "80", "--image-size", "32", "--samples-per-shard", "20"])
    assert "reused 12 finished shards" in again.stdout


def test_accelerate_launch_two_processes_then_eval(synth_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    proc = run([BIN / "accelerate", "launch", "--config_file", "launch_configs/cpu_2proc.yaml",
                "--main_process_port", str(free_port()), "-m", "aol_dist.train", "--config", "configs/demo.toml",
                f"data.shards={synth_dir}", "train.steps=4", "train.log_every=2", f"train.out_dir={runs}",
                "train.run_name=smoke", "data.batch_size=8"])
    assert "AUROC per finding" in proc.stdout and "Mean" in proc.stdout
    run_dir = runs / "smoke"
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "attention.json", "auc_test.csv", "auc_test.json", "checkpoints", "config.toml", "log.jsonl", "model.pt",
        "plots", "roc_test.json"]
    result = json.loads((run_dir / "auc_test.json").read_text())
    assert result["samples"] == 80 and len(result["auc"]["truth"]) == 14
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]
    # the trust attention.json reports is the second half of training (steps 3-4, the last log window here),
    # averaged over both ranks as the log averages it; with each set's estimated accuracy per finding
    trust = json.loads((run_dir / "attention.json").read_text())
    assert trust["steps"] == [3, 4]
    assert {k: round(v, 5) for k, v in trust["mean"].items()} == pytest.approx(log[-1]["attention"], abs=2e-5)
    estimated = trust["estimated_accuracy"]
    assert set(estimated) == set(result["findings"]) and all(
        set(v) == set(trust["label_sets"]) and all(0 <= a <= 1 for a in v.values()) for v in estimated.values())
    for name in trust["label_sets"]:  # the log's last window is the same steps: the same mean over findings
        mean = sum(v[name] for v in estimated.values()) / len(estimated)
        assert log[-1]["estimated_accuracy"][name] == pytest.approx(mean, abs=2e-5)
    config_text = (run_dir / "config.toml").read_text()
    assert config_text.startswith("# git revision: ") and "steps = 4" in config_text

    ev = run([BIN / "aol", "eval", run_dir, "--split", "test", "--out", tmp_path / "ev"])
    again = json.loads((tmp_path / "ev" / "auc_test.json").read_text())
    for target, values in result["auc"].items():  # same weights, same split: the same AUCs
        torch.testing.assert_close(torch.tensor(again["auc"][target]), torch.tensor(values), equal_nan=True)
    assert "Mean" in ev.stdout

    # a run whose saved weights this version builds differently (here: one renamed parameter): one line that
    # names the file, not a state-dict traceback
    from aol_dist.cli import main as aol_main

    saved = torch.load(run_dir / "model.pt", weights_only=True)
    saved["model"]["old_name.weight"] = saved["model"].pop("head.weight")
    torch.save(saved, run_dir / "model.pt")
    assert aol_main(["eval", str(run_dir), "--split", "test", "--out", str(tmp_path / "ev2")]) == 1
    err = capsys.readouterr().err
    assert f"{run_dir / 'model.pt'}: the saved model does not fit" in err
    assert "not in the file: head.weight" in err and "not in this version: old_name.weight" in err


def test_bad_override_is_a_clear_error_before_launch():
    proc = subprocess.run([sys.executable, "-m", "aol_dist.train", "train.steps=zero"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "train.steps: cannot read 'zero' as int" in proc.stderr


def test_a_crashed_run_leaves_no_directory_under_its_final_name(tmp_path, monkeypatch):
    from aol_dist import loop
    from aol_dist.config import config_from_dict
    from aol_dist.dist import World
    from helpers import write_fake_shards

    write_fake_shards(tmp_path / "shards", {"train": [12], "test": [4]})
    calls = []

    def dying_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return {"loss": torch.tensor(0.5)}

    monkeypatch.setattr("aol_dist.parts.aol_step", dying_step)
    config = config_from_dict({"data": {"shards": str(tmp_path / "shards"), "batch_size": 4, "num_workers": 0},
                               "model": {"arch": "resnet_tiny"}, "method": {"trust": "attention"},
                               "train": {"steps": 3, "out_dir": str(tmp_path / "runs"), "run_name": "x"}})
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.train(config, World())
    assert not (tmp_path / "runs" / "x").exists() and (tmp_path / "runs" / "x.incomplete").is_dir()


def test_training_on_evaluation_only_shards_says_so(tmp_path):
    from aol_dist.config import config_from_dict
    from aol_dist.data import shards
    from aol_dist.dist import World
    from aol_dist.loop import train
    from helpers import FINDINGS, fake_sample

    def no_label_sets(i):
        s = fake_sample(i)
        return {**s, "labels": s["labels"][:0]}

    records, _ = shards.write_split(tmp_path, [shards.ShardJob("test-000000.tar", tuple(range(4)))], no_label_sets)
    shards.write_manifest(tmp_path, dataset="openi-like", findings=FINDINGS, label_sets=[], splits={"test": records},
                          image_size=8, has_truth={"test": True})
    config = config_from_dict({"data": {"shards": str(tmp_path), "train_split": "test", "batch_size": 2},
                               "model": {"arch": "resnet_tiny"}, "train": {"out_dir": str(tmp_path / "runs")}})
    with pytest.raises(ValueError, match="no noisy label sets"):
        train(config, World())
