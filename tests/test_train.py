"""The trainer: fixed budgets honoured, LR really decays, divergence is a result, checkpoints resume exactly."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blueberry.config import load_config
from blueberry.train.metrics import mfu, peak_flops
from blueberry.train.trainer import train
from tests.conftest import tiny_run_overrides

REPO = Path(__file__).resolve().parent.parent


class RecordingTracker:
    run_id = "test"

    def __init__(self):
        self.metrics, self.params, self.tags, self.texts = [], {}, {}, {}

    def log_params(self, params):
        self.params.update(params)

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, local_path, artifact_path=None):
        pass

    def log_text(self, text, artifact_file):
        self.texts[artifact_file] = text

    def series(self, name):
        return [(s, m[name]) for s, m in self.metrics if name in m]


def cfg_for(corpus_dir, cache_dir, **extra):
    return load_config(data={"preset": "tiny"}, overrides=tiny_run_overrides(corpus_dir, cache_dir, **extra))


def test_steps_budget_and_metric_names(corpus_dir, cache_dir, tmp_path):
    tr = RecordingTracker()
    res = train(cfg_for(corpus_dir, cache_dir), tracker=tr, run_dir=tmp_path / "run", progress=False)
    assert res.status == "finished" and res.steps == 20
    assert res.tokens_seen == 20 * 4 * 32
    names = set().union(*(m.keys() for _, m in tr.metrics))
    for n in ("val_loss", "val_ppl", "val_acc", "val_bpb", "train_loss", "lr", "grad_norm", "tokens_per_sec",
              "peak_mem_mb", "tokens_seen", "train_time_s"):
        assert n in names, n
    evals = tr.series("val_loss")
    assert len(evals) == 10 and evals[-1][0] == 20  # every 10% and at the end
    assert evals[-1][1] < math.log(300)  # learned something
    for k in ("val_loss", "val_bpb", "steps", "tokens_seen", "train_time_s", "wall_time_s", "params"):
        assert k in res.metrics
    assert tr.params["model.n_layers"] == 2 and "routing_table.txt" in tr.texts
    assert tr.texts["sample.txt"].startswith("Mr. Speaker") and len(tr.texts["sample.txt"]) > 40
    assert tr.tags["git_commit"] and tr.tags["precision"] == "fp32"


def test_lr_decays_to_end_value_at_end_of_budget(corpus_dir, cache_dir, tmp_path):
    """Seed bug 2: the LR must reach the schedule's end value exactly when the budget ends."""
    tr = RecordingTracker()
    cfg = cfg_for(corpus_dir, cache_dir, **{"schedule.name": "cosine", "schedule.min_lr_ratio": 0.1,
                                            "schedule.warmup": 0.1, "optim.name": "adamw", "optim.lr": 0.002})
    train(cfg, tracker=tr, run_dir=tmp_path / "run", progress=False)
    lrs = [v for _, v in tr.series("lr")]
    assert lrs[0] < 0.002 * 0.6  # warming up
    assert max(lrs) == pytest.approx(0.002, rel=0.05)
    assert lrs[-1] == pytest.approx(0.002 * 0.1, rel=1e-6)


def test_time_budget_is_honoured_within_one_step(corpus_dir, cache_dir, tmp_path):
    tr = RecordingTracker()
    cfg = cfg_for(corpus_dir, cache_dir, **{"budget.steps": None, "budget.time": 2.0, "schedule.name": "linear",
                                            "schedule.min_lr_ratio": 0.0, "optim.name": "adamw"})
    res = train(cfg, tracker=tr, run_dir=tmp_path / "run", progress=False)
    times = [m["train_time_s"] for _, m in tr.metrics if "lr" in m]  # one record per training step
    step_time = max(b - a for a, b in zip(times, times[1:]))
    assert 2.0 <= res.train_time_s < 2.0 + step_time + 1e-6
    assert res.wall_time_s >= res.train_time_s
    # The last step's LR is decided before it runs: at most the fraction of the budget left at its start.
    remaining = (2.0 - times[-2]) / 2.0
    assert tr.series("lr")[-1][1] / 1e-2 <= remaining + 1e-9
    assert remaining <= step_time / 2.0 + 1e-9


