"""DDP on CPU (gloo, 2 processes): same losses as one process with twice the accumulation; same stop step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blueberry.config import dump_yaml, load_config
from tests.conftest import tiny_run_overrides


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train_loss" in rec:
            out[rec["step"]] = rec["train_loss"]
    return out


def _launch(tmp_path, name, nproc, **over):
    cfg = load_config(data={"preset": "tiny"}, overrides=tiny_run_overrides(*over.pop("_data"), **over))
    path = tmp_path / f"{name}.yaml"
    path.write_text(dump_yaml(cfg))
    run_dir = tmp_path / name
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "blueberry.train.launch"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--standalone", "-m", "blueberry.train.launch"]
    cmd += ["--config", str(path), "--run-dir", str(run_dir), "--no-progress"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_ddp_matches_single_process_with_double_accumulation(corpus_dir, cache_dir, tmp_path):
    data = (corpus_dir, cache_dir)
    common = {"budget.steps": 4, "optim.name": "adamw", "model.zero_init_outputs": False}
    ddp = _launch(tmp_path, "ddp", 2, _data=data, **common, **{"train.grad_accum": 1})
    single = _launch(tmp_path, "single", 1, _data=data, **common, **{"train.grad_accum": 2})
    a, b = _losses(ddp), _losses(single)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-4), (step, a[step], b[step])


@pytest.mark.slow
def test_ddp_ranks_stop_on_the_same_step_under_a_time_budget(corpus_dir, cache_dir, tmp_path):
    run = _launch(tmp_path, "timed", 2, _data=(corpus_dir, cache_dir), **{"budget.steps": None, "budget.time": 1.5})
    r0 = json.loads((run / "result.json").read_text())
    r1 = json.loads((run / "result.rank1.json").read_text())
    assert r0["status"] == r1["status"] == "finished"
    assert r0["steps"] == r1["steps"] > 1
    assert r0["train_time_s"] == r1["train_time_s"] >= 1.5
