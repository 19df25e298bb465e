"""Sweeps: spec checks, trials in an Optuna study tracked as MLflow child runs, continuing a study, pruning
through the tracker (against the real trainer), diverged/failed/interrupted trials, the confirm stage and
the report.

Most tests use a fake trainer with the trainer's interface; one trains the tiny model for real.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from blueberry import ablation, sweep
from blueberry.ablation import load_spec, main
from blueberry.errors import run_cli
from blueberry.track import flatten_params
from blueberry.workers import live
from tests.conftest import tiny_run_overrides
from tests.test_track import make_store

REPO = Path(__file__).resolve().parent.parent

SPEC = """\
name: lr
kind: sweep
preset: tiny
budget: {time: 10s}
schedule: {name: cosine}
objective: {metric: val_bpb, direction: minimize}
n_trials: 4
sampler: {name: random, seed: 0}
pruner: none
search_space:
  optim.lr: {type: float, low: 0.002, high: 0.1, log: true}
  schedule.name: {type: categorical, choices: [cosine, wsd]}
confirm: {top_k: 2, seeds: 2}
"""


@dataclass
class FakeResult:
    status: str
    metrics: dict
    run_dir: Path
    checkpoint: Path | None
    steps: int
    tokens_seen: int
    train_time_s: float
    wall_time_s: float


class FakeTrainer:
    """The trainer's interface; val_bpb is smallest at lr 0.02 and falls over four eval points."""

    def __init__(self, diverge=(), fail=(), interrupt_first=False):
        self.diverge, self.fail, self.interrupt = set(diverge), set(fail), interrupt_first
        self.calls = []  # (lr, schedule, seed, run_dir)

    def __call__(self, cfg, tracker=None, run_dir=None, progress=True):
        self.calls.append((cfg.optim.lr, cfg.schedule.name, cfg.train.seed, Path(run_dir)))
        if self.interrupt:
            self.interrupt = False
            raise KeyboardInterrupt
        if cfg.schedule.name in self.fail:
            raise RuntimeError("boom")
        tracker.log_params({**flatten_params(cfg.to_dict()), "params": 1234})
        final = 1.0 + math.log(cfg.optim.lr / 0.02) ** 2 + 0.01 * cfg.train.seed
        for k in range(1, 5):
            v = final + 0.1 * (4 - k)  # the last eval point is the final value, as in the trainer
            tracker.log_metrics({"train_loss": v, "tokens_seen": 1000 * k, "train_time_s": float(k)}, 2 * k)
            tracker.log_metrics(
                {"val_loss": v, "val_bpb": v, "val_ppl": math.exp(v), "val_acc": 0.3, "progress": k / 4,
                 "tokens_seen": 1000 * k, "train_time_s": float(k)}, 2 * k,
            )  # fmt: skip
        status = "diverged" if cfg.schedule.name in self.diverge else "finished"
        val = float("nan") if status == "diverged" else final
        metrics = {"val_loss": val, "val_bpb": val, "val_ppl": 1.0, "val_acc": 0.3, "params": 1234}
        return FakeResult(status, metrics, Path(run_dir), None, 8, 8000, 4.0, 5.0)


@pytest.fixture
def store(tmp_path, monkeypatch):
    return make_store(tmp_path, monkeypatch)


@pytest.fixture
def fake(monkeypatch):
    trainer = FakeTrainer()
    monkeypatch.setattr(ablation, "train_fn", trainer)
    return trainer


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text(SPEC)
    return path


def cli(*argv) -> int:
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main([str(a) for a in argv]))
    return e.value.code


def study(name="lr", tmp=None) -> optuna.Study:
    url = f"sqlite:///{Path(tmp or '.').resolve() / 'optuna.db'}"
    return optuna.load_study(study_name=name, storage=url)


def trial_runs(client: MlflowClient, experiment="lr"):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string="tags.kind = 'trial'")


# ---------------------------------------------------------------------------------------------------------
# Specs


