"""Run reports: PNG plots from a run directory's files, ROC points from evaluate(), TensorBoard or a clear message."""

import io
import json
import math

import pytest
import torch

from aol_dist import plots
from aol_dist.data.shards import read_manifest, split_shards
from aol_dist.data.stream import EvalStream, make_loader
from aol_dist.dist import World
from aol_dist.evaluate import evaluate
from aol_dist.loop import Log
from aol_dist.model.backbone import Classifier
from helpers import FINDINGS, LABEL_SETS, write_fake_shards


def _fake_run(run, truth=True):
    run.mkdir()
    log = [{"step": s, "epoch": 0, "loss": 0.7 / s ** 0.3, "samples_per_s": 100 + s, "data_wait_s": 0.01,
            "lr": 1e-3, "attention_lr": 0.05, "skipped_steps": int(s >= 30), "world_size": 2,
            "attention": {"s0": 0.5 + s / 200, "s1": 0.5 - s / 200}} for s in range(10, 60, 10)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    targets = (["truth"] if truth else []) + list(LABEL_SETS)
    grid = [i / 10 for i in range(11)]
    roc = {t: {"fpr": [grid] * len(FINDINGS), "tpr": [[min(1.0, 1.5 * x) for x in grid]] * len(FINDINGS)}
           for t in targets}
    (run / "roc_test.json").write_text(json.dumps({"step": 50, "roc": roc}))
    auc = {t: [0.8, math.nan, 0.7] for t in targets}
    (run / "auc_test.json").write_text(json.dumps({"samples": 40, "findings": list(FINDINGS), "auc": auc}))


@pytest.mark.parametrize("truth", [True, False])
def test_plots_from_a_run_directory(tmp_path, truth):
    run = tmp_path / "run"
    _fake_run(run, truth)
    written = plots.write_plots(run)
    assert [p.name for p in written] == ["training_curves.png", "attention.png", "roc_test.png"]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    assert not list((run / "plots").glob(".*"))  # no temporary files left
    assert plots.main([str(run)]) == 0 and plots.main([str(tmp_path / "missing")]) == 2


def test_a_baseline_run_without_attention_gets_no_attention_plot(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text(json.dumps({"step": 1, "loss": None, "samples_per_s": 1.0, "data_wait_s": 0.0}) + "\n")
    assert [p.name for p in plots.write_plots(run)] == ["training_curves.png"]


def test_evaluate_roc_points_are_additive_and_monotone(tmp_path):
    write_fake_shards(tmp_path, {"test": [9, 7]})
    manifest = read_manifest(tmp_path)
    torch.manual_seed(0)
    model = Classifier("resnet_tiny", len(FINDINGS))

    def run(thresholds):
        stream = EvalStream(split_shards(tmp_path, manifest, "test"), 0, 1, batch_size=4)
        return evaluate(model, make_loader(stream, 0), list(LABEL_SETS), list(FINDINGS), World(), roc_thresholds=thresholds)

    plain, with_roc = run(0), run(50)
    assert "roc" not in plain and {k: v for k, v in with_roc.items() if k != "roc"} == plain
    assert set(with_roc["roc"]) == {"truth", *LABEL_SETS}
    fpr = torch.tensor(with_roc["roc"]["truth"]["fpr"])
    assert fpr.shape == (len(FINDINGS), 50) and bool((fpr.diff(dim=1) >= 0).all())


def test_tensorboard_writes_events_or_says_why_not(tmp_path):
    from rich.console import Console

    buffer = io.StringIO()
    log = Log(tmp_path, True, tensorboard=True, console=Console(file=buffer, width=200))
    log.write({"step": 1, "loss": 0.5, "attention": {"s0": 0.6, "s1": 0.4}})
    log.close()
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert "tensorboard package is not installed" in buffer.getvalue()
        assert not (tmp_path / "tensorboard").exists()
    else:
        assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "log.jsonl").read_text())["loss"] == 0.5


def test_scaling_table_and_plot_from_runs(tmp_path):
    runs = []
    for gpus, speed in ((1, 100.0), (2, 190.0), (4, 340.0)):
        run = tmp_path / f"scale-{gpus}gpu-7"
        run.mkdir()
        records = [{"step": s, "samples_per_s": speed * (0.5 if s == 10 else 1.0), "world_size": gpus} for s in (10, 20, 30)]
        (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        runs.append(run)
    assert plots.main(["scaling", *map(str, runs[::-1]), "--out", str(tmp_path / "out")]) == 0
    rows = (tmp_path / "out" / "scaling.csv").read_text().splitlines()
    assert rows[0] == "gpus,samples_per_s,samples_per_s_per_gpu,speedup,efficiency,run"
    assert rows[1:] == ["1,100.00,100.00,1.000,1.000,scale-1gpu-7", "2,190.00,95.00,1.900,0.950,scale-2gpu-7",
                        "4,340.00,85.00,3.400,0.850,scale-4gpu-7"]
    assert (tmp_path / "out" / "scaling.png").stat().st_size > 10_000


def test_the_attention_plot_adds_estimated_against_real_accuracy_where_the_log_has_them(tmp_path):
    def width(png):  # the PNG header's IHDR width
        return int.from_bytes(png.read_bytes()[16:20], "big")

    log = [{"step": s, "attention": {"s0": 0.5, "s1": 0.5}} for s in (10, 20)]
    plain = plots.attention_over_time(log, tmp_path / "plain.png", "run")
    for r in log:
        r["estimated_accuracy"] = {"s0": 0.9, "s1": 0.8}
        r["diagnostics"] = {"set_accuracy": {"s0": 0.88, "s1": 0.81}}
    both = plots.attention_over_time(log, tmp_path / "both.png", "run")
    assert width(both) > 1.5 * width(plain)  # a second panel
