"""Faults, really injected: kills while writing checkpoints, caches and reports, Ctrl-C, corrupt and hostile
checkpoints, a full disk, a tracking server that dies mid-run, a diverging variant.

Each test proves the same three things: the next invocation completes the work, nothing corrupt is ever
read as valid, and no (variant, seed) ends with two finished runs. SIGKILL *during training* is covered
in test_train.py and test_ablation_e2e.py. Everything trains the tiny model on one thread (train.threads=1,
OMP_NUM_THREADS=1): on 2 shared cores that is both faster and steadier than two threads.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

import blueberry.train.trainer as T
from blueberry import ablation
from blueberry.checkpoint import CheckpointError, find_checkpoint, load_model, verify_checkpoint
from blueberry.config import load_config
from blueberry.errors import run_cli
from tests.conftest import tiny_run_overrides
from tests.test_ablation import SPEC, FakeTrainer, markdown_rows
from tests.test_track import _template_db, make_store

REPO = Path(__file__).resolve().parent.parent
STEPS = 20  # the tiny run: evaluations (and `last` checkpoints) at steps 2, 4, ..., 20


def sets(corpus_dir, cache_dir, **extra) -> list[str]:
    return tiny_run_overrides(corpus_dir, cache_dir, **{"train.threads": 1, **extra})


def cfg_for(corpus_dir, cache_dir, **extra):
    return load_config(data={"preset": "tiny"}, overrides=sets(corpus_dir, cache_dir, **extra))


def env(**extra) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    out.update(extra)
    return out


@pytest.fixture(autouse=True)
def _restore_threads():
    """train.threads=1 calls torch.set_num_threads; later tests in this process get their setting back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(corpus_dir, cache_dir, tmp_path_factory):
    """The final weights of an uninterrupted tiny run: what every interrupted one must end with."""
    n = torch.get_num_threads()
    run = tmp_path_factory.mktemp("reference") / "run"
    res = T.train(cfg_for(corpus_dir, cache_dir), run_dir=run, progress=False)
    torch.set_num_threads(n)
    assert res.status == "finished" and res.steps == STEPS
    return load_file(run / "checkpoints" / "last" / "model.safetensors")


def assert_same_weights(run_dir: Path, reference: dict) -> None:
    got = load_file(run_dir / "checkpoints" / "last" / "model.safetensors")
    assert got.keys() == reference.keys()
    for k in got:
        assert torch.equal(got[k], reference[k]), k


def steps_of(ckpt) -> int:
    return ckpt.meta["state"]["used"]["steps"]


class Crash(BaseException):
    """Ends a run in-process the way SIGKILL would: nothing after the raise gets to run."""