def test_shipped_sweeps_are_valid_at_both_scales():
    specs = sorted((REPO / "sweeps").glob("*.yaml"))
    assert {p.stem for p in specs} >= {"muon_lr", "adamw_lr", "architecture"}
    for path in specs:
        assert path.read_text().startswith("#"), f"{path.name}: starts with a comment saying what it asks"
        for quick in (False, True):
            spec = load_spec(path, quick=quick)
            assert spec.kind == "sweep" and spec.space and spec.confirm is not None
            assert spec.confirm.seeds == ((0, 1) if quick else (0, 1, 2))
            assert spec.base.budget.time == (30 if quick else 144)
    arch = load_spec(REPO / "sweeps" / "architecture.yaml")
    assert arch.sampler == "grid" and {p.type for p in arch.space} == {"categorical"}
    # the architecture grid is param-matched: the points differ only in norm gains (< 0.1% of the params)
    counts = {
        ablation.param_count(arch.config_for({"model.norm_placement": n, "model.mlp": m, "model.qk_norm": q}))
        for n in ("sandwich", "pre", "post") for m in ("swiglu", "geglu") for q in (True, False)
    }  # fmt: skip
    assert max(counts) / min(counts) < 1.001


def _without(text: str, line: str) -> str:
    assert line in text
    return text.replace(line, "")


