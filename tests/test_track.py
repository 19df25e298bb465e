"""Tracking: the Tracker interface, MLflow writes, and the local buffer that keeps a run alive without a store."""

import atexit
import functools
import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR

from blueberry.track import (
    BUFFER_FILE,
    MAX_PARAM_LEN,
    MLflowTracker,
    NullTracker,
    Tracker,
    TrackingError,
    connect,
    default_artifact_location,
    flatten_params,
    get_or_create_experiment,
    replay_buffer,
    resolve_tracking_uri,
)

CLOSED_PORT = "http://127.0.0.1:9"


@functools.lru_cache(maxsize=1)
def _template_db() -> Path:
    """An initialised, empty MLflow sqlite database; creating one costs seconds, copying it nothing."""
    root = Path(tempfile.mkdtemp(prefix="blueberry-mlflow-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}").search_experiments(max_results=1)
    return root / "mlflow.db"


def make_store(tmp_path: Path, monkeypatch) -> str:
    """A fresh sqlite store at ./mlflow.db, the working directory being tmp_path; returns its URI."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copyfile(_template_db(), tmp_path / "mlflow.db")
    return resolve_tracking_uri()


@pytest.fixture
def store(tmp_path, monkeypatch):
    return make_store(tmp_path, monkeypatch)


@pytest.fixture
def fast_http(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")


def new_run(uri: str, experiment: str = "t") -> tuple[MlflowClient, str]:
    client = MlflowClient(tracking_uri=uri)
    exp = get_or_create_experiment(client, experiment, uri)
    return client, client.create_run(exp).info.run_id


def test_null_tracker_accepts_everything_and_fits_the_protocol(tmp_path):
    t = NullTracker()
    assert isinstance(t, Tracker) and t.run_id is None
    t.log_params({"a": 1})
    t.set_tags({"b": "c"})
    t.log_metrics({"val_loss": 1.0}, step=3)
    t.log_text("x", "x.txt")
    t.log_artifact(tmp_path)
    assert t.close() is True


def test_flatten_params_gives_dotted_keys_and_json_lists():
    flat = flatten_params({"model": {"qk_norm": True, "vocab_size": None}, "optim": {"betas": [0.9, 0.95]}})
    assert flat == {"model.qk_norm": True, "model.vocab_size": None, "optim.betas": "[0.9, 0.95]"}


def test_tracking_uri_precedence_and_absolute_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert resolve_tracking_uri() == "http://example:5000"
    assert resolve_tracking_uri("sqlite:///x/y.db") == f"sqlite:///{tmp_path / 'x' / 'y.db'}"
    assert (
        default_artifact_location(resolve_tracking_uri("sqlite:///y.db"))
        == (tmp_path / "mlartifacts").as_uri()
    )
    assert default_artifact_location("http://example:5000") is None


def test_unreachable_store_is_a_one_line_error(fast_http):
    t0 = time.monotonic()
    with pytest.raises(TrackingError) as e:
        connect(CLOSED_PORT)
    assert time.monotonic() - t0 < 10
    assert "cannot reach the tracking store http://127.0.0.1:9" in str(e.value)
    assert "\n" not in str(e.value)


def test_tracker_writes_params_tags_metrics_and_texts(store, tmp_path):
    client, run_id = new_run(store)
    t = MLflowTracker(client, run_id, tmp_path / "run" / BUFFER_FILE)
    many = {f"p{i:03d}": i for i in range(250)}  # more than one log_batch may carry
    t.log_params({**many, "long": "x" * (MAX_PARAM_LEN + 100), "none": None})
    t.set_tags({"device": "cpu"})
    for step in (1, 2, 3):
        t.log_metrics({"train_loss": 4.0 - step, "lr": 1e-3}, step=step)
    t.log_text("hello", "notes/hello.txt")
    (tmp_path / "art.txt").write_text("artifact")
    t.log_artifact(tmp_path / "art.txt", "files")
    t.log_params({"p000": 0})  # the same value again (as on a resume): accepted
    assert t.close("FINISHED") is True
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(run.data.params) == 252 and run.data.params["long"] == "x" * MAX_PARAM_LEN
    assert run.data.params["none"] == "None" and run.data.tags["device"] == "cpu"
    assert [m.value for m in client.get_metric_history(run_id, "train_loss")] == [3.0, 2.0, 1.0]
    listed = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "notes")
    }
    assert {"notes/hello.txt", "files"} <= listed
    assert not (tmp_path / "run" / BUFFER_FILE).exists()


def test_a_conflicting_param_does_not_drop_the_others(store, tmp_path, capsys):
    client, run_id = new_run(store)
    MLflowTracker(client, run_id).log_params({"model.vocab_size": "None"})
    t = MLflowTracker(client, run_id)  # a new process on the same run, e.g. after a resume
    t.log_params({"model.vocab_size": 4096, "params": 123})
    params = client.get_run(run_id).data.params
    assert params == {"model.vocab_size": "None", "params": "123"}
    assert "kept its earlier values of params model.vocab_size" in capsys.readouterr().err


def test_unreachable_store_buffers_to_a_file_and_warns_once_naming_it(store, tmp_path, fast_http, capsys):
    good, run_id = new_run(store)
    buf = tmp_path / "run" / BUFFER_FILE
    t = MLflowTracker(MlflowClient(tracking_uri=CLOSED_PORT), run_id, buf, retry_interval=0)
    t.log_params({"model.d_model": 128})
    t.set_tags({"device": "cpu"})
    for step in range(1, 4):
        t.log_metrics({"val_loss": 5.0 - step}, step=step)
    t.log_text("routing table", "routing.txt")
    assert t.close("FINISHED") is False
    err = capsys.readouterr().err
    assert err.count("buffering to") == 1 and str(buf) in err
    assert "still unreachable" in err and f"python -m blueberry.track replay {buf}" in err
    ops = [json.loads(line)["op"] for line in buf.read_text().splitlines()]
    assert ops == ["params", "tags", "metrics", "metrics", "metrics", "text", "terminate"]

    assert replay_buffer(buf, good) == (True, 7)  # later, with the store back: everything, in order
    run = good.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"model.d_model": "128"}
    assert [(m.step, m.value) for m in good.get_metric_history(run_id, "val_loss")] == [
        (1, 4.0),
        (2, 3.0),
        (3, 2.0),
    ]
    assert not buf.exists()


class FlakyClient:
    """A real client whose calls fail (as an unreachable server does) until `up` is set."""

    def __init__(self, client):
        self.client, self.up, self.failures = client, False, 0

    def __getattr__(self, name):
        real = getattr(self.client, name)

        def call(*args, **kwargs):
            if not self.up:
                self.failures += 1
                raise MlflowException("API request failed: [Errno 111] Connection refused", INTERNAL_ERROR)
            return real(*args, **kwargs)

        return call


def test_buffer_is_replayed_in_order_at_the_next_successful_call(store, tmp_path, capsys):
    client, run_id = new_run(store)
    flaky = FlakyClient(client)
    buf = tmp_path / BUFFER_FILE
    t = MLflowTracker(flaky, run_id, buf, retry_interval=0)
    t.log_metrics({"train_loss": 9.0}, step=1)
    t.log_metrics({"train_loss": 8.0}, step=2)
    assert flaky.failures >= 2 and buf.is_file()
    flaky.up = True
    t.log_metrics({"train_loss": 7.0}, step=3)
    assert not buf.exists()
    history = client.get_metric_history(run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(1, 9.0), (2, 8.0), (3, 7.0)]
    assert history[0].timestamp <= history[1].timestamp <= history[2].timestamp  # original times kept
    assert "delivered 2 buffered records" in capsys.readouterr().err
    assert t.close("FINISHED") is True


def test_buffer_is_flushed_at_close_when_the_store_comes_back(store, tmp_path):
    client, run_id = new_run(store)
    flaky = FlakyClient(client)
    t = MLflowTracker(flaky, run_id, tmp_path / BUFFER_FILE, retry_interval=3600)
    t.log_params({"a": 1})
    t.log_metrics({"val_loss": 2.0}, step=5)
    calls = flaky.failures
    t.log_metrics({"val_loss": 1.5}, step=6)  # within the retry interval: straight to the buffer, no call
    assert flaky.failures == calls
    flaky.up = True
    assert t.close("FINISHED") is True
    run = client.get_run(run_id)
    assert (
        run.info.status == "FINISHED" and run.data.metrics["val_loss"] == 1.5 and run.data.params["a"] == "1"
    )


def test_replay_command_delivers_a_left_over_buffer(store, tmp_path, fast_http, capsys):
    from blueberry.track import _main

    good, run_id = new_run(store)
    buf = tmp_path / BUFFER_FILE
    t = MLflowTracker(MlflowClient(tracking_uri=CLOSED_PORT), run_id, buf)
    t.log_metrics({"val_loss": 1.25}, step=7)
    assert t.close("FINISHED") is False
    assert _main(["replay", str(buf), "--tracking-uri", store]) == 0
    assert "delivered 2 records" in capsys.readouterr().out
    run = good.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["val_loss"] == 1.25 and not buf.exists()
