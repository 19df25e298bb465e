"""The benchmarks run end to end at tiny sizes, and the speed-ups they measure do not change the numbers."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_model_config, tiny_run_overrides

ROOT = Path(__file__).resolve().parents[1]
TINY_STEP = ["--preset", "tiny", "--batch", "2", "--rounds", "1", "--warmup", "1", "--peak-size", "256"]


def run_bench(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_train_step_record(rec: dict, models: set[str]) -> None:
    assert rec["bench"] == "train_step"
    assert set(rec["peak_gflops"]) == {"fp32", "bf16"}
    assert {(r["model"], r["precision"]) for r in rec["results"]} == {
        (m, p) for m in models for p in ("fp32", "bf16")
    }
    for r in rec["results"]:
        assert r["tokens_per_s"] > 0 and r["gflops"] > 0 and 0 < r["mfu"]
        assert {"step_ms", "tokens_per_s_min", "tokens_per_s_max", "ratio_vs_hf"} <= set(r)
    assert "load_avg_before" in rec and "load_avg_after" in rec


def test_train_step_ours_only_runs_without_transformers():
    rec = last_json(run_bench("train_step", "--ours-only", *TINY_STEP))
    check_train_step_record(rec, {"ours-llama", "ours-seed"})
    assert all(r["ratio_vs_hf"] is None for r in rec["results"])
    assert rec["transformers"] is None


def test_train_step_against_hf_llama():
    pytest.importorskip("transformers")
    rec = last_json(run_bench("train_step", *TINY_STEP))
    check_train_step_record(rec, {"hf-llama", "ours-llama", "ours-seed"})
    for r in rec["results"]:
        assert (r["ratio_vs_hf"] is None) == (r["model"] == "hf-llama")


def test_train_step_without_transformers_says_so_and_exits_2(tmp_path):
    blocker = tmp_path / "transformers"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('blocked for the test')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    proc = run_bench("train_step", *TINY_STEP, env=env)
    assert proc.returncode == 2
    assert "transformers is not installed" in proc.stderr and "--ours-only" in proc.stderr


@pytest.mark.slow
def test_overhead_reports_share_and_budget_adherence(corpus_dir, cache_dir):
    sets = [
        a for o in tiny_run_overrides(corpus_dir, cache_dir, **{"budget.steps": None}) for a in ("--set", o)
    ]
    rec = last_json(run_bench("overhead", "--seconds", "3", *sets))
    assert rec["bench"] == "overhead" and rec["status"] == "finished"
    assert rec["budget_s"] == 3.0 and rec["steps"] > 0
    assert 0 < rec["train_share"] <= 1 and rec["wall_time_s"] >= rec["train_time_s"] >= 3.0
    assert rec["overshoot_s"] >= 0 and rec["median_step_s"] > 0
    assert {"evaluate", "save_checkpoint", "other"} <= set(rec["outside_steps_s"])
    assert {"meets_share_target", "meets_budget_target", "load_avg_before", "load_avg_after"} <= set(rec)


def test_gpu_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---- the optimisations keep the model's numbers ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_equals_cross_entropy(dtype, seeded):
    from blueberry.model.transformer import cross_entropy

    logits = torch.randn(3, 50, 97).to(dtype).requires_grad_()
    targets = torch.randint(0, 97, (3, 50))
    targets[0, :7] = -100  # ignored positions
    ref = F.cross_entropy(logits.float().view(-1, 97), targets.view(-1))
    (g_ref,) = torch.autograd.grad(ref, logits)
    loss = cross_entropy(logits, targets, chunk=97 * 16)  # 16 rows a slab: 10 slabs, the last one short
    (g,) = torch.autograd.grad(loss, logits)
    assert loss.dtype == torch.float32 and g.dtype == dtype
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(g.float(), g_ref.float(), atol=1e-6 if dtype == torch.float32 else 1e-3)


def test_rotary_matches_the_pairwise_rotation(seeded):
    """apply_rotary rotates each pair (x[i], x[i + D/2]) by angle pos * inv_freq[i]."""
    from blueberry.model.layers import RotaryPosition, apply_rotary

    cfg = tiny_model_config(rope_fraction=0.5)
    rope = RotaryPosition(cfg)
    pos = torch.arange(cfg.seq_len)
    x = torch.randn(2, cfg.n_heads, cfg.seq_len, cfg.head_dim)
    angle = pos[:, None].float() * rope.inv_freq[None, :]
    x1, x2 = x.chunk(2, dim=-1)
    ref = torch.cat([x1 * angle.cos() - x2 * angle.sin(), x1 * angle.sin() + x2 * angle.cos()], dim=-1)
    assert torch.allclose(apply_rotary(x, *rope.rotary(pos)), ref, atol=1e-6)
    xb = x.bfloat16()
    out = apply_rotary(xb, *rope.rotary(pos))
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), ref, atol=0.05)
    assert math.isclose(float(out.float().norm()), float(ref.norm()), rel_tol=1e-2)  # a rotation keeps norms
