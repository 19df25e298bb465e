"""Many workers, one database: every run of an ablation and every trial of a sweep executed exactly once,
none lost, and a killed worker's run re-queued and finished by another.

The distributed tests start real `run_ablation.py --worker` processes against the SQLite default and
against a real PostgreSQL server (BLUEBERRY_TEST_POSTGRES_URL, which .ci/run provides; skipped only
where it is unset). Their trainer is tests/plugins/fake_train.py, loaded through the spec's `plugins:`,
which logs every start and end per process so the test can count who trained what.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from blueberry.ablation import Outcome, load_spec
from blueberry.workers import KEY, VOID, RunQueue, live, run_key
from tests.test_track import _template_db

REPO = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("BLUEBERRY_TEST_POSTGRES_URL")

FARM = """\
name: farm
preset: tiny
budget: {time: 10s}
plugins: [tests.plugins.fake_train]
seeds: [0, 1]
baseline: a
variants:
  a: {}
  b: {optim.lr: 0.02}
  c: {optim.lr: 0.04}
"""

SWEEP = """\
name: hive
kind: sweep
preset: tiny
budget: {time: 10s}
plugins: [tests.plugins.fake_train]
n_trials: 4
sampler: random
pruner: none
search_space:
  optim.lr: {type: float, low: 0.002, high: 0.1, log: true}