def crash_before_nth_save(run_dir: Path, cfg, monkeypatch, nth: int = 3) -> None:
    """A run that died just before its nth `last` checkpoint: `last` holds step 2 * (nth - 1)."""
    real, count = T.save_checkpoint, [0]

    def save(path, *args, **kwargs):
        if Path(path).name == "last":
            count[0] += 1
            if count[0] == nth:
                raise Crash
        return real(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(T, "save_checkpoint", save)
        with pytest.raises(Crash):
            T.train(cfg, run_dir=run_dir, progress=False)
    assert steps_of(verify_checkpoint(run_dir / "checkpoints" / "last")) == 2 * (nth - 1)


# ---------------------------------------------------------------------------------------------------------
# SIGKILL while a checkpoint is being written


KILL_IN_SAVE = """\
import os, signal, sys
from pathlib import Path
import torch
import blueberry.train.trainer as T
from blueberry.config import load_config

stage, nth, run_dir, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
real_save, real_replace, real_torch_save = T.save_checkpoint, os.replace, torch.save
state = {"n": 0, "armed": False}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def save_checkpoint(path, *args, **kwargs):  # arms the hooks below for the nth save of `last`
    if Path(path).name == "last":
        state["n"] += 1
        state["armed"] = state["n"] == nth
    try:
        return real_save(path, *args, **kwargs)
    finally:
        state["armed"] = False

def torch_save(obj, f, *args, **kwargs):  # optimizer.pt: half written, then the kill
    real_torch_save(obj, f, *args, **kwargs)
    if state["armed"] and stage == "mid_write":
        os.truncate(f, os.path.getsize(f) // 2)
        die()

def replace(src, dst):  # the two renames that swap the new checkpoint in
    if state["armed"] and Path(dst).name == "last.prev":
        if stage == "before_prev_move":
            die()
        real_replace(src, dst)
        if stage == "after_prev_move":
            die()
        return
    return real_replace(src, dst)

T.save_checkpoint, torch.save, os.replace = save_checkpoint, torch_save, replace
T.train(load_config(data={"preset": "tiny"}, overrides=overrides), run_dir=run_dir, progress=False)
print("NOT KILLED")
"""


@pytest.mark.parametrize("stage", ["mid_write", "before_prev_move", "after_prev_move"])
def test_sigkill_while_writing_a_checkpoint_leaves_a_good_one_and_the_run_completes(
    stage, corpus_dir, cache_dir, tmp_path, reference, capsys
):
    run_dir = tmp_path / "run"
    p = subprocess.run(
        [sys.executable, "-c", KILL_IN_SAVE, stage, "3", str(run_dir), *sets(corpus_dir, cache_dir)],
        env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    ckpts = run_dir / "checkpoints"
    assert list(ckpts.glob(".last.tmp-*")), "the kill should have left the half-done temporary folder"
    assert (ckpts / "last").exists() == (stage != "after_prev_move")

    found = find_checkpoint(ckpts / "last")
    assert found is not None and steps_of(found) == 4  # the 2nd save: the one before the killed 3rd
    err = capsys.readouterr().err
    if stage == "after_prev_move":
        assert found.path == ckpts / "last.prev"
        assert "last: missing (a save was interrupted); falling back to the previous checkpoint" in err
        assert err.count("\n") == 1
    else:
        assert found.path == ckpts / "last" and not err

    res = T.train(cfg_for(corpus_dir, cache_dir), run_dir=run_dir, progress=False)
    assert res.status == "finished" and res.steps == STEPS
    assert_same_weights(run_dir, reference)  # resumed exactly: the same weights as never killed
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "last"]  # stale temp folder and .prev gone


# ---------------------------------------------------------------------------------------------------------
# Corrupt, truncated and hostile checkpoints


def test_truncated_checkpoint_is_never_loaded_the_run_restarts_with_a_warning(
    corpus_dir, cache_dir, tmp_path, reference, monkeypatch, capsys
):
    run_dir, cfg = tmp_path / "run", cfg_for(corpus_dir, cache_dir)
    crash_before_nth_save(run_dir, cfg, monkeypatch)
    last = run_dir / "checkpoints" / "last"
    weights = last / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    capsys.readouterr()

    with pytest.raises(CheckpointError, match="model.safetensors is corrupt \\(checksum mismatch\\)"):
        load_model(last)  # what inference.py would do
    res = T.train(cfg, run_dir=run_dir, progress=False)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert err == [
        f"warning: {last}: model.safetensors is corrupt (checksum mismatch); no usable checkpoint left, "
        "so the run starts over from step 0"
    ]
    assert res.status == "finished" and res.steps == STEPS
    assert_same_weights(run_dir, reference)


def test_corrupt_checkpoint_falls_back_to_the_previous_one_with_a_warning(
    corpus_dir, cache_dir, tmp_path, reference, monkeypatch, capsys
):
    run_dir, cfg = tmp_path / "run", cfg_for(corpus_dir, cache_dir)
    crash_before_nth_save(run_dir, cfg, monkeypatch, nth=4)
    ckpts = run_dir / "checkpoints"
    shutil.copytree(ckpts / "last", ckpts / "last.prev")  # a good step-6 .prev, as an interrupted save leaves
    (ckpts / "last" / "meta.json").write_text('{"state": {"used": {"steps": 1')  # torn manifest
    capsys.readouterr()

    res = T.train(cfg, run_dir=run_dir, progress=False)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(err) == 1 and f"{ckpts / 'last'}: corrupt meta.json" in err[0]
    assert err[0].endswith(f"; falling back to the previous checkpoint {ckpts / 'last.prev'}")
    assert res.status == "finished" and res.steps == STEPS
    assert_same_weights(run_dir, reference)


class _Evil:
    """Unpickling this runs a shell command: what a hostile optimizer.pt would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_object_in_optimizer_state_is_refused_not_run(corpus_dir, cache_dir, tmp_path, monkeypatch):
    run_dir, cfg = tmp_path / "run", cfg_for(corpus_dir, cache_dir)
    crash_before_nth_save(run_dir, cfg, monkeypatch)
    last = run_dir / "checkpoints" / "last"
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _Evil(marker), "torch_rng": torch.get_rng_state()}, last / "optimizer.pt")
    meta = json.loads((last / "meta.json").read_text())  # a correct checksum: only weights_only stands guard
    meta["files"]["optimizer.pt"] = (
        __import__("hashlib").sha256((last / "optimizer.pt").read_bytes()).hexdigest()
    )
    (last / "meta.json").write_text(json.dumps(meta))
    assert verify_checkpoint(last)

    with pytest.raises(CheckpointError) as e:
        T.train(cfg, run_dir=run_dir, progress=False)
    msg = str(e.value)
    assert (
        msg.startswith(f"{last / 'optimizer.pt'}: refused: it holds objects other than tensors")
        and "\n" not in msg
    )
    assert "GLOBAL posix.system" in msg or "GLOBAL os.system" in msg
    assert not marker.exists()


def test_disk_full_while_writing_a_checkpoint_names_the_path_and_keeps_the_previous_one(
    corpus_dir, cache_dir, tmp_path, reference, monkeypatch
):
    run_dir, cfg = tmp_path / "run", cfg_for(corpus_dir, cache_dir)
    last = run_dir / "checkpoints" / "last"
    real, calls = torch.save, [0]

    def save_until_the_disk_fills(obj, f, *args, **kwargs):  # the 3rd optimizer.pt runs out of space midway
        calls[0] += 1
        if calls[0] == 3:
            Path(f).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real(obj, f, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch, "save", save_until_the_disk_fills)
        with pytest.raises(CheckpointError) as e:
            T.train(cfg, run_dir=run_dir, progress=False)
    assert str(e.value) == (
        f"cannot write checkpoint {last}: No space left on device; the previous checkpoint {last} is intact"
    )
    assert steps_of(verify_checkpoint(last)) == 4
    assert sorted(p.name for p in last.parent.iterdir()) == ["best", "last"]  # no half-written folder

    res = T.train(cfg, run_dir=run_dir, progress=False)  # space again: the run resumes and completes
    assert res.status == "finished" and res.steps == STEPS
    assert_same_weights(run_dir, reference)


# ---------------------------------------------------------------------------------------------------------
# SIGKILL while preparing data


DIE_MID_TOKENIZING = """\
import os, signal, sys
import blueberry.data.cache as C
from blueberry.data.__main__ import main

real = C._doc_batches

def batches(docs, max_bytes=1 << 20, max_docs=256):  # small batches; SIGKILL before the 4th
    for i, batch in enumerate(real(docs, max_docs=4)):
        if i == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        yield batch

C._doc_batches = batches
main(sys.argv[1:])
"""


def test_sigkill_while_tokenizing_leaves_no_entry_and_the_next_prepare_succeeds(corpus_dir, tmp_path):
    from blueberry.data import prepare
    from blueberry.data.cache import read_manifest

    cache = tmp_path / "cache"
    args = ["prepare", "--no-progress", "--set", f"data.source={corpus_dir}", "--set", f"data.cache_dir={cache}",
            "--set", "tokenizer.vocab_size=300", "--set", "eval.val_tokens=2048"]  # fmt: skip
    p = subprocess.run(
        [sys.executable, "-c", DIE_MID_TOKENIZING, *args], env=env(), capture_output=True, timeout=300
    )
    assert p.returncode == -signal.SIGKILL, p.stderr
    shards = cache / "shards"
    (tmp,) = shards.iterdir()
    assert tmp.name.startswith(".tmp-") and not (tmp / "manifest.json").exists()  # half-written, unpublished

    p = subprocess.run(
        [sys.executable, "-m", "blueberry.data", *args],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    (entry,) = shards.iterdir()  # the stale temporary folder was swept
    assert not entry.name.startswith(".")
    manifest = json.loads((entry / "manifest.json").read_text())
    assert read_manifest(entry, manifest["key"])[0] is not None

    fresh = prepare(
        load_config(None, args[3::2] + ["data.cache_dir=" + str(tmp_path / "fresh")]), progress=False
    )
    assert (entry / "train.bin").read_bytes() == (fresh.cache_dir / "train.bin").read_bytes()
    assert (entry / "val.bin").read_bytes() == (fresh.cache_dir / "val.bin").read_bytes()


# ---------------------------------------------------------------------------------------------------------
# SIGKILL while writing the report


KILL_IN_REPORT = """\
import os, signal, sys
from blueberry.ablation import main
from blueberry.errors import run_cli

target = sys.argv[1]  # kill when this file's temporary copy is about to be renamed into place
real_replace = os.replace

def replace(src, dst):
    if os.path.basename(dst) == target:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)

