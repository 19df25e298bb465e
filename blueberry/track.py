"""Experiment tracking behind a five-method interface, so the trainer never imports MLflow.

`Tracker` is what the trainer talks to; `NullTracker` ignores everything; `MLflowTracker` writes one MLflow
run through `MlflowClient` with an explicit run id (no global "active run", so parent/child runs and
several trackers in one process do not interfere).

A tracking server that goes away must not cost a training run. When a call fails for a transient reason,
the record (params, tags, metrics with their original timestamps, texts, artifact paths, the final status)
is appended to `<run_dir>/tracking_buffer.jsonl` and replayed in order at the next call that can reach the
store, or at `close()`. What cannot be delivered by then stays in the file, with a one-line warning that
names it; `python -m blueberry.track replay FILE` delivers it later.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from blueberry.errors import BlueberryError

if TYPE_CHECKING:
    from mlflow import MlflowClient

ParamValue = str | int | float | bool | None

BUFFER_FILE = "tracking_buffer.jsonl"
DEFAULT_DB = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"

# MLflow's limits (mlflow.utils.validation); duplicated so that importing this module stays cheap.
MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 8000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

# Errors that retrying cannot fix: drop the record (with a warning) instead of buffering it forever.
_PERMANENT_CODES = {
    "INVALID_PARAMETER_VALUE",
    "BAD_REQUEST",
    "MALFORMED_REQUEST",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "INVALID_STATE",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
}


class TrackingError(BlueberryError):
    """The tracking store cannot be reached or used (checked before any training starts)."""


@runtime_checkable
class Tracker(Protocol):
    """What a training run reports to. Implementations never raise for an unreachable store."""

    @property
    def run_id(self) -> str | None: ...

    def log_params(self, params: Mapping[str, ParamValue]) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...


class NullTracker:
    """Tracks nothing: for tests, benchmarks and `train()` called without a store."""

    @property
    def run_id(self) -> str | None:
        return None

    def log_params(self, params: Mapping[str, ParamValue]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def close(self, status: str | None = None) -> bool:
        return True


def flatten_params(nested: Mapping[str, Any], prefix: str = "") -> dict[str, ParamValue]:
    """{"model": {"qk_norm": True}} -> {"model.qk_norm": True}; lists become their JSON text.

    The trainer and the ablation runner both flatten configs with this, so a param logged twice (e.g. on
    a resumed run) has the same text both times, which MLflow accepts.
    """
    out: dict[str, ParamValue] = {}
    for k, v in nested.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_params(v, f"{key}."))
        elif isinstance(v, list | tuple):
            out[key] = json.dumps(list(v))
        else:
            out[key] = v
    return out


def param_text(value: ParamValue) -> str:
    """The string MLflow stores for a param, cut to MLflow's length limit."""
    return str(value)[:MAX_PARAM_LEN]


# ---------------------------------------------------------------------------------------------------------
# Connecting


def resolve_tracking_uri(uri: str | None = None) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.

    Relative sqlite paths are made absolute, so a subprocess started elsewhere (torchrun) or a later
    `chdir` still writes to the same database.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and uri != "sqlite:///:memory:":
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    elif "://" not in uri and not uri.startswith(("databricks", "uc:")):  # a bare path: a file store
        uri = Path(uri).resolve().as_uri()
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite URI, None for other stores."""
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    return None


def default_artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store live in `mlartifacts/` next to the database; servers choose their own."""
    db = sqlite_path(uri)
    return (db.parent / ARTIFACT_DIR).resolve().as_uri() if db else None


def short_reason(e: BaseException) -> str:
    """One line out of MLflow's multi-line, URL-laden connection errors."""
    text = str(e)
    m = re.search(r"\[Errno -?\d+\] [^\"')]+", text)
    if m:
        return m.group(0).strip()
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return first if len(first) <= 200 else first[:197] + "..."


