"""Many machines, one queue: claiming ablation runs and sweep trials from a shared Optuna storage.

`run_ablation.py SPEC --storage URL --worker` can run on any number of machines at once. The work lives in
the storage as Optuna trials, so the database decides who runs what:

- An ablation's runs are the trials of the study `<name>-runs`, enqueued WAITING with the run identity
  `<config_hash>/<seed>` as the user attribute `key`. A sweep's trials are its own study's trials.
- Claiming a trial is switching it from WAITING to RUNNING. PostgreSQL (and MySQL) make that switch
  atomic through Optuna's `SELECT ... FOR UPDATE`; SQLite has no row locks, so on SQLite (whose workers
  share one machine anyway) claims are serialised by an flock on `<db>.lock`.
- Workers that start together may both enqueue the same run. At claim time a trial whose key already has
  a COMPLETE/PRUNED trial, or a WAITING/RUNNING one with a lower number, is voided (FAIL plus the user
  attribute `void`, left out of every count), so each key is executed by exactly one trial.
- While a worker trains, a thread stamps its trial's heartbeat every `interval` seconds. A RUNNING trial
  silent for GRACE_FACTOR x interval belongs to a dead worker: the next worker that looks fails it and
  Optuna's RetryHeartbeatStaleTrialCallback enqueues a copy (same key), which a free worker claims.
  The ablation runner then resumes that run in its MLflow run from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from blueberry.errors import BlueberryError, ConfigError

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient
    from optuna.storages import RDBStorage
    from optuna.trial import FrozenTrial

    from blueberry.ablation import AblationRunner, Outcome, PlannedRun

T = TypeVar("T")

DEFAULT_STORAGE = "optuna.db"
DEFAULT_HEARTBEAT = 20  # seconds between heartbeats; a run is re-queued after GRACE_FACTOR times this
GRACE_FACTOR = 3
MAX_RETRY = 3  # how often one run may be re-queued after its worker died
KEY = "key"  # user attr: what a trial executes (a run identity, "base", "trial-<n>")
VOID = "void"  # user attr: why a trial was skipped (duplicate, surplus, busy); such trials count nowhere


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ---------------------------------------------------------------------------------------------------------
# The storage


def resolve_storage_url(url: str | None = None) -> str:
    """`url`, else sqlite:///optuna.db in the working directory; relative sqlite paths made absolute so
    every process of a machine (and a later `chdir`) uses the same file."""
    url = url or f"sqlite:///{DEFAULT_STORAGE}"
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
        url = "sqlite:///" + str(Path(url.removeprefix("sqlite:///")).resolve())
    elif "://" not in url:
        raise ConfigError(
            f"--storage: expected a database URL such as postgresql://user@host/db, got {url!r}"
        )
    return url


def sqlite_file(url: str) -> Path | None:
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return Path(url.removeprefix("sqlite:///").split("?", 1)[0])
    return None


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Heartbeats, stale-trial retries and ask/tell with heartbeats are all 'experimental' to Optuna and
    warn on every use; the warnings say nothing to our users."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
        yield


def open_storage(url: str, heartbeat: int = DEFAULT_HEARTBEAT) -> RDBStorage:
    """An RDBStorage with heartbeats and automatic re-queueing of runs whose worker died."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    from blueberry.track import redact_uri, short_reason

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial INFO lines repeat ours
    if heartbeat < 1:
        raise ConfigError(f"--heartbeat: must be at least 1 second, got {heartbeat}")
    if sqlite_file(url) is not None:  # several processes on one file: wait for the write lock, do not fail
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 120}}
    else:
        engine_kwargs = {"pool_pre_ping": True, "pool_size": 2}

    def create() -> RDBStorage:
        with quiet_optuna():
            return RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=int(heartbeat),
                grace_period=GRACE_FACTOR * int(heartbeat),
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
            )

    try:
        return with_retries(create)
    except ImportError as e:
        raise BlueberryError(
            f"--storage {redact_uri(url)}: {short_reason(e)} (pip install -e '.[postgres]')"
        ) from None
    except Exception as e:  # noqa: BLE001 - an unreachable database is a one-line error, not a traceback
        raise BlueberryError(
            f"cannot reach the Optuna storage {redact_uri(url)}: {short_reason(e)}"
        ) from None


def with_retries(fn: Callable[[], T], attempts: int = 5, final: tuple[type[BaseException], ...] = ()) -> T:
    """Workers that start together race to create the same tables, study and experiment in a new database;
    the loser's error is gone a moment later, so try again after a random pause (`final` errors are final)."""
    for i in range(attempts):
        try:
            return fn()
        except (ImportError, *final):
            raise
        except Exception:
            if i == attempts - 1:
                raise
            time.sleep(random.uniform(0.5, 2.0))
    raise AssertionError("unreachable")