os.replace = replace
sys.argv = ["run_ablation.py", *sys.argv[2:]]
run_cli(main)
"""


def test_sigkill_while_writing_the_report_never_leaves_a_partial_one(tmp_path, monkeypatch):
    store = make_store(tmp_path, monkeypatch)
    (tmp_path / "demo.yaml").write_text(SPEC)
    monkeypatch.setattr(ablation, "train_fn", FakeTrainer())
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: ablation.main(["demo.yaml", "--no-progress"]))
    assert e.value.code == 0
    report, figure = tmp_path / "reports" / "demo.md", tmp_path / "reports" / "demo" / "val_loss_vs_time.png"

    def killed_report_only(target: str) -> None:
        p = subprocess.run(
            [sys.executable, "-c", KILL_IN_REPORT, target, "demo.yaml", "--report-only"],
            cwd=tmp_path, env=env(MLFLOW_TRACKING_URI=store), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert p.returncode == -signal.SIGKILL, p.stderr

    report.unlink()
    killed_report_only("demo.md")  # no report before: still none, not half of one
    assert not report.exists()

    with pytest.raises(SystemExit):
        run_cli(lambda: ablation.main(["demo.yaml", "--report-only"]))
    text, png = report.read_text(), figure.read_bytes()
    assert markdown_rows(text, "Results")["qk_on"][1] == "2 / 0"

    killed_report_only("val_loss_vs_time.png")  # a rewrite killed midway: the previous report is intact
    assert report.read_text() == text and figure.read_bytes() == png

    with pytest.raises(SystemExit) as e:  # and the next invocation writes it
        run_cli(lambda: ablation.main(["demo.yaml", "--report-only"]))
    assert e.value.code == 0 and markdown_rows(report.read_text(), "Results")["qk_off"][1] == "2 / 0"
    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("demo")
    assert len(client.search_runs([exp.experiment_id], "tags.config_hash != ''")) == 4  # one run per identity


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C on a real run_ablation.py, a diverging variant


def tiny_spec(path: Path, corpus_dir, cache_dir, name: str, variants: str, **extra) -> list[str]:
    """A spec file plus the --set arguments that make its runs tiny and real."""
    path.write_text(f"name: {name}\npreset: tiny\nseeds: [0]\nbaseline: a\nvariants:\n{variants}")
    return [a for s in sets(corpus_dir, cache_dir, **extra) for a in ("--set", s)]


def runs_of(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.config_hash != ''")


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the runner exited (code {proc.returncode}) before the fault could be injected")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting to inject the fault")
        time.sleep(0.05)


def test_ctrl_c_marks_the_run_killed_keeps_its_checkpoint_exits_130_and_the_rerun_completes(
    corpus_dir, cache_dir, tmp_path
):
    spec = tmp_path / "sigint.yaml"
    over = tiny_spec(spec, corpus_dir, cache_dir, "sigint", "  a: {}\n  b: {model.qk_norm: false}\n",
                     **{"budget.steps": 300, "eval.every": 0.02, "train.log_every": 10})  # fmt: skip
    cmd = [sys.executable, str(REPO / "run_ablation.py"), str(spec), "--no-progress", *over]
    e = env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metas = lambda: list((tmp_path / "runs" / "sigint" / "a").glob("*/checkpoints/last/meta.json"))  # noqa: E731
    wait_for(lambda: bool(metas()), proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err

    client = MlflowClient(tracking_uri=e["MLFLOW_TRACKING_URI"])
    (child,) = runs_of(client, "sigint")  # b never started
    assert child.info.status == "KILLED" and child.data.tags["status"] == "killed"
    (parent,) = client.search_runs([child.info.experiment_id], "tags.kind = 'ablation'")
    assert parent.info.status == "KILLED"
    kept = find_checkpoint(Path(child.data.tags["run_dir"]) / "checkpoints" / "last")
    assert kept is not None and 0 < steps_of(kept) < 300

    again = subprocess.run(cmd, cwd=tmp_path, env=e, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    runs = runs_of(client, "sigint")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert client.get_run(child.info.run_id).data.tags["status"] == "finished"  # the same run, resumed
    assert client.get_run(child.info.run_id).data.metrics["steps"] == 300


def test_a_diverging_variant_is_a_result_and_the_others_finish(corpus_dir, cache_dir, tmp_path, monkeypatch):
    store = make_store(tmp_path, monkeypatch)
    boom = "{optim.name: adamw, optim.lr: 1.0e+6, optim.grad_clip: null, train.loss_ceiling: 8.0, model.zero_init_outputs: false}"
    over = tiny_spec(
        tmp_path / "div.yaml",
        corpus_dir,
        cache_dir,
        "div",
        f"  a: {{}}\n  boom: {boom}\n  c: {{model.qk_norm: false}}\n",
    )
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: ablation.main(["div.yaml", "--no-progress", *over]))
    assert e.value.code == 0
    by_variant = {r.data.tags["variant"]: r for r in runs_of(MlflowClient(tracking_uri=store), "div")}
    assert (
        by_variant["boom"].data.tags["status"] == "diverged" and by_variant["boom"].info.status == "FINISHED"
    )
    assert by_variant["boom"].data.metrics["steps"] < STEPS
    assert by_variant["a"].data.tags["status"] == by_variant["c"].data.tags["status"] == "finished"
    rows = markdown_rows((tmp_path / "reports" / "div.md").read_text(), "Results")
    assert rows["boom"][1] == "0 / 1" and rows["a"][1] == rows["c"][1] == "1 / 0"


# ---------------------------------------------------------------------------------------------------------
# The tracking server dies mid-run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `mlflow server` (sqlite store and artifacts in tmp_path) that can be killed and restarted."""

    def __init__(self, root: Path):
        self.root, self.port = root, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        shutil.copyfile(_template_db(), root / "server.db")
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.root / f"server{self.starts}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env(),
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(
                    f"mlflow server did not start: {(self.root / f'server{self.starts}.log').read_text()[-2000:]}"
                )
            time.sleep(0.3)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    srv = Server(root)
    yield srv
    srv.kill()  # however the test ends