confirm: {top_k: 1, seeds: 2}
"""


# ---------------------------------------------------------------------------------------------------------
# Stores


@pytest.fixture
def pg_databases():
    """Two fresh databases on the test server, one for Optuna and one for MLflow (both keep an
    alembic_version table, so they must not share one); dropped afterwards."""
    if not PG_URL:
        pytest.skip("BLUEBERRY_TEST_POSTGRES_URL is not set (.ci/run starts a PostgreSQL server and sets it)")
    import sqlalchemy
    from sqlalchemy.engine import make_url

    admin = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    names = {k: f"bb_{uuid.uuid4().hex[:12]}_{k}" for k in ("optuna", "mlflow")}
    with admin.connect() as c:
        for name in names.values():
            c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = make_url(PG_URL)
    yield {k: url.set(database=name).render_as_string(hide_password=False) for k, name in names.items()}
    with admin.connect() as c:
        for name in names.values():
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def stores(request, tmp_path):
    """(Optuna storage URL, MLflow tracking URI); None for the defaults, ./optuna.db and ./mlflow.db."""
    if request.param == "postgres":
        dbs = request.getfixturevalue("pg_databases")
        return dbs["optuna"], dbs["mlflow"]
    shutil.copyfile(_template_db(), tmp_path / "mlflow.db")  # the default ./mlflow.db, initialised
    return None, None


# ---------------------------------------------------------------------------------------------------------
# Worker processes


class Farm:
    """Worker processes in one folder (a machine's view of the shared run folder), with their logs."""

    def __init__(
        self, root: Path, spec_text: str, storage: str | None, mlflow_uri: str | None, step_s: float
    ):
        self.root, self.storage, self.mlflow_uri, self.step_s = root, storage, mlflow_uri, step_s
        self.spec = root / "spec.yaml"
        self.spec.write_text(spec_text)
        self.calls = root / "calls"
        self.calls.mkdir()
        self.procs: list[subprocess.Popen] = []

    def start(self) -> subprocess.Popen:
        env = {
            **{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
            "PYTHONPATH": str(REPO),
            "BLUEBERRY_FAKE_TRAIN_LOG": str(self.calls),
            "BLUEBERRY_FAKE_STEP_S": str(self.step_s),
        }
        if self.mlflow_uri:
            env["MLFLOW_TRACKING_URI"] = self.mlflow_uri
        cmd = [sys.executable, str(REPO / "run_ablation.py"), str(self.spec), "--worker", "--no-progress",
               "--heartbeat", "1"] + (["--storage", self.storage] if self.storage else [])  # fmt: skip
        log = open(self.root / f"worker{len(self.procs)}.log", "w")
        p = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(p)
        return p

    def wait(self, timeout: float = 120) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                for q in self.procs:
                    q.kill()
                pytest.fail(f"workers still running after {timeout}s:\n{self.output()}")
        return codes

    def output(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(self.root.glob("worker*.log")))

    def events(self) -> list[dict]:
        out = []
        for f in self.calls.glob("*.jsonl"):
            out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        return sorted(out, key=lambda e: e["time"])

    def kill_after_checkpoint(self, timeout: float = 60) -> tuple[subprocess.Popen, str]:
        """SIGKILL the first worker to be mid-run (past a checkpoint); returns it and its run's key."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events():
                if e["event"] == "start" and (Path(e["run_dir"]) / "checkpoints" / "last").is_dir():
                    (victim,) = [p for p in self.procs if p.pid == e["pid"]]
                    victim.send_signal(signal.SIGKILL)
                    victim.wait()
                    return victim, e["key"]
            time.sleep(0.1)
        pytest.fail(f"no worker got past a checkpoint within {timeout}s:\n{self.output()}")


def child_runs(mlflow_uri: str, experiment: str) -> list:
    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id]) if "config_hash" in r.data.tags]


def open_study(name: str, storage: str | None, root: Path) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage or f"sqlite:///{root / 'optuna.db'}")


# ---------------------------------------------------------------------------------------------------------
# Ablations


@pytest.mark.slow
def test_two_workers_run_each_ablation_run_exactly_once(stores, tmp_path):
    storage, mlflow_uri = stores
    farm = Farm(tmp_path, FARM, storage, mlflow_uri, step_s=0.1)
    farm.start()
    farm.start()
    assert farm.wait() == [0, 0], farm.output()

    spec = load_spec(farm.spec)
    keys = {f"{pr.config_hash}/{pr.seed}" for pr in spec.runs()}
    ev = farm.events()
    starts = Counter(e["key"] for e in ev if e["event"] == "start")
    assert starts == Counter({k: 1 for k in keys}), farm.output()  # none twice, none lost
    assert Counter(e["key"] for e in ev if e["event"] == "end") == starts

    runs = child_runs(mlflow_uri or f"sqlite:///{tmp_path / 'mlflow.db'}", "farm")
    assert sorted(f"{r.data.tags['config_hash']}/{r.data.tags['seed']}" for r in runs) == sorted(keys)
    assert all(r.info.status == "FINISHED" and r.data.tags["status"] == "finished" for r in runs)
    trials = live(open_study("farm-runs", storage, tmp_path).trials)
    assert sorted(t.user_attrs[KEY] for t in trials) == sorted(keys)
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert (tmp_path / "reports" / "farm.md").is_file()


@pytest.mark.slow
@pytest.mark.postgres
def test_a_killed_workers_run_is_requeued_and_finished_by_another(pg_databases, tmp_path):
    storage, mlflow_uri = pg_databases["optuna"], pg_databases["mlflow"]
    farm = Farm(tmp_path, FARM.replace("seeds: [0, 1]", "seeds: [0]"), storage, mlflow_uri, step_s=0.3)
    farm.start()
    farm.start()
    victim, key = farm.kill_after_checkpoint()
    (survivor,) = [p for p in farm.procs if p is not victim]
    assert survivor.wait(timeout=90) == 0, farm.output()

    ev = farm.events()
    tries = [e for e in ev if e["event"] == "start" and e["key"] == key]
    assert [e["pid"] for e in tries] == [victim.pid, survivor.pid], farm.output()
    assert tries[1]["start_step"] >= 2  # resumed from the dead worker's checkpoint in the shared folder
    ends = Counter(e["key"] for e in ev if e["event"] == "end")
    assert ends == Counter({k: 1 for k in {e["key"] for e in ev}}) and len(ends) == 3

    runs = child_runs(mlflow_uri, "farm")
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)  # one MLflow run per identity
    (resumed,) = [r for r in runs if f"{r.data.tags['config_hash']}/{r.data.tags['seed']}" == key]
    assert "resumed_by" in resumed.data.tags
    trials = open_study("farm-runs", storage, tmp_path).trials
    assert sorted(t.state.name for t in live(trials)) == ["COMPLETE"] * 3
    (stale,) = [t for t in trials if t.state == TrialState.FAIL]
    assert stale.user_attrs[KEY] == key and VOID not in stale.user_attrs


# ---------------------------------------------------------------------------------------------------------
# Sweeps


@pytest.mark.slow
@pytest.mark.postgres
def test_two_workers_share_one_sweep_and_its_confirm_stage(pg_databases, tmp_path):
    storage, mlflow_uri = pg_databases["optuna"], pg_databases["mlflow"]
    farm = Farm(tmp_path, SWEEP, storage, mlflow_uri, step_s=0.1)
    farm.start()
    farm.start()
    assert farm.wait() == [0, 0], farm.output()

    trials = live(open_study("hive", storage, tmp_path).trials)
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert sum(t.user_attrs[KEY] == "base" for t in trials) == 1 and trials[0].user_attrs[KEY] == "base"
    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("hive")
    trial_runs = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'trial'")
    assert sorted(r.info.run_id for r in trial_runs) == sorted(t.user_attrs["mlflow_run_id"] for t in trials)

    # every trial and every confirm run (base + best trial, 2 seeds) trained once
    ev = farm.events()
    starts = Counter(e["run_dir"].split("/hive")[1].split("/")[0] for e in ev if e["event"] == "start")
    assert starts[""] == 4 and starts["-confirm"] == 4, farm.output()
    confirm_keys = Counter(e["key"] for e in ev if e["event"] == "start" and "/hive-confirm/" in e["run_dir"])
    assert len(confirm_keys) == 4 and set(confirm_keys.values()) == {1}
    confirm = [r for r in child_runs(mlflow_uri, "hive") if r.data.tags.get("ablation") == "hive-confirm"]
    assert len(confirm) == 4 and all(r.info.status == "FINISHED" for r in confirm)
    report = (tmp_path / "reports" / "hive.md").read_text()
    assert "4 of 4: 4 complete" in report and "| **base**" in report


# ---------------------------------------------------------------------------------------------------------
# Claiming, in process


@pytest.fixture
def queue_parts(tmp_path):
    (tmp_path / "spec.yaml").write_text(FARM.replace("plugins: [tests.plugins.fake_train]\n", ""))
    spec = load_spec(tmp_path / "spec.yaml")
    return f"sqlite:///{tmp_path / 'optuna.db'}", spec


def test_runs_enqueued_twice_are_claimed_once(queue_parts):
    url, spec = queue_parts
    first, second = RunQueue(url, "farm", spec.runs(), 1), RunQueue(url, "farm", spec.runs(), 1)
    assert first.enqueue_missing() == 6
    for pr in spec.runs()[:2]:  # as if a second worker had enqueued at the same moment
        second.study.add_trial(
            optuna.trial.create_trial(state=TrialState.WAITING, user_attrs={KEY: run_key(pr)})
        )
    assert second.enqueue_missing() == 0
    claimed = []
    for q in [first, second] * 6:
        t = q.claim()
        if t is not None:
            claimed.append(t.user_attrs[KEY])
            q.finish(t, Outcome("a", 0, "finished"))
    assert sorted(claimed) == sorted(run_key(pr) for pr in spec.runs())
    assert first.claim() is None and first.busy_elsewhere() == 0
    trials = first.study.trials
    assert len(trials) == 8 and sum(VOID in t.user_attrs for t in trials) == 2


def test_a_silent_claim_is_requeued_after_the_grace_period(queue_parts):
    url, spec = queue_parts
    q = RunQueue(url, "farm", spec.runs()[:1], heartbeat=1)  # grace period: 3 s
    q.enqueue_missing()
    dead = q.claim()  # and then no heartbeat, as if the process died
    assert q.claim() is None and q.busy_elsewhere() == 1
    start = time.monotonic()
    while (retry := q.claim()) is None and time.monotonic() - start < 10:
        time.sleep(0.25)
    assert 3 <= time.monotonic() - start  # SQLite keeps heartbeats to the second: 3 to 4 s
    assert retry is not None and retry.user_attrs[KEY] == dead.user_attrs[KEY] and retry.number > dead.number
    assert q.study.trials[dead.number].state == TrialState.FAIL
    assert [t.number for t in live(q.study.trials)] == [retry.number]


def test_an_ablation_uses_a_storage_only_as_a_worker_queue(tmp_path, monkeypatch, capsys):
    from blueberry.ablation import main
    from blueberry.errors import run_cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.yaml").write_text(FARM.replace("plugins: [tests.plugins.fake_train]\n", ""))
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(["spec.yaml", "--storage", "sqlite:///q.db"]))
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        "error: --storage: an ablation uses the Optuna storage only as the queue of --worker\n"
    )
    assert sorted(os.listdir(tmp_path)) == ["spec.yaml"]