BAD = {
    "unknown path": (SPEC.replace("optim.lr:", "optim.lrr:"), "search_space: optim.lrr: unknown parameter"),
    "a section": (SPEC.replace("optim.lr: {type: float", "optim: {type: float"), "optim: is a section"),
    "low >= high": (
        SPEC.replace("low: 0.002, high: 0.1", "low: 0.1, high: 0.002"),
        "low (0.1) must be below high",
    ),
    "empty choices": (SPEC.replace("[cosine, wsd]", "[]"), "choices: expected a non-empty list"),
    "unknown choice": (SPEC.replace("[cosine, wsd]", "[cosine, nope]"), "schedule.name = 'nope'"),
    "unknown type": (SPEC.replace("type: float", "type: real"), "type: unknown type 'real'"),
    "unknown sampler": (
        SPEC.replace("{name: random, seed: 0}", "annealing"),
        "sampler: unknown sampler 'annealing'",
    ),
    "unknown pruner": (
        SPEC.replace("pruner: none", "pruner: sometimes"),
        "pruner: unknown pruner 'sometimes'",
    ),
    "bad metric": (SPEC.replace("metric: val_bpb", "metric: train_loss"), "objective.metric: unknown metric"),
    "bad direction": (SPEC.replace("direction: minimize", "direction: lower"), "objective.direction"),
    "grid with a float": (SPEC.replace("{name: random, seed: 0}", "grid"), "grid needs categorical or int"),
    "n_trials 0": (SPEC.replace("n_trials: 4", "n_trials: 0"), "n_trials: expected a positive integer"),
    "no n_trials": (_without(SPEC, "n_trials: 4\n"), "n_trials: expected a positive integer"),
    "base outside the range": (
        SPEC.replace("low: 0.002", "low: 0.05"),
        "base config's value 0.01 is outside",
    ),
    "base not a choice": (SPEC.replace("[cosine, wsd]", "[linear, wsd]"), "is not among the choices"),
    "unknown key": (SPEC + "trials: 3\n", "trials: unknown key for a sweep"),
    "log with low 0": (
        SPEC.replace(
            "schedule.name: {type: categorical, choices: [cosine, wsd]}",
            "optim.weight_decay: {type: float, low: 0.0, high: 0.2, log: true}",
        ),
        "log: needs low > 0",
    ),  # fmt: skip
    "confirm with one seed": (SPEC.replace("seeds: 2}", "seeds: 1}"), "confirm.seeds: at least 2"),
    "variants in a sweep": (SPEC + "variants: {a: {}}\n", "variants: unknown key for a sweep"),
    "no budget": (SPEC.replace("preset: tiny\nbudget: {time: 10s}\n", ""), "budget: missing"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sweep_spec_is_one_line_exit_2_and_creates_nothing(case, tmp_path, monkeypatch, capsys, fake):
    monkeypatch.chdir(tmp_path)
    text, expected = BAD[case]
    (tmp_path / "bad.yaml").write_text(text)
    assert cli("bad.yaml") == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and err.startswith("error: bad.yaml: "), err
    assert sorted(os.listdir(tmp_path)) == ["bad.yaml"] and not fake.calls


def test_bad_sweep_cli_input_exits_2(spec_file, tmp_path, monkeypatch, capsys, fake):
    monkeypatch.chdir(tmp_path)
    for argv, expected in (
        (("--variants", "a"), "--variants: a sweep has no variants"),
        (("--nproc-per-node", "2"), "--nproc-per-node: sweep trials train in this process"),
        (("--storage", "nonsense"), "--storage: expected a database URL"),
        (("--report-only",), "--report-only: no Optuna storage"),
    ):
        assert cli(spec_file, *argv) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == ["lr.yaml"] and not fake.calls


def test_dry_run_prints_the_search_space_and_creates_nothing(spec_file, tmp_path, monkeypatch, capsys, fake):
    monkeypatch.chdir(tmp_path)
    assert cli(spec_file, "--dry-run", "--quick") == 0
    out = capsys.readouterr().out
    assert "optim.lr" in out and "[0.002, 0.1], log" in out and "cosine, wsd" in out and "4 trials" in out
    assert "time 30s" in out
    assert sorted(os.listdir(tmp_path)) == ["lr.yaml"] and not fake.calls


# ---------------------------------------------------------------------------------------------------------
# Running (fake trainer)


def test_sweep_tracks_every_trial_then_a_second_invocation_adds_exactly_the_missing_trials(
    spec_file, store, fake, tmp_path
):
    assert cli(spec_file, "--no-progress") == 0
    s = study()
    assert len(s.trials) == 4 and all(t.state == TrialState.COMPLETE for t in s.trials)
    spec = load_spec(spec_file)
    assert s.trials[0].params == spec.base_params == {"optim.lr": 0.01, "schedule.name": "cosine"}

    client = MlflowClient(tracking_uri=store)
    runs = trial_runs(client)
    assert sorted(int(r.data.tags["trial"]) for r in runs) == [0, 1, 2, 3]
    parents = client.search_runs([runs[0].info.experiment_id], filter_string="tags.kind = 'sweep'")
    assert len(parents) == 1
    for r in runs:
        t = s.trials[int(r.data.tags["trial"])]
        assert r.data.tags["status"] == "finished" and r.info.status == "FINISHED"
        assert r.data.tags["sweep"] == "lr" and r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert float(r.data.tags["trial.optim.lr"]) == t.params["optim.lr"]
        assert float(r.data.params["optim.lr"]) == t.params["optim.lr"]  # the trainer's flattened config
        assert r.data.metrics["val_bpb"] == pytest.approx(t.value)
        assert t.user_attrs["mlflow_run_id"] == r.info.run_id
        assert len(client.get_metric_history(r.info.run_id, "val_bpb")) == 4

    best = min(s.trials, key=lambda t: t.value)
    report = (tmp_path / "reports" / "lr.md").read_text()
    assert f"Trial **{best.number}**: val_bpb = **{best.value:.4f}**" in report
    assert f"| `optim.lr`      | {best.params['optim.lr']:.4g}" in report
    assert "4 of 4: 4 complete (0 diverged), 0 pruned, 0 failed" in report
    for png in ("history.png", "slice.png", "parallel_coordinate.png"):
        assert (tmp_path / "reports" / "lr" / png).stat().st_size > 1000
    assert (
        "## Parameter importances" in report and "| `optim.lr`" in report.split("## Parameter importances")[1]
    )

    # the confirm stage: base + the 2 best distinct configs, 2 seeds each, with Welch statistics
    confirm = report.split("## Confirm stage")[1].split("##")[0]
    assert "| **base**" in confirm and "p (Welch)" in confirm and "2 / 0" in confirm
    assert (tmp_path / "reports" / "lr-confirm.md").is_file()
    confirm_runs = client.search_runs(
        [runs[0].info.experiment_id], filter_string="tags.ablation = 'lr-confirm'"
    )
    assert sum(r.info.status == "FINISHED" and "config_hash" in r.data.tags for r in confirm_runs) == 3 * 2
    calls = len(fake.calls)

    # n_trials 6 on the same study: exactly 2 new trials; the finished confirm runs are not trained again
    spec_file.write_text(SPEC.replace("n_trials: 4", "n_trials: 6"))
    assert cli(spec_file, "--no-progress") == 0
    s = study()
    assert len(s.trials) == 6 and len(trial_runs(client)) == 6
    new_confirm = len(fake.calls) - calls - 2
    assert 0 <= new_confirm <= 4  # only configs that entered the top 2 are confirmed
    # and nothing to do a third time
    calls = len(fake.calls)
    assert cli(spec_file, "--no-progress") == 0
    assert len(study().trials) == 6 and len(fake.calls) == calls


def test_grid_sweep_visits_each_point_once_base_first_and_a_diverged_trial_is_a_bad_value(
    tmp_path, store, monkeypatch
):
    trainer = FakeTrainer(diverge={"wsd"}, fail={"linear"})
    monkeypatch.setattr(ablation, "train_fn", trainer)
    path = tmp_path / "grid.yaml"
    path.write_text(
        "name: grid\nkind: sweep\npreset: tiny\nbudget: {time: 10s}\nn_trials: 10\nsampler: grid\npruner: median\n"
        "search_space:\n  schedule.name: {type: categorical, choices: [wsd, cosine, linear]}\n"
        "  optim.lr: {type: categorical, choices: [0.01, 0.02]}\n"
    )
    assert cli(path, "--no-progress", "--set", "schedule.name=cosine") == 1  # a trial failed
    s = study("grid")
    assert len(s.trials) == 6  # the grid has 6 points; n_trials 10 stops there
    assert s.trials[0].params == {"schedule.name": "cosine", "optim.lr": 0.01}  # the base config
    assert len({tuple(sorted(t.params.items())) for t in s.trials}) == 6
    by_schedule = {}
    for t in s.trials:
        by_schedule.setdefault(t.params["schedule.name"], []).append(t)
    good = [t.value for t in by_schedule["cosine"]]
    for t in by_schedule["wsd"]:  # diverged: complete, with the worst finite value seen
        assert t.state == TrialState.COMPLETE and t.user_attrs["status"] == "diverged"
        assert math.isfinite(t.value) and t.value >= max(good)
    for t in by_schedule["linear"]:
        assert t.state == TrialState.FAIL and "RuntimeError: boom" in t.user_attrs["error"]
    client = MlflowClient(tracking_uri=store)
    statuses = sorted(r.data.tags["status"] for r in trial_runs(client, "grid"))
    assert statuses == ["diverged", "diverged", "failed", "failed", "finished", "finished"]
    report = (tmp_path / "reports" / "grid.md").read_text()
    assert "6 of 10: 4 complete (2 diverged), 0 pruned, 2 failed" in report
    assert "(this sweep has no confirm stage)" in report


def test_ctrl_c_requeues_the_trial_and_the_rerun_finishes_the_study(spec_file, store, monkeypatch, capsys):
    trainer = FakeTrainer(interrupt_first=True)
    monkeypatch.setattr(ablation, "train_fn", trainer)
    spec_file.write_text(SPEC.replace("confirm: {top_k: 2, seeds: 2}\n", ""))
    assert cli(spec_file, "--no-progress") == 130
    s = study()
    assert [t.state for t in s.trials] == [TrialState.FAIL, TrialState.WAITING]
    assert s.trials[1].params == s.trials[0].params == load_spec(spec_file).base_params
    run = trial_runs(MlflowClient(tracking_uri=store))[0]
    assert run.data.tags["status"] == "killed" and run.info.status == "KILLED"

    assert cli(spec_file, "--no-progress") == 0
    s = study()
    counted = live(s.trials)
    assert len(counted) == 4 and all(t.state == TrialState.COMPLETE for t in counted)
    assert counted[0].params == load_spec(spec_file).base_params  # the re-queued base trial ran
    assert len(s.trials) == 5  # the interrupted one stays as FAIL, replaced by its retry


def test_report_only_rewrites_the_report_from_study_and_store(spec_file, store, fake, tmp_path):
    spec_file.write_text(
        SPEC.replace("n_trials: 4", "n_trials: 2").replace("confirm: {top_k: 2, seeds: 2}\n", "")
    )
    assert cli(spec_file, "--no-progress") == 0
    report = tmp_path / "reports" / "lr.md"
    report.unlink()
    calls = len(fake.calls)
    assert cli(spec_file, "--report-only") == 0
    assert "## Best trial" in report.read_text() and len(fake.calls) == calls


def test_trial_tracker_reports_eval_points_by_budget_share_and_prunes():
    class Inner:
        run_id = "r"

        def __init__(self):
            self.logged = []

        def log_metrics(self, metrics, step):
            self.logged.append((step, dict(metrics)))

    s = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=2.0))
    trial = s.ask()
    inner = Inner()
    t = sweep.TrialTracker(inner, trial, "val_bpb", eval_every=0.25)
    t.log_metrics({"train_loss": 9.0}, step=3)  # not an eval point
    t.log_metrics({"val_bpb": 1.5, "progress": 0.2501}, step=5)
    t.log_metrics({"val_bpb": float("nan"), "progress": 0.5}, step=10)  # never reported
    with pytest.raises(sweep.PruneTrial, match="pruned at eval 3"):
        t.log_metrics({"val_bpb": 2.5, "progress": 0.75}, step=15)
    assert len(inner.logged) == 4  # everything reached MLflow first
    assert s.trials[0].intermediate_values == {1: 1.5, 3: 2.5}