def connect_shared(uri: str, experiment: str) -> tuple[MlflowClient, str]:
    """connect + get_or_create_experiment for a worker: several may be creating the tracking database's
    tables or the experiment at this very moment, and several may share one SQLite file."""
    from blueberry.track import TrackingError, connect, get_or_create_experiment, sqlite_path

    if sqlite_path(uri) is not None and "?" not in uri:  # several writers: wait for the lock, up to a minute
        uri += "?timeout=60"
    client = with_retries(lambda: connect(uri))

    def experiment_id() -> str:
        try:
            return get_or_create_experiment(client, experiment, uri)
        except TrackingError:  # a deleted experiment: the user's to resolve
            raise
        except Exception:  # created by another worker in between: it is there now
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
            return exp.experiment_id

    try:
        return client, with_retries(experiment_id, final=(TrackingError,))
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001
        from blueberry.track import short_reason

        raise TrackingError(f"cannot create MLflow experiment {experiment!r}: {short_reason(e)}") from None


class ClaimLock:
    """Serialises claims on SQLite (no row locks there); a no-op for server databases."""

    def __init__(self, url: str):
        db = sqlite_file(url)
        self.path = db.with_name(db.name + ".lock") if db is not None else None
        self._fd: int | None = None

    def __enter__(self) -> ClaimLock:
        if self.path is not None:
            import fcntl

            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class Heartbeat:
    """Stamps one trial every interval from a daemon thread while its worker trains it. A failed stamp
    (the database briefly away) is retried at the next interval: only a dead process goes silent."""

    def __init__(self, storage: RDBStorage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{trial_id}", daemon=True)

    def _beat(self) -> None:
        interval = self.storage.get_heartbeat_interval() or DEFAULT_HEARTBEAT
        warned = False
        while not self._stop.wait(interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as e:  # noqa: BLE001
                if not warned:
                    print(f"warning: heartbeat failed ({type(e).__name__}); retrying", file=sys.stderr)
                    warned = True

    def __enter__(self) -> Heartbeat:
        self.storage.record_heartbeat(self.trial_id)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------------------
# Which trials count


def superseded(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of trials that failed with a dead worker and were re-queued as a newer trial."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


def live(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count: neither voided nor replaced by a retry; in number order."""
    gone = superseded(trials)
    return sorted(
        (t for t in trials if VOID not in t.user_attrs and t.number not in gone), key=lambda t: t.number
    )


def duplicate_reason(trial: FrozenTrial, trials: Sequence[FrozenTrial]) -> str | None:
    """Why a just-claimed trial must not run: its key is done, or an older trial of it is queued or running."""
    from optuna.trial import TrialState

    key = trial.user_attrs.get(KEY)
    if key is None:
        return None
    for t in live(trials):
        if t.number == trial.number or t.user_attrs.get(KEY) != key:
            continue
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            return f"duplicate of finished trial {t.number}"
        if t.state in (TrialState.WAITING, TrialState.RUNNING) and t.number < trial.number:
            return f"duplicate of trial {t.number}"
    return None


def void(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    """Close a claimed trial that must not run, so that it counts nowhere."""
    from optuna.trial import TrialState

    study._storage.set_trial_user_attr(trial._trial_id, VOID, reason)
    with quiet_optuna(), contextlib.suppress(Exception):
        study.tell(trial.number, state=TrialState.FAIL)


def fail_and_requeue(study: optuna.Study, trial_id: int) -> None:
    """Mark a trial failed and queue a copy of it (same key and params), as for a dead worker."""
    import copy

    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage
    try:
        if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
            return
    except UpdateFinishedTrialError:  # already failed as stale by another worker, which re-queued it
        return
    retry = storage.get_heartbeat_stale_trial_callback()
    if retry is not None:
        with quiet_optuna():
            retry(study, copy.deepcopy(storage.get_trial(trial_id)))


def tell_safely(study: optuna.Study, number: int, **kwargs: Any) -> bool:
    """study.tell, except that a trial already failed as stale (this worker looked dead) is only a warning."""
    from optuna.exceptions import UpdateFinishedTrialError

    try:
        with quiet_optuna():
            study.tell(number, **kwargs)
        return True
    except (UpdateFinishedTrialError, ValueError, RuntimeError) as e:
        print(f"warning: trial {number}: {e}", file=sys.stderr)
        return False


def note(trial: optuna.Trial, **attrs: Any) -> None:
    """Set user attributes of a trial this worker holds. If the trial was failed as stale meanwhile (this
    worker looked dead to the others), that is a warning: the work is done and its retry will redo it."""
    from optuna.exceptions import UpdateFinishedTrialError

    try:
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
    except UpdateFinishedTrialError as e:
        print(f"warning: trial {trial.number}: {e}", file=sys.stderr)


def poll_interval(heartbeat: int) -> float:
    """How often an idle worker looks again for stale or re-queued work."""
    return max(0.5, min(10.0, heartbeat / 2))


# ---------------------------------------------------------------------------------------------------------
# The run queue of an ablation


def run_key(pr: PlannedRun) -> str:
    return f"{pr.config_hash}/{pr.seed}"


class RunQueue:
    """The (variant, seed) runs of an ablation as trials of the Optuna study `<name>-runs`.

    `run_all` replaces AblationRunner's in-order loop: it enqueues what is missing, then claims runs
    until nothing of this spec is queued or running anywhere (waiting out other workers, so that a dead
    one's run is re-queued and someone is still there to finish it).
    """

    def __init__(
        self, storage_url: str, name: str, planned: Sequence[PlannedRun], heartbeat: int = DEFAULT_HEARTBEAT
    ):
        import optuna

        self.url = storage_url
        self.heartbeat = heartbeat
        self.storage = open_storage(storage_url, heartbeat)
        self.study_name = f"{name}-runs"
        with quiet_optuna():
            self.study = with_retries(
                lambda: optuna.create_study(
                    study_name=self.study_name, storage=self.storage, load_if_exists=True
                )
            )
        self.by_key = {run_key(pr): pr for pr in planned}
        self.lock = ClaimLock(storage_url)

    def _mine(self) -> list[FrozenTrial]:
        return [
            t for t in live(self.study.get_trials(deepcopy=False)) if t.user_attrs.get(KEY) in self.by_key
        ]

    def enqueue_missing(self) -> int:
        """Queue every planned run with no finished, queued or running trial (failed ones run again)."""
        import optuna
        from optuna.trial import TrialState

        with self.lock:
            have = {
                t.user_attrs[KEY]
                for t in self._mine()
                if t.state in (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
            }
            missing = [(k, pr) for k, pr in self.by_key.items() if k not in have]
            for key, pr in missing:
                self.study.add_trial(
                    optuna.trial.create_trial(
                        state=TrialState.WAITING,
                        user_attrs={KEY: key, "variant": pr.variant, "seed": pr.seed},
                    )
                )
        return len(missing)

    def claim(self) -> FrozenTrial | None:
        """The oldest queued run of this spec, now RUNNING and ours; None if nothing is queued."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        while True:
            with self.lock, quiet_optuna():
                from optuna.storages import fail_stale_trials

                fail_stale_trials(self.study)
                waiting = [t for t in self._mine() if t.state == TrialState.WAITING]
                got = None
                for t in waiting:
                    try:
                        if self.storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                            got = t
                            break
                    except UpdateFinishedTrialError:
                        continue
                if got is None:
                    return None
                self.storage.record_heartbeat(got._trial_id)
                self.storage.set_trial_user_attr(got._trial_id, "worker", worker_id())
                reason = duplicate_reason(got, self.study.get_trials(deepcopy=False))
                if reason is None:
                    return got
                void(self.study, got, reason)

    def busy_elsewhere(self) -> int:
        """Runs of this spec queued or running (for another worker, or a dead one not yet re-queued)."""
        from optuna.trial import TrialState

        return sum(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in self._mine())

    def finish(self, trial: FrozenTrial, outcome: Outcome) -> None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        try:
            self.storage.set_trial_user_attr(trial._trial_id, "status", outcome.status)
            if outcome.run_id:
                self.storage.set_trial_user_attr(trial._trial_id, "mlflow_run_id", outcome.run_id)
        except UpdateFinishedTrialError:  # failed as stale meanwhile: tell_safely below says so
            pass
        if outcome.status in ("finished", "diverged", "skipped"):
            tell_safely(self.study, trial.number, values=0.0, state=TrialState.COMPLETE)
        elif outcome.status == "busy":  # another invocation on this machine holds the run folder
            void(self.study, trial, "busy")
        else:
            tell_safely(self.study, trial.number, state=TrialState.FAIL)

    def run_all(self, runner: AblationRunner, planned: Sequence[PlannedRun], console: Any) -> list[Outcome]:
        from rich.console import Console

        status = Console(stderr=True)
        added = self.enqueue_missing()
        status.print(
            f"[bold]{self.study_name}[/]: worker {worker_id()}; {added} runs queued by this worker, "
            f"{len(self.by_key)} in this spec"
        )
        outcomes: list[Outcome] = []
        announced = False
        while True:
            trial = self.claim()
            if trial is None:
                left = self.busy_elsewhere()
                if not left:
                    break
                if not announced:
                    status.print(
                        f"waiting: {left} runs running elsewhere (or in a worker that died less than "
                        f"{GRACE_FACTOR * self.heartbeat}s ago)"
                    )
                    announced = True
                time.sleep(poll_interval(self.heartbeat))
                continue
            announced = False
            pr = self.by_key[trial.user_attrs[KEY]]
            if runner.progress:
                status.print(f"[bold]{self.study_name}[/] trial {trial.number}: {pr.variant} seed {pr.seed}")
            try:
                with Heartbeat(self.storage, trial._trial_id):
                    o = runner._run_one(pr)
            except BaseException:  # Ctrl-C, a store outage, an input error: another worker may take it
                fail_and_requeue(self.study, trial._trial_id)
                raise
            self.finish(trial, o)
            outcomes.append(o)
            style = {"finished": "green", "diverged": "yellow", "failed": "red"}.get(o.status, "dim")
            console.print(f"[{style}]{o.status:>8}[/] {pr.variant} seed {pr.seed}  {o.detail}".rstrip())
        return outcomes