@pytest.mark.slow
def test_tracking_server_dying_mid_run_loses_nothing(server, corpus_dir, cache_dir, tmp_path):
    server.start()
    spec = tmp_path / "outage.yaml"
    over = tiny_spec(spec, corpus_dir, cache_dir, "outage", "  a: {}\n",
                     **{"budget.steps": 300, "eval.every": 0.05, "train.log_every": 10})  # fmt: skip
    cmd = [
        sys.executable,
        str(REPO / "run_ablation.py"),
        str(spec),
        "--no-progress",
        "--tracking-uri",
        server.url,
        *over,
    ]
    e = env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="3")
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    run_dirs = lambda: list((tmp_path / "runs" / "outage" / "a").glob("*"))  # noqa: E731
    wait_for(lambda: any((d / "checkpoints" / "last" / "meta.json").exists() for d in run_dirs()), proc)
    server.kill()  # mid-run: training goes on, tracking goes to the buffer
    out, err = proc.communicate(timeout=600)
    (run_dir,) = run_dirs()
    buffer = run_dir / "tracking_buffer.jsonl"

    result = json.loads((run_dir / "result.json").read_text())  # the run itself completed
    assert result["status"] == "finished" and result["steps"] == 300
    assert f"buffering to {buffer}" in err
    assert f"kept in {buffer} (deliver them later with: python -m blueberry.track replay {buffer})" in err
    assert proc.returncode == 2 and err.strip().splitlines()[-1].endswith(
        "run the same command again to continue"
    )
    assert buffer.is_file() and "Traceback" not in err

    server.start()  # same port, same store
    p = subprocess.run([sys.executable, "-m", "blueberry.track", "replay", str(buffer), "--tracking-uri", server.url],
                       env=e, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0 and re.search(r"^delivered \d+ records$", p.stdout, re.M), p.stdout + p.stderr
    assert not buffer.exists()

    client = MlflowClient(tracking_uri=server.url)
    (run,) = runs_of(client, "outage")
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
    local = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = sorted({r["step"] for r in local if "val_loss" in r})
    assert [
        m.step for m in client.get_metric_history(run.info.run_id, "val_loss")
    ] == evals  # every eval point
    assert run.data.metrics["steps"] == 300

    again = subprocess.run(cmd, cwd=tmp_path, env=e, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr  # the parent's buffer is delivered, nothing retrained
    assert len(runs_of(client, "outage")) == 1
    rows = markdown_rows((tmp_path / "reports" / "outage.md").read_text(), "Results")
    assert rows["a"][1] == "1 / 0"


# ---------------------------------------------------------------------------------------------------------
# The soak, in miniature


def test_soak_smoke_one_kill_loses_nothing(tmp_path):
    from benchmarks.soak import soak

    rec = soak(tmp_path, variants=2, seeds=1, steps=60, max_kills=1, max_minutes=3, sigint_share=0.0,
               modes=("checkpoint",), max_more=0)  # fmt: skip
    assert rec["kills"] == 1 and rec["sigkills"] == 1
    assert rec["lost"] == 0 and rec["duplicates"] == 0 and rec["left_running"] == 0
    assert rec["report_rows"] == 2 and rec["ok"], rec
