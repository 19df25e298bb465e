"""Reports: Welch statistics, the markdown tables, plots, all read back from the tracking store."""

import math
import os
import time

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from blueberry.report import (
    ReportScope,
    collect_runs,
    eval_curve,
    markdown_table,
    verdict,
    welch,
    write_report,
)
from blueberry.track import get_or_create_experiment
from tests.test_track import make_store


@pytest.fixture
def store(tmp_path, monkeypatch):
    return make_store(tmp_path, monkeypatch)


def test_welch_matches_a_hand_computed_example():
    # baseline mean 1.1, var 0.01; variant mean 0.95, var 0.0025; n = 3 each
    # se = sqrt(0.01/3 + 0.0025/3) = 0.0645497; t = -0.15/se = -2.32379
    # df = (0.0125/3)^2 / ((0.01/3)^2/2 + (0.0025/3)^2/2) = 50/17; t_0.975(50/17) = 3.218759
    cmp = welch([1.0, 1.2, 1.1], [0.9, 0.95, 1.0])
    assert cmp.diff == pytest.approx(-0.15)
    assert cmp.df == pytest.approx(50 / 17)
    assert cmp.ci_low == pytest.approx(-0.15 - 3.218759 * 0.0645497, abs=1e-5)
    assert cmp.ci_high == pytest.approx(-0.15 + 3.218759 * 0.0645497, abs=1e-5)
    assert cmp.p == pytest.approx(0.104479, abs=1e-5)
    assert verdict(cmp) == "no significant difference"


def test_verdicts():
    assert verdict(welch([3.0, 3.01, 3.02], [2.5, 2.51, 2.52])) == "better"
    assert verdict(welch([3.0, 3.01, 3.02], [3.5, 3.51, 3.52])) == "worse"
    assert verdict(welch([3.0], [2.0, 2.1])) == "n/a (need >= 2 seeds)"
    assert welch([3.0, 3.1], [2.0]) is None
    exact = welch([1.0, 1.0], [2.0, 2.0])
    assert exact.p == 0.0 and verdict(exact) == "worse"


def test_markdown_table_aligns_and_escapes():
    text = markdown_table(["name", "value"], [["a|b", 1.5], ["c", 10]], "lr")
    assert text.splitlines() == [
        "| name | value |",
        "| ---- | ----: |",
        "| a\\|b |   1.5 |",
        "| c    |    10 |",
    ]


def _run(client, exp_id, variant, h, seed, status, val_loss, params, parent=None, history=True):
    tags = {"ablation": "demo", "variant": variant, "seed": str(seed), "config_hash": h, "status": status,
            "device": "Fake CPU", "git_commit": "abcdef1234567890", "git_dirty": "false",
            "torch_version": "2.13.0", "cuda_version": "None"}  # fmt: skip
    if parent:
        tags["mlflow.parentRunId"] = parent
    run_id = client.create_run(exp_id, tags=tags).info.run_id
    ts = int(time.time() * 1000)
    metrics = []
    if history:
        for i, step in enumerate((10, 20, 30)):
            v = val_loss + 0.5 * (2 - i)
            metrics += [Metric("val_loss", v, ts + i, step), Metric("train_time_s", 10.0 * (i + 1), ts + i, step),
                        Metric("tokens_seen", 1000.0 * step, ts + i, step)]  # fmt: skip
    finals = {"val_bpb": val_loss / 3, "val_ppl": math.exp(val_loss), "val_acc": 0.4, "steps": 30.0,
              "tokens_seen": 30000.0, "train_time_s": 30.0, "params": 2.5e6, "mfu": 0.25}  # fmt: skip
    metrics += [Metric(k, v, ts + 10, 30) for k, v in finals.items()]
    client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(run_id, {"failed": "FAILED", "running": "RUNNING"}.get(status, "FINISHED"))
    return run_id


BASE_PARAMS = {"model.qk_norm": "True", "data.source": "tinystories", "tokenizer.vocab_size": "4096",
               "budget.time": "144.0", "budget.tokens": "None", "train.seed": "0"}  # fmt: skip


def _cells(text, section):
    body = text.split(f"## {section}\n", 1)[1].lstrip("\n")
    lines = []
    for line in body.splitlines():
        if not line.startswith("|"):
            if lines:
                break
            continue
        lines.append(line)
    return {
        cells[0].strip("*"): cells
        for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:])
    }