# ---------------------------------------------------------------------------------------------------------
# The real trainer


class PruneLaterTrials(optuna.pruners.BasePruner):
    """Keeps trial 0, prunes every later trial at its first eval point: deterministic pruning."""

    def prune(self, study, trial) -> bool:
        return trial.number > 0


@pytest.mark.slow
def test_real_trainer_trials_complete_or_are_pruned_mid_run(
    tmp_path, store, corpus_dir, cache_dir, monkeypatch
):
    monkeypatch.setattr(sweep, "make_pruner", lambda spec: PruneLaterTrials())
    path = tmp_path / "real.yaml"
    path.write_text(SPEC.replace("name: lr", "name: real").replace("n_trials: 4", "n_trials: 2")
                    .replace("confirm: {top_k: 2, seeds: 2}\n", ""))  # fmt: skip
    over = tiny_run_overrides(corpus_dir, cache_dir, **{"budget.steps": 8, "eval.every": 0.25})
    args = [a for o in over for a in ("--set", o)]
    assert cli(path, "--no-progress", *args) == 0

    s = study("real")
    assert [t.state for t in s.trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert sorted(s.trials[0].intermediate_values) == [1, 2, 3, 4]  # every eval point reached Optuna
    assert list(s.trials[1].intermediate_values) == [1]
    client = MlflowClient(tracking_uri=store)
    runs = {int(r.data.tags["trial"]): r for r in trial_runs(client, "real")}
    done, pruned = runs[0], runs[1]
    assert done.data.tags["status"] == "finished" and done.data.metrics["steps"] == 8
    assert pruned.data.tags["status"] == "pruned" and pruned.info.status == "FINISHED"
    # the trainer really stopped at the first eval point (step 2 of 8): nothing logged after it
    steps = [m.step for m in client.get_metric_history(pruned.info.run_id, "train_loss")]
    assert max(steps) == 2 and len(client.get_metric_history(pruned.info.run_id, "val_bpb")) == 1
    assert pruned.data.params["model.d_model"] == "32"  # the trainer's own params are on the trial's run
    report = (tmp_path / "reports" / "real.md").read_text()
    assert "Trial **0**" in report and "2 of 2: 1 complete (0 diverged), 1 pruned, 0 failed" in report
    assert "n/a (needs at least 2 complete trials)" in report