@contextmanager
def _fail_fast() -> Iterator[None]:
    """No HTTP retries for the start-up probe: an unreachable server should fail in seconds, not minutes."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        timeout = max(1, min(10, int(float(saved["MLFLOW_HTTP_REQUEST_TIMEOUT"] or 10))))
    except ValueError:
        timeout = 10
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def connect(uri: str) -> MlflowClient:
    """An MlflowClient for `uri`, after a quick call that proves the store answers (else TrackingError)."""
    from mlflow import MlflowClient

    try:
        with _fail_fast():
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot track"; say so in one line
        raise TrackingError(f"cannot reach the tracking store {redact_uri(uri)}: {short_reason(e)}") from None
    return client


def redact_uri(uri: str) -> str:
    """The URI without a password, for messages and reports."""
    return re.sub(r"(//[^:/@]+):[^@/]+@", r"\1:***@", uri)


def get_or_create_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment `name`, created (with artifacts next to a sqlite database) if missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment {name!r} (id {exp.experiment_id}) is deleted; restore it with "
                f"`mlflow experiments restore --experiment-id {exp.experiment_id}` or pass --experiment NAME"
            )
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=default_artifact_location(uri))


# ---------------------------------------------------------------------------------------------------------
# The MLflow tracker


def _is_permanent(e: BaseException) -> bool:
    if isinstance(e, FileNotFoundError | IsADirectoryError):
        return True
    return getattr(e, "error_code", None) in _PERMANENT_CODES


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class MLflowTracker:
    """One MLflow run, written through MlflowClient, with a local buffer for when the store is away.

    `retry_interval` is how long after a failure calls go straight to the buffer, so a server that
    hangs costs one timeout per interval rather than one per logged step.
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        buffer_path: str | Path | None = None,
        retry_interval: float = 30.0,
    ):
        self.client = client
        self._run_id = run_id
        self.buffer_path = Path(buffer_path) if buffer_path else None
        self.retry_interval = retry_interval
        self._lock = threading.RLock()
        self._last_failure = float("-inf")
        self._warned_unreachable = False
        self._logged_params: dict[str, str] = {}

    @classmethod
    def attach(
        cls, tracking_uri: str | None, run_id: str, run_dir: str | Path | None = None
    ) -> MLflowTracker:
        """A tracker on an existing run, buffering to `run_dir/tracking_buffer.jsonl` (e.g. torchrun rank 0)."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
        return cls(client, run_id, Path(run_dir) / BUFFER_FILE if run_dir is not None else None)

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def pending(self) -> int:
        """Records waiting in the buffer file."""
        if self.buffer_path is None or not self.buffer_path.is_file():
            return 0
        with open(self.buffer_path) as f:
            return sum(1 for line in f if line.strip())

    # -- the Tracker interface

    def log_params(self, params: Mapping[str, ParamValue]) -> None:
        items = [(k, param_text(v)) for k, v in params.items()]
        items = [(k, v) for k, v in items if self._logged_params.get(k) != v]
        for chunk in _chunks(items, MAX_PARAMS_PER_BATCH):
            self._submit({"op": "params", "params": chunk})
        self._logged_params.update(items)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        items = [(k, str(v)[:MAX_TAG_LEN]) for k, v in tags.items()]
        for chunk in _chunks(items, MAX_PARAMS_PER_BATCH):
            self._submit({"op": "tags", "tags": chunk})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        items = [(k, float(v)) for k, v in metrics.items() if v is not None]
        for chunk in _chunks(items, MAX_METRICS_PER_BATCH):
            self._submit({"op": "metrics", "metrics": chunk, "step": int(step), "ts": ts})

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._submit(
            {"op": "artifact", "path": str(Path(local_path).resolve()), "artifact_path": artifact_path}
        )

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit({"op": "text", "text": text, "artifact_file": artifact_file})

    # -- run lifecycle (the ablation runner's, not the trainer's)

    def terminate(self, status: str) -> None:
        """End the run with an MLflow status (FINISHED, FAILED, KILLED); buffered like everything else."""
        self._submit({"op": "terminate", "status": status, "ts": int(time.time() * 1000)})

    def close(self, status: str | None = None) -> bool:
        """Optionally terminate, then deliver what is buffered. False (and a warning) if some stays behind."""
        with self._lock:
            if status is not None:
                self.terminate(status)
            if self._buffered() and not self.flush():
                where = self.buffer_path
                _warn(
                    f"tracking store still unreachable; {self.pending} records for run {self._run_id} kept in "
                    f"{where} (deliver them later with: python -m blueberry.track replay {where})"
                )
                return False
            return True

    def flush(self) -> bool:
        """Replay the buffer in order; True if it is empty afterwards."""
        with self._lock:
            if self.buffer_path is None or not self.buffer_path.is_file():
                return True
            ok, n = replay_buffer(self.buffer_path, self.client)
            if ok:
                if n:
                    print(f"tracking: delivered {n} buffered records for run {self._run_id}", file=sys.stderr)
                self._warned_unreachable = False
            else:
                self._last_failure = time.monotonic()
            return ok

    # -- internals

    def _buffered(self) -> bool:
        return (
            self.buffer_path is not None
            and self.buffer_path.is_file()
            and self.buffer_path.stat().st_size > 0
        )

    def _submit(self, record: dict[str, Any]) -> None:
        record = {"run_id": self._run_id, **record}
        with self._lock:
            if self._buffered():
                if time.monotonic() - self._last_failure < self.retry_interval or not self.flush():
                    self._append(record)
                    return
            try:
                apply_record(self.client, record)
            except Exception as e:  # noqa: BLE001 - the store's problem must not end the training run
                if _is_permanent(e):
                    _warn(
                        f"tracking: dropped a {record['op']} record for run {self._run_id}: {short_reason(e)}"
                    )
                    return
                self._last_failure = time.monotonic()
                if self.buffer_path is None:
                    _warn(f"tracking: lost a {record['op']} record (store unreachable: {short_reason(e)})")
                    return
                if not self._warned_unreachable:
                    _warn(f"tracking store unreachable ({short_reason(e)}); buffering to {self.buffer_path}")
                    self._warned_unreachable = True
                self._append(record)

    def _append(self, record: dict[str, Any]) -> None:
        assert self.buffer_path is not None
        self.buffer_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.buffer_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def apply_record(client: MlflowClient, record: Mapping[str, Any]) -> None:
    """Send one buffered record to the store."""
    from mlflow.entities import Metric, Param, RunTag

    run_id, op = record["run_id"], record["op"]
    if op == "params":
        params = [Param(k, v) for k, v in record["params"]]
        try:
            client.log_batch(run_id, params=params)
        except Exception as e:
            if not _is_permanent(e) or len(params) == 1:
                raise
            # One conflicting value (e.g. a resumed run re-logging a changed key) must not drop the rest.
            rejected = []
            for p in params:
                try:
                    client.log_batch(run_id, params=[p])
                except Exception as e1:
                    if not _is_permanent(e1):
                        raise
                    rejected.append(p.key)
            if rejected:
                _warn(f"tracking: run {run_id} kept its earlier values of params {', '.join(rejected)}")
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"]])
    elif op == "metrics":
        ts, step = record["ts"], record["step"]
        client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v in record["metrics"]])
    elif op == "artifact":
        client.log_artifact(run_id, record["path"], record.get("artifact_path"))
    elif op == "text":
        client.log_text(run_id, record["text"], record["artifact_file"])
    elif op == "terminate":
        client.set_terminated(run_id, status=record["status"], end_time=record.get("ts"))
    else:
        raise ValueError(f"unknown tracking record {op!r}")


def replay_buffer(path: str | Path, client: MlflowClient) -> tuple[bool, int]:
    """Deliver a buffer file's records in order. Returns (all delivered, how many were).

    On the first transient failure the undelivered rest is written back, so order is kept and nothing
    is sent twice; records the store rejects outright are dropped with a warning.
    """
    path = Path(path)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    done = 0
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a torn last line from a crash mid-write
            _warn(f"tracking: skipped an unreadable line in {path}")
            continue
        try:
            apply_record(client, record)
        except Exception as e:  # noqa: BLE001
            if _is_permanent(e):
                _warn(f"tracking: dropped a buffered {record.get('op')} record: {short_reason(e)}")
                continue
            from blueberry.checkpoint import atomic_write_text

            atomic_write_text(path, "".join(f"{rest}\n" for rest in lines[i:]))
            return False, done
        done += 1
    path.unlink(missing_ok=True)
    return True, done


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m blueberry.track", description="Tracking utilities.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("replay", help="deliver a tracking_buffer.jsonl left behind by an unreachable store")
    r.add_argument("buffer", type=Path)
    r.add_argument("--tracking-uri", default=None)
    args = p.parse_args(argv)
    if not args.buffer.is_file():
        raise BlueberryError(f"{args.buffer}: file not found")
    client = connect(resolve_tracking_uri(args.tracking_uri))
    ok, n = replay_buffer(args.buffer, client)
    print(f"delivered {n} records" + ("" if ok else f"; the rest stays in {args.buffer}"))
    return 0 if ok else 1


if __name__ == "__main__":
    from blueberry.errors import run_cli

    run_cli(_main)