def test_report_numbers_come_from_the_store(store, tmp_path):
    client = MlflowClient(tracking_uri=store)
    exp = get_or_create_experiment(client, "demo", store)
    parent = client.create_run(exp, tags={"ablation": "demo", "kind": "ablation",
                                          "command": "python run_ablation.py ablations/demo.yaml"}).info.run_id  # fmt: skip
    base_loss = [3.00, 3.04, 3.02]
    var_loss = [2.90, 2.93]
    for seed, v in enumerate(base_loss):
        _run(client, exp, "a", "hash_a", seed, "finished", v, BASE_PARAMS, parent)
    off = {**BASE_PARAMS, "model.qk_norm": "False"}
    for seed, v in enumerate(var_loss):
        _run(client, exp, "b", "hash_b", seed, "finished", v, off, parent)
    _run(client, exp, "b", "hash_b", 2, "diverged", 9.0, off, parent, history=False)
    _run(client, exp, "b", "hash_b", 3, "failed", 7.0, off, parent, history=False)
    _run(client, exp, "c", "hash_c", 0, "finished", 3.5, {**BASE_PARAMS, "model.n_layers": "3"}, parent)
    _run(client, exp, "x", "hash_other", 0, "finished", 1.0, BASE_PARAMS, parent)  # not in this spec

    scope = ReportScope("demo", "a", {"a": "hash_a", "b": "hash_b", "c": "hash_c"})
    path = write_report(client, exp, scope, tmp_path / "reports")
    text = path.read_text()
    assert path == tmp_path / "reports" / "demo.md"

    results = _cells(text, "Results")
    assert set(results) == {"a", "b", "c"}
    assert results["a"][1] == "3 / 0" and results["b"][1] == "2 / 1" and results["c"][1] == "1 / 0"
    assert results["a"][2] == f"{np.mean(base_loss):.4f} ± {np.std(base_loss, ddof=1):.4f}"
    assert results["b"][3] == f"{np.mean(var_loss) / 3:.4f} ± {np.std(np.array(var_loss) / 3, ddof=1):.4f}"
    assert results["c"][2] == "3.5000"  # one seed: no std
    assert results["a"][9] == "25.0%" and results["a"][10] == "2,500,000" and results["a"][8] == "1k"

    vs = _cells(text, "Against the baseline `a`")
    cmp = welch(np.array(base_loss) / 3, np.array(var_loss) / 3)
    assert vs["b"][1] == f"{cmp.diff:+.4f} [{cmp.ci_low:+.4f}, {cmp.ci_high:+.4f}]"
    assert vs["b"][2] == f"{cmp.p:.4f}" and vs["b"][5] == verdict(cmp)
    assert vs["c"][5] == "n/a (need >= 2 seeds)"
    assert f"{np.std(np.array(base_loss) / 3, ddof=1):.4f} in val_bpb" in text  # the noise floor

    diff = _cells(text, "Config differences from the baseline")
    assert diff["b"][1:] == ["`model.qk_norm`", "True", "False"] and diff["c"][1] == "`model.n_layers`"
    runs = text.split("## Runs", 1)[1]
    assert "failed" in runs and "diverged" in runs and "hash_other" not in text

    for needle in ("abcdef123456", "Fake CPU", "2.13.0 / None", "time 2m24s", "tinystories", "vocab 4096",
                   "`python run_ablation.py ablations/demo.yaml`", "**seeds**: 0, 1, 2"):  # fmt: skip
        assert needle in text, needle
    for png in ("val_loss_vs_time.png", "val_loss_vs_tokens.png", "final_val_bpb.png"):
        assert (tmp_path / "reports" / "demo" / png).stat().st_size > 1000
        assert f"](demo/{png})" in text
    assert not [
        f for f in os.listdir(tmp_path / "reports") + os.listdir(tmp_path / "reports" / "demo") if ".tmp" in f
    ]


def test_collect_runs_keeps_one_complete_run_per_seed(store):
    client = MlflowClient(tracking_uri=store)
    exp = get_or_create_experiment(client, "demo", store)
    _run(client, exp, "a", "h", 0, "finished", 3.0, BASE_PARAMS)
    newer = _run(client, exp, "a", "h", 0, "finished", 2.0, BASE_PARAMS)
    recs = collect_runs(client, exp, ReportScope("demo", "a", {"a": "h"}))
    assert [r.run_id for r in recs] == [newer]


def test_eval_curve_joins_by_step_and_prefers_the_newest_duplicate(store):
    client = MlflowClient(tracking_uri=store)
    exp = get_or_create_experiment(client, "demo", store)
    run_id = client.create_run(exp).info.run_id
    client.log_batch(
        run_id,
        metrics=[
            Metric("val_loss", 5.0, 1, 10), Metric("train_time_s", 1.0, 1, 10),
            Metric("train_time_s", 1.5, 2, 15),  # a training log between evals
            Metric("val_loss", 4.0, 3, 20), Metric("train_time_s", 2.0, 3, 20),
            Metric("val_loss", 3.9, 9, 20), Metric("train_time_s", 2.1, 9, 20),  # re-logged after a resume
        ],
    )  # fmt: skip
    assert eval_curve(client, run_id, "train_time_s") == [(1.0, 5.0), (2.1, 3.9)]


def test_unsteady_throughput_within_a_variant_is_flagged(store, tmp_path):
    """Seeds of one variant do the same work: a 3x throughput spread means the machine was busy."""
    from blueberry.report import throughput_warning

    client = MlflowClient(tracking_uri=store)
    exp = get_or_create_experiment(client, "demo", store)
    ids = [_run(client, exp, "a", "hash_a", seed, "finished", 3.0, BASE_PARAMS) for seed in (0, 1)]
    scope = ReportScope("demo", "a", {"a": "hash_a"})
    for run_id, tokens in zip(ids, (1000.0, 3000.0)):
        client.log_metric(run_id, "tokens_seen", tokens, step=99)
        client.log_metric(run_id, "train_time_s", 1.0, step=99)
    text = write_report(client, exp, scope, tmp_path / "reports").read_text()
    assert "unsteady machine" in text and "3.0x apart" in text
    assert throughput_warning({}) == []
