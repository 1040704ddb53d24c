"""scripts/gpu_check.sh: it parses, its dry run names every part and runs nothing, and a miniature real
run on the CPU writes a summary that agrees with the run's own log (the GPU figures: docs/performance.md)."""

import json
import os
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "scripts/gpu_check.sh"
PYTHON = ".venv/bin/python" if (ROOT / ".venv/bin/python").exists() else "python3"


def run_script(*args, **env):
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def test_script_parses():
    proc = subprocess.run(["bash", "-n", SCRIPT], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_script_runs_as_the_docs_show_it():
    """``scripts/gpu_check.sh OUT_DIR`` (docs/performance.md) needs the executable bit in git: without it
    the lent GPU machine answered 'Permission denied'."""
    listing = subprocess.run(["git", "ls-files", "-s", "scripts"], cwd=ROOT, capture_output=True, text=True)
    if listing.returncode != 0 or not listing.stdout:
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (ROOT / "scripts").glob("*.sh")}
        assert all(os.access(ROOT / "scripts" / n, os.X_OK) for n in modes), modes
        return
    modes = {line.split("\t")[1]: line.split()[0] for line in listing.stdout.splitlines()}
    assert all(mode == "100755" for path, mode in modes.items() if path.endswith(".sh")), modes


def test_dry_run_names_every_part_and_runs_nothing(tmp_path):
    out = tmp_path / "check"
    proc = run_script(str(out), DRY_RUN="1", PYTHON="/opt/py/bin/python3")
    assert proc.returncode == 0, proc.stderr
    lines = [li for li in proc.stdout.splitlines() if li.startswith("[")]
    assert [li[1:].split(",")[0] for li in lines] == ["env", "shards", "bench_step", "bench_loader", "train", "summary"]
    by_part = {li[1:].split(",")[0]: li.split("] ", 1)[1] for li in lines}
    assert all(cmd.startswith("/opt/py/bin/python3 ") for cmd in by_part.values())  # PYTHON is honoured
    step = shlex.split(by_part["bench_step"])
    assert step[1:5] == ["-m", "aol_dist.cli", "bench", "step"]
    for flag, value in (("--arch", "resnet50"), ("--size", "256"), ("--batch", "32"), ("--device", "cuda")):
        assert step[step.index(flag) + 1] == value
    assert {"--bf16", "--channels-last", "--json"} <= set(step)
    assert step[-2:] == [">", str(out / "bench_step.json")]
    synth = shlex.split(by_part["shards"])
    assert synth[3:5] == ["shards", "synth"] and synth[synth.index("--image-size") + 1] == "256"
    assert synth[synth.index("--out") + 1] == str(out / "shards")
    loader = shlex.split(by_part["bench_loader"])
    assert loader[3:5] == ["bench", "loader"] and "--json" in loader and loader[loader.index("--shards") + 1] == str(out / "shards")
    train = shlex.split(by_part["train"])
    assert train[1:3] == ["-m", "aol_dist.train"]
    overrides = dict(a.split("=", 1) for a in train if "=" in a)
    assert overrides["model.arch"] == "resnet50" and overrides["data.batch_size"] == "32"
    assert overrides["train.steps"] == "300" and overrides["data.shards"] == str(out / "shards")
    assert not out.exists()  # nothing ran


def test_out_dir_and_training_overrides_from_environment(tmp_path):
    proc = run_script(DRY_RUN="1", OUT_DIR=str(tmp_path / "from-env"), TRAIN_OVERRIDES="method.meta_scope=partial")
    assert proc.returncode == 0, proc.stderr
    assert f"--out {tmp_path / 'from-env' / 'shards'} " in proc.stdout
    train = [li for li in proc.stdout.splitlines() if li.startswith("[train,")][0]
    assert shlex.split(train)[-1] == "method.meta_scope=partial"


def test_miniature_cpu_run_summarises_its_own_log(tmp_path):
    """Every part for real at toy size on the CPU: the summary's training figures come from log.jsonl."""
    out = tmp_path / "check"
    proc = run_script(str(out), DEVICE="cpu", ARCH="resnet_tiny", SIZE="32", BATCH="8", STEP_FLAGS="", REPEATS="1",
                      STEPS="20", TRAIN_SAMPLES="96", TEST_SAMPLES="16", NUM_WORKERS="1", PYTHON=PYTHON,
                      OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [p for p, v in summary["parts"].items() if v["exit"] != 0] == []
    assert set(summary["parts"]) == {"env", "shards", "bench_step", "bench_loader", "train"}
    assert set(summary["bench_step"]) == {"plain", "reference", "fast", "fast_autograd", "partial"}
    assert summary["bench_step"]["plain"]["ratio"] == 1.0
    step = json.loads((out / "bench_step.json").read_text())
    assert summary["bench_step"]["fast"]["images_per_s"] == 8 / step["fast_s"]
    loader = json.loads((out / "bench_loader.json").read_text())
    assert loader["gpu_rate_is_estimate"] is False and abs(loader["gpu_images_per_s"] - 8 / step["fast_s"]) < 1e-6
    records = [json.loads(li) for li in (Path(summary["run_dir"]) / "log.jsonl").read_text().splitlines()]
    steady = records[1:]  # steps 20 (the first window, steps 1-10, is start-up)
    train = summary["train"]
    assert train["steps"] == 20 and train["log_records"] == 2
    assert abs(train["step_time_s"] - steady[0]["step_time_s"]) < 1e-9
    assert abs(train["data_wait_share"] - steady[0]["data_wait_s"] / (10 * steady[0]["step_time_s"])) < 1e-9
    assert 0 <= train["data_wait_share"] <= 1
    assert train["method"]["name"] == "aol" and train["num_workers"] == 1  # read from the run's config.toml
    md = (out / "summary.md").read_text()
    assert "| fast_autograd |" in md and "data-wait share" in md and "images/s per CPU core" in md