def test_divergence_is_a_result_not_a_crash(corpus_dir, cache_dir, tmp_path):
    cfg = cfg_for(corpus_dir, cache_dir, **{"optim.name": "adamw", "optim.lr": 1e4, "optim.grad_clip": None,
                                            "train.loss_ceiling": 8.0, "model.zero_init_outputs": False})
    res = train(cfg, run_dir=tmp_path / "run", progress=False)
    assert res.status == "diverged"
    assert res.steps < 20


def test_checkpoints_are_complete_and_loadable(corpus_dir, cache_dir, tmp_path):
    from blueberry.checkpoint import load_model, verify_checkpoint

    res = train(cfg_for(corpus_dir, cache_dir), run_dir=tmp_path / "run", progress=False)
    last = verify_checkpoint(tmp_path / "run" / "checkpoints" / "last")
    assert last.meta["state"]["used"]["steps"] == 20 and last.meta["state"]["status"] == "finished"
    assert res.checkpoint is not None
    model, cfg, tok, meta = load_model(res.checkpoint)
    assert tok is not None and cfg.model.vocab_size == tok.get_vocab_size()
    state = load_file(res.checkpoint / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in state.values())
    # A finished run called again trains nothing more and returns the same result.
    again = train(cfg_for(corpus_dir, cache_dir), run_dir=tmp_path / "run", progress=False)
    assert again.steps == 20 and again.metrics["val_loss"] == res.metrics["val_loss"]


def _run_script(run_dir, corpus_dir, cache_dir, steps):
    over = tiny_run_overrides(corpus_dir, cache_dir, **{"budget.steps": steps, "eval.every": 0.05})
    code = (
        "import sys; from blueberry.config import load_config; from blueberry.train.trainer import train\n"
        f"cfg = load_config(data={{'preset': 'tiny'}}, overrides={over!r})\n"
        f"r = train(cfg, run_dir={str(run_dir)!r}, progress=False)\n"
        "print('RESULT', r.steps, r.tokens_seen)\n"
    )
    return [sys.executable, "-c", code]


def test_resume_after_sigkill_equals_uninterrupted(corpus_dir, cache_dir, tmp_path):
    """SIGKILL mid-run, restart: same final weights as a run that was never interrupted (CPU)."""
    steps = 120
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(_run_script(tmp_path / "ref", corpus_dir, cache_dir, steps), env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(_run_script(run_dir, corpus_dir, cache_dir, steps), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    meta = run_dir / "checkpoints" / "last" / "meta.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if meta.is_file():
            try:
                if json.loads(meta.read_text())["state"]["used"]["steps"] >= 18:
                    break
            except (json.JSONDecodeError, KeyError):
                pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = json.loads(meta.read_text())["state"]["used"]["steps"]
    assert killed_at < steps, "the run finished before it could be killed"

    again = subprocess.run(_run_script(run_dir, corpus_dir, cache_dir, steps), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"RESULT {steps} {steps * 4 * 32}" in again.stdout
    a = load_file(tmp_path / "ref" / "checkpoints" / "last" / "model.safetensors")
    b = load_file(run_dir / "checkpoints" / "last" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_mfu_arithmetic():
    assert mfu(1_000_000, 1000.0, 1e12) == pytest.approx(1e-3)
    assert mfu(6, 10.0, None) is None
    assert peak_flops(torch.device("cpu"), "fp32", None) is None
    assert peak_flops(torch.device("cpu"), "fp32", 0.18) == pytest.approx(0.18e12)


def test_mfu_table_knows_common_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    assert peak_flops(torch.device("cuda", 0), "fp16") == pytest.approx(65e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda", 0), "bf16") == pytest.approx(989e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 PCIe")
    assert peak_flops(torch.device("cuda", 0), "bf16") == pytest.approx(756e12)
