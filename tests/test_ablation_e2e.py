"""run_ablation.py end to end with the REAL trainer on a tiny corpus: MLflow holds what the report says."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from blueberry import ablation
from blueberry.errors import run_cli
from blueberry.train.trainer import train as real_train
from tests.test_report import _cells

REPO = Path(__file__).resolve().parent.parent


def _spec(tmp_path, corpus_dir, cache_dir, steps):
    spec = tmp_path / "e2e.yaml"
    spec.write_text(f"""\
name: e2e
preset: tiny
model: {{n_layers: 2, d_model: 32, n_heads: 4, n_kv_heads: 2, seq_len: 32, ffn_mult: 2}}
tokenizer: {{vocab_size: 300}}
data: {{source: {corpus_dir}, cache_dir: {cache_dir}}}
eval: {{val_tokens: 2048, every: 0.25}}
train: {{micro_batch: 4, grad_accum: 1}}
budget: {{steps: {steps}}}
seeds: [0, 1]
baseline: qk_on
variants:
  qk_on: {{}}
  qk_off: {{model.qk_norm: false}}
""")
    return spec


def _children(client):
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if "variant" in r.data.tags]


@pytest.mark.slow
def test_real_ablation_logs_what_the_report_shows_and_reruns_train_nothing(corpus_dir, cache_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = _spec(tmp_path, corpus_dir, cache_dir, steps=8)
    calls = []

    def counting_train(*args, **kwargs):
        calls.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(ablation, "train_fn", counting_train)
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: ablation.main([str(spec), "--no-progress"]))
    assert e.value.code == 0 and len(calls) == 4

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    children = _children(client)
    assert len(children) == 4
    for r in children:
        assert r.info.status == "FINISHED" and r.data.tags["status"] == "finished"
        for tag in ("ablation", "variant", "seed", "config_hash", "git_commit", "device", "checkpoint"):
            assert r.data.tags.get(tag), tag
        for m in ("val_loss", "val_bpb", "val_ppl", "val_acc", "train_loss", "tokens_per_sec", "tokens_seen", "train_time_s"):
            assert m in r.data.metrics, m
        assert Path(r.data.tags["checkpoint"], "model.safetensors").is_file()
        history = client.get_metric_history(r.info.run_id, "val_loss")
        assert [h.step for h in history] == [2, 4, 6, 8]

    results = _cells((tmp_path / "reports" / "e2e.md").read_text(), "Results")
    for variant in ("qk_on", "qk_off"):
        bpb = [r.data.metrics["val_bpb"] for r in children if r.data.tags["variant"] == variant]
        assert results[variant][3] == f"{np.mean(bpb):.4f} ± {np.std(bpb, ddof=1):.4f}"

    with pytest.raises(SystemExit) as e:
        run_cli(lambda: ablation.main([str(spec), "--no-progress"]))
    assert e.value.code == 0 and len(calls) == 4  # nothing trained again
    assert len(_children(client)) == 4

    # inference.py with no arguments picks the trained run with the lowest val_bpb from this store.
    best = min(children, key=lambda r: r.data.metrics["val_bpb"])
    out = subprocess.run(
        [sys.executable, str(REPO / "inference.py"), "--json", "--max-new-tokens", "4", "--seed", "0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert best.info.run_id in out.stderr + out.stdout


@pytest.mark.slow
def test_sigkilled_runner_is_completed_by_the_next_invocation(corpus_dir, cache_dir, tmp_path):
    spec = _spec(tmp_path, corpus_dir, cache_dir, steps=400)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "run_ablation.py"), str(spec), "--no-progress", "--seeds", "0"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metas = tmp_path / "runs" / "e2e"
    deadline = time.time() + 180
    while time.time() < deadline and not list(metas.glob("*/*/checkpoints/last/meta.json")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stderr + done.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    children = _children(client)
    finished = [(r.data.tags["variant"], r.data.tags["seed"]) for r in children if r.data.tags["status"] == "finished"]
    assert sorted(finished) == [("qk_off", "0"), ("qk_on", "0")]  # each exactly once
    assert len(children) == 2  # the interrupted run was resumed in its own MLflow run, not restarted
