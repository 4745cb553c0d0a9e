"""The trainer survives its own crash (--resume) and a scoring-server restart."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PY = sys.executable


def _train(*args, **kw):
    return subprocess.run([PY, "-m", "dataselect.client.cli", *args], capture_output=True, text=True, timeout=600, **kw)


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _start_server(port=0):
    proc = subprocess.Popen([PY, "-m", "dataselect.server.cli", "--device", "cpu", "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.match(r"listening on (\S+):(\d+)", line.strip())
    assert match, f"server did not start: {line!r}"
    return proc, int(match.group(2))


COMMON = ["--strategy", "high_loss", "--dataset", "synthetic", "--device", "cpu", "--threads", "1", "-q"]


def test_resume_after_a_crash_matches_the_uninterrupted_run(tmp_path):
    whole = tmp_path / "whole"
    assert _train(*COMMON, "--epochs", "3", "--output", str(whole)).returncode == 0
    part = tmp_path / "part"
    proc = subprocess.Popen([PY, "-m", "dataselect.client.cli", *COMMON, "--epochs", "3", "--output", str(part)])
    _wait_for(lambda: (part / "metrics.jsonl").exists() and (part / "metrics.jsonl").read_text().count("\n") >= 1,
              300, "the first epoch")
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    resumed = _train("--resume", str(part), "--json")
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads(resumed.stdout)
    want = json.loads((whole / "summary.json").read_text())
    assert got["resumes"] == 1
    assert got["epochs_completed"] == 3
    assert got["samples_trained"] == want["samples_trained"]
    assert got["test_accuracy"] == pytest.approx(want["test_accuracy"], abs=1e-9)
    lines = [json.loads(l) for l in (part / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3]
    again = _train("--resume", str(part))
    assert again.returncode != 0 and "already finished" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.slow
def test_training_completes_across_a_server_kill_and_restart(tmp_path):
    server, port = _start_server()
    out = tmp_path / "run"
    args = [*COMMON, "--epochs", "2", "--server", f"127.0.0.1:{port}", "--output", str(out), "--retry-seconds", "60"]
    trainer = subprocess.Popen([PY, "-m", "dataselect.client.cli", *args], stderr=subprocess.PIPE, text=True)
    replacement = None
    try:
        _wait_for(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 1,
                  300, "the first epoch")
        server.send_signal(signal.SIGKILL)
        server.wait()
        time.sleep(0.5)  # the trainer meets a dead server for a while
        replacement, _ = _start_server(port)
        _, err = trainer.communicate(timeout=300)
        assert trainer.returncode == 0, err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["reconnects"] >= 1
        assert summary["epochs_completed"] == 2
        assert summary["scorer"] == "remote"
    finally:
        for proc in (trainer, server, replacement):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_resume_keeps_a_static_core_set(tmp_path):
    """MRMC selects its core-set once; a run resumed after that trains on the same core-set, so it ends
    exactly where the uninterrupted run does (the strategy's own state starts afresh, but is not needed)."""
    import torch

    from dataselect.checkpoint import load_checkpoint, save_checkpoint
    from dataselect.client.train import TrainConfig, resume, train

    def config(epochs, output):
        return TrainConfig(strategy="mrmc", options={"warmup_epochs": 1}, dataset="synthetic", train_subset=300,
                           test_subset=200, epochs=epochs, device="cpu", threads=1, progress=False,
                           output=str(output))

    whole = train(config(3, tmp_path / "whole"))
    train(config(2, tmp_path / "part"))  # warm-up, then the core-set is selected and trained on once
    path = tmp_path / "part" / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    assert ckpt["resume"]["loader"]["selection"]["positions"].numel() == 150
    ckpt["config"]["epochs"] = 3  # as if the run had been stopped after its second epoch
    save_checkpoint(ckpt, path)
    resumed = resume(tmp_path / "part")
    assert resumed["refreshes"] == 1 and resumed["resumes"] == 1  # no new selection after resuming
    assert resumed["samples_trained"] == whole["samples_trained"] == 300 + 2 * 150
    assert resumed["test_loss"] == pytest.approx(whole["test_loss"], abs=1e-6)
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    assert torch.equal(ckpt["resume"]["loader"]["selection"]["positions"],
                       load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["resume"]["loader"]["selection"]["positions"])
