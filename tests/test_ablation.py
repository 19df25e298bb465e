"""The ablation runner: spec checks, the run matrix, MLflow bookkeeping, idempotence, resume and exit codes.

Training is a fake with the trainer's interface (metrics through the tracker, checkpoints, resume from
checkpoints/last), so these tests exercise the runner, not the model.
"""

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from blueberry import ablation
from blueberry.ablation import load_spec, main, param_count
from blueberry.checkpoint import find_checkpoint, save_checkpoint
from blueberry.config import RunConfig, load_config
from blueberry.errors import BlueberryError, run_cli
from blueberry.track import flatten_params, resolve_tracking_uri
from tests.test_track import _template_db, make_store

REPO = Path(__file__).resolve().parent.parent

SPEC = """\
name: demo
preset: tiny
budget: {time: 10s}
seeds: [0, 1]
baseline: qk_on
variants:
  qk_on: {}
  qk_off: {model.qk_norm: false}
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


class SimulatedKill(BaseException):
    """Ends the process as SIGKILL would: no except/finally of the runner gets to mark anything."""


class FakeTrainer:
    """Stands in for blueberry.train.trainer.train with the same signature and tracker calls."""

    def __init__(self, steps=6, raise_at=None, diverge=None):
        self.steps = steps
        self.raise_at = raise_at or {}  # (qk_norm, seed) -> (step, exception)
        self.diverge = diverge or set()
        self.calls = []  # (qk_norm, seed, start_step, run_dir)

    def __call__(self, cfg: RunConfig, tracker=None, run_dir=None, progress=True):
        run_dir = Path(run_dir)
        key = (cfg.model.qk_norm, cfg.train.seed)
        last = find_checkpoint(run_dir / "checkpoints" / "last")
        start = last.meta["step"] if last else 0
        self.calls.append((*key, start, run_dir))
        tracker.log_params({**flatten_params(cfg.to_dict()), "params": 1234})
        tracker.set_tags({"device": "fake cpu", "precision": "fp32"})
        model = torch.nn.Linear(2, 2)
        base = 3.0 + (0.0 if cfg.model.qk_norm else 0.2) + 0.03 * cfg.train.seed
        for step in range(start + 1, self.steps + 1):
            tokens, secs = step * 1000, step * 0.5
            tracker.log_metrics(
                {"train_loss": base + 2 / step, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_sec": 2000.0,
                 "peak_mem_mb": 10.0, "tokens_seen": tokens, "train_time_s": secs},
                step,
            )  # fmt: skip
            if step % 2 == 0:
                val = base + 1 / step
                tracker.log_metrics(
                    {"val_loss": val, "val_ppl": math.exp(val), "val_acc": 0.3, "val_bpb": val / math.log(2) / 4,
                     "tokens_seen": tokens, "train_time_s": secs, "progress": step / self.steps},
                    step,
                )  # fmt: skip
                save_checkpoint(run_dir / "checkpoints" / "last", model, cfg, {"step": step})
            if key in self.raise_at and self.raise_at[key][0] == step:
                raise self.raise_at[key][1]
        best = save_checkpoint(run_dir / "checkpoints" / "best", model, cfg, {"step": self.steps})
        val = base + 1 / self.steps
        metrics = {"val_loss": val, "val_ppl": math.exp(val), "val_acc": 0.3, "val_bpb": val / math.log(2) / 4,
                   "steps": self.steps, "wall_time_s": 4.0, "params": 1234, "params_non_embedding": 1000}  # fmt: skip
        status = "diverged" if key in self.diverge else "finished"
        return FakeResult(
            status, metrics, run_dir, best, self.steps, self.steps * 1000, self.steps * 0.5, 4.0
        )


@pytest.fixture
def store(tmp_path, monkeypatch):
    return make_store(tmp_path, monkeypatch)


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text(SPEC)
    return path


@pytest.fixture
def fake(monkeypatch):
    trainer = FakeTrainer()
    monkeypatch.setattr(ablation, "train_fn", trainer)
    return trainer


def cli(*argv) -> int:
    """Run the CLI in-process as run_ablation.py does; returns its exit code."""
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main([str(a) for a in argv]))
    return e.value.code


def child_runs(client: MlflowClient, experiment="demo"):
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id]) if "config_hash" in r.data.tags]


def parent_runs(client: MlflowClient, experiment="demo"):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string="tags.kind = 'ablation'")


def markdown_rows(text: str, section: str) -> dict[str, list[str]]:
    """The first table under a `## section` heading, as {first cell: cells}."""
    body = text.split(f"## {section}\n", 1)[1].lstrip("\n")
    rows = []
    for line in body.splitlines():
        if not line.startswith("|"):
            if rows:
                break
            continue
        rows.append(line)
    out = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0].strip("*")] = cells
    return out


# ---------------------------------------------------------------------------------------------------------
# Specs


def test_shipped_specs_are_valid_at_both_scales():
    specs = sorted((REPO / "ablations").glob("*.yaml"))
    assert {p.stem for p in specs} >= {
        "qknorm", "norm_placement", "tied_embeddings", "init", "optimizer", "scheduler", "position", "mlp",
        "blueberry_vs_gpt2",
    }  # fmt: skip
    for path in specs:
        assert path.read_text().startswith("#"), f"{path.name}: starts with a comment saying what it asks"
        for quick in (False, True):
            spec = load_spec(path, quick=quick)
            assert spec.baseline in spec.variants and len(spec.variants) >= 2
            assert spec.seeds == ((0, 1) if quick else (0, 1, 2))
            if not quick:
                assert all(v.config.budget.time == 144 for v in spec.variants.values())


def test_gpt2_variant_reproduces_the_gpt2_preset():
    spec = load_spec(REPO / "ablations" / "blueberry_vs_gpt2.yaml")
    assert (
        spec.variants["gpt2"].config.config_hash == load_config(data={"preset": "gpt2-baseline"}).config_hash
    )
    assert (
        spec.variants["blueberry"].config.config_hash
        == load_config(data={"preset": "blueberry-seed"}).config_hash
    )


def test_mlp_variants_are_param_matched():
    spec = load_spec(REPO / "ablations" / "mlp.yaml")
    assert len({param_count(v.config) for v in spec.variants.values()}) == 1


def test_config_order_is_base_then_quick_then_set_then_variant(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: order\npreset: blueberry-seed\nbudget: {tokens: 5M}\nseeds: [3]\nbaseline: a\n"
        "variants:\n  a: {}\n  b: {model.d_model: 96, budget.time: 1m}\n"
    )
    spec = load_spec(path, overrides=["model.d_model=64", "model.n_layers=3"], quick=True)
    a, b = spec.variants["a"].config, spec.variants["b"].config
    assert a.model.n_heads == 4 and a.tokenizer.vocab_size == 4096 and a.train.micro_batch == 8  # quick
    assert a.model.d_model == 64 and a.model.n_layers == 3  # --set beats quick
    assert b.model.d_model == 96 and b.model.n_layers == 3  # the variant beats --set
    assert a.budget.time == 30 and a.budget.tokens is None  # quick replaces the budget
    assert b.budget.time == 60
    assert spec.seeds == (0, 1)  # quick's seeds
    assert load_spec(path, quick=True, seeds=[7]).seeds == (7,)
    assert load_spec(path, overrides=["budget.time=5s"], quick=True).variants["a"].config.budget.time == 5


def test_run_identity_and_folder(spec_file):
    spec = load_spec(spec_file)
    runs = spec.runs()
    assert [(r.variant, r.seed) for r in runs] == [("qk_on", 0), ("qk_on", 1), ("qk_off", 0), ("qk_off", 1)]
    assert runs[0].config_hash == runs[1].config_hash != runs[2].config_hash
    assert runs[1].config.train.seed == 1
    assert runs[3].run_dir == Path("runs") / "demo" / "qk_off" / f"seed1-{runs[3].config_hash}"


BAD_SPECS = {
    "unknown key": (SPEC + "colour: blue\n", "colour: unknown key; allowed: name, description"),
    "missing baseline": (SPEC.replace("baseline: qk_on\n", ""), "baseline: missing"),
    "baseline not a variant": (SPEC.replace("baseline: qk_on", "baseline: nope"), "'nope' is not a variant"),
    "duplicate variant": (SPEC + "  qk_on: {model.n_layers: 3}\n", "variants: duplicate variant 'qk_on'"),
    "unknown override path": (
        SPEC.replace("model.qk_norm: false", "model.qk_normm: false"),
        "variants.qk_off: model.qk_normm: unknown key",
    ),
    "bad override value": (
        SPEC.replace("model.qk_norm: false", "model.norm: nope"),
        "variants.qk_off: model.norm",
    ),
    "empty variants": (
        SPEC.split("variants:")[0] + "variants: {}\n",
        "variants: expected a non-empty mapping",
    ),
    "seeds not unique": (SPEC.replace("[0, 1]", "[0, 0]"), "seeds: each seed once"),
    "identical variants": (
        SPEC.replace("model.qk_norm: false", "model.qk_norm: true"),
        "same config as variant",
    ),
    "ablation keys in a sweep": ("kind: sweep\n" + SPEC, "seeds: unknown key for a sweep"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_spec_is_one_line_exit_2_and_creates_nothing(case, tmp_path, monkeypatch, capsys, fake):
    monkeypatch.chdir(tmp_path)
    text, expected = BAD_SPECS[case]
    (tmp_path / "bad.yaml").write_text(text)
    assert cli("bad.yaml") == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and err.startswith("error: bad.yaml: ")
    assert sorted(os.listdir(tmp_path)) == ["bad.yaml"] and not fake.calls


def test_bad_cli_input_exits_2(spec_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(spec_file, "--variants", "qk_on,nope") == 2
    assert "--variants: unknown variant 'nope'" in capsys.readouterr().err
    assert cli(spec_file, "--set", "model.nope=1") == 2
    assert "--set model.nope: no such config key" in capsys.readouterr().err
    assert cli(spec_file, "--seeds", "a") == 2
    assert not (tmp_path / "mlflow.db").exists()


def test_the_script_itself_reports_bad_input_in_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text(BAD_SPECS["unknown override path"][0])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(
        [sys.executable, str(REPO / "run_ablation.py"), "bad.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "model.qk_normm: unknown key" in p.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad.yaml"]


def test_dry_run_prints_the_matrix_and_creates_no_store(spec_file, tmp_path, monkeypatch, capsys, fake):
    monkeypatch.chdir(tmp_path)
    assert cli(spec_file, "--dry-run") == 0
    out = capsys.readouterr().out
    spec = load_spec(spec_file)
    for r in spec.runs():
        assert r.config_hash in out
    assert "qk_on *" in out and "time 10s" in out and "4 runs" in out
    assert sorted(os.listdir(tmp_path)) == ["demo.yaml"] and not fake.calls


def test_unreachable_tracking_uri_fails_before_training(spec_file, tmp_path, monkeypatch, capsys, fake):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    assert cli(spec_file, "--tracking-uri", "http://127.0.0.1:9") == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: cannot reach the tracking store http://127.0.0.1:9") and err.count("\n") == 1
    )
    assert sorted(os.listdir(tmp_path)) == ["demo.yaml"] and not fake.calls


# ---------------------------------------------------------------------------------------------------------
# Running


def test_ablation_end_to_end_then_nothing_to_do(spec_file, store, fake, tmp_path, capsys):
    assert cli(spec_file, "--no-progress") == 0
    assert len(fake.calls) == 4
    client = MlflowClient(tracking_uri=store)
    children = child_runs(client)
    (parent,) = parent_runs(client)
    assert len(children) == 4
    assert parent.info.status == "FINISHED" and parent.data.tags["status"] == "finished"
    assert (
        parent.data.tags["command"].startswith("python run_ablation.py ") and "git_commit" in parent.data.tags
    )
    spec = load_spec(spec_file)
    hashes = spec.hashes()
    for run in children:
        tags = run.data.tags
        assert run.info.status == "FINISHED" and tags["status"] == "finished"
        assert tags["ablation"] == "demo" and tags["config_hash"] == hashes[tags["variant"]]
        assert tags["mlflow.parentRunId"] == parent.info.run_id and tags["seed"] in ("0", "1")
        assert (
            Path(tags["checkpoint"]).is_absolute() and find_checkpoint(Path(tags["checkpoint"])) is not None
        )
        assert {"val_loss", "val_bpb", "val_ppl", "val_acc", "tokens_seen", "train_time_s", "steps"} <= set(
            run.data.metrics
        )
        assert run.data.params["model.qk_norm"] == str(tags["variant"] == "qk_on")
        assert (Path(tags["run_dir"]) / "result.json").is_file()
        assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())

    # the report's numbers are the store's
    report = (tmp_path / "reports" / "demo.md").read_text()
    rows = markdown_rows(report, "Results")
    for variant in ("qk_on", "qk_off"):
        vals = [r.data.metrics["val_loss"] for r in children if r.data.tags["variant"] == variant]
        mean = sum(vals) / len(vals)
        assert rows[variant][1] == "2 / 0"
        assert float(rows[variant][2].split("±")[0]) == pytest.approx(mean, abs=6e-5)
    assert (tmp_path / "reports" / "demo" / "val_loss_vs_time.png").is_file()
    assert "demo/val_loss_vs_tokens.png" in report and "model.qk_norm" in report

    # a second invocation trains nothing, and --report-only rewrites the report without a new parent
    assert cli(spec_file, "--no-progress") == 0
    assert len(fake.calls) == 4 and len(child_runs(client)) == 4 and len(parent_runs(client)) == 2
    (tmp_path / "reports" / "demo.md").unlink()
    assert cli(spec_file, "--report-only") == 0
    assert (tmp_path / "reports" / "demo.md").is_file() and len(parent_runs(client)) == 2


def test_run_left_running_by_a_kill_is_resumed_in_the_same_mlflow_run(spec_file, store, monkeypatch):
    killer = FakeTrainer(raise_at={(False, 1): (4, SimulatedKill())})
    monkeypatch.setattr(ablation, "train_fn", killer)
    with pytest.raises(SimulatedKill):
        main([str(spec_file), "--no-progress"])
    client = MlflowClient(tracking_uri=store)
    (left,) = [r for r in child_runs(client) if r.info.status == "RUNNING"]
    assert left.data.tags["variant"] == "qk_off" and left.data.tags["seed"] == "1"
    (dead_parent,) = parent_runs(client)
    assert dead_parent.info.status == "RUNNING"

    again = FakeTrainer()
    monkeypatch.setattr(ablation, "train_fn", again)
    assert cli(spec_file, "--no-progress") == 0
    assert [(c[0], c[1], c[2]) for c in again.calls] == [(False, 1, 4)]  # only it, from its checkpoint
    children = child_runs(client)
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    resumed = client.get_run(left.info.run_id)
    newest_parent = max(parent_runs(client), key=lambda r: r.info.start_time)
    assert resumed.data.tags["status"] == "finished"
    assert resumed.data.tags["resumed_by"] == newest_parent.info.run_id
    assert again.calls[0][3] == Path(left.data.tags["run_dir"])
    assert client.get_run(dead_parent.info.run_id).info.status == "KILLED"


def test_ctrl_c_marks_runs_killed_exits_130_and_the_rerun_continues(spec_file, store, monkeypatch, capsys):
    stopper = FakeTrainer(raise_at={(True, 1): (3, KeyboardInterrupt())})
    monkeypatch.setattr(ablation, "train_fn", stopper)
    assert cli(spec_file, "--no-progress") == 130
    client = MlflowClient(tracking_uri=store)
    (killed,) = [r for r in child_runs(client) if r.info.status != "FINISHED"]
    assert killed.info.status == "KILLED" and killed.data.tags["status"] == "killed"
    (parent,) = parent_runs(client)
    assert parent.info.status == "KILLED" and parent.data.tags["status"] == "killed"
    assert len(stopper.calls) == 2  # the qk_off runs never started

    again = FakeTrainer()
    monkeypatch.setattr(ablation, "train_fn", again)
    assert cli(spec_file, "--no-progress") == 0
    assert [(c[0], c[1], c[2]) for c in again.calls] == [(True, 1, 2), (False, 0, 0), (False, 1, 0)]
    assert client.get_run(killed.info.run_id).info.status == "FINISHED"
    assert len(child_runs(client)) == 4


def test_a_failed_run_exits_1_after_the_others(spec_file, store, monkeypatch, capsys):
    trainer = FakeTrainer(raise_at={(False, 0): (2, RuntimeError("boom"))}, diverge={(True, 1)})
    monkeypatch.setattr(ablation, "train_fn", trainer)
    assert cli(spec_file, "--no-progress") == 1
    assert len(trainer.calls) == 4
    client = MlflowClient(tracking_uri=store)
    by_key = {(r.data.tags["variant"], r.data.tags["seed"]): r for r in child_runs(client)}
    failed = by_key[("qk_off", "0")]
    assert failed.info.status == "FAILED" and failed.data.tags["status"] == "failed"
    assert failed.data.tags["error"] == "RuntimeError: boom"
    assert "RuntimeError: boom" in (Path(failed.data.tags["run_dir"]) / "error.txt").read_text()
    diverged = by_key[("qk_on", "1")]
    assert diverged.info.status == "FINISHED" and diverged.data.tags["status"] == "diverged"
    assert by_key[("qk_off", "1")].data.tags["status"] == "finished"
    (parent,) = parent_runs(client)
    assert parent.info.status == "FAILED"
    rows = markdown_rows((Path("reports") / "demo.md").read_text(), "Results")
    assert rows["qk_on"][1] == "1 / 1" and rows["qk_off"][1] == "1 / 0"
    assert "RuntimeError: boom" in capsys.readouterr().out


def test_a_trainer_input_error_stops_with_exit_2(spec_file, store, monkeypatch, capsys):
    trainer = FakeTrainer(raise_at={(True, 0): (1, BlueberryError("data.source: no such file"))})
    monkeypatch.setattr(ablation, "train_fn", trainer)
    assert cli(spec_file, "--no-progress") == 2
    assert "error: qk_on seed 0: data.source: no such file" in capsys.readouterr().err
    (run,) = child_runs(MlflowClient(tracking_uri=store))
    assert run.info.status == "FAILED" and len(trainer.calls) == 1


def test_variants_and_seeds_select_runs_and_the_report_covers_the_store(spec_file, store, fake):
    assert cli(spec_file, "--variants", "qk_off", "--seeds", "5", "--no-progress", "--experiment", "sel") == 0
    assert [(c[0], c[1]) for c in fake.calls] == [(False, 5)]
    client = MlflowClient(tracking_uri=store)
    (run,) = child_runs(client, "sel")
    assert run.data.tags["seed"] == "5"
    rows = markdown_rows(Path("reports/demo.md").read_text(), "Results")
    assert rows["qk_on"][1] == "0 / 0" and rows["qk_off"][1] == "1 / 0"


def test_store_outage_during_training_is_buffered_and_delivered(spec_file, store, monkeypatch):
    from tests.test_track import FlakyClient

    inner = FakeTrainer()

    def train_while_store_is_away(cfg, tracker=None, run_dir=None, progress=True):
        real = tracker.client
        tracker.client = flaky = FlakyClient(real)  # the server goes away as training starts...
        result = inner(cfg, tracker=tracker, run_dir=run_dir)
        assert (Path(run_dir) / "tracking_buffer.jsonl").is_file() and flaky.failures
        flaky.up = True  # ...and is back by the end of the run
        return result

    monkeypatch.setattr(ablation, "train_fn", train_while_store_is_away)
    assert cli(spec_file, "--variants", "qk_on", "--seeds", "0", "--no-progress") == 0
    (run,) = child_runs(MlflowClient(tracking_uri=store))
    assert run.info.status == "FINISHED" and run.data.params["model.qk_norm"] == "True"
    assert len(MlflowClient(tracking_uri=store).get_metric_history(run.info.run_id, "val_loss")) == 3
    assert not (Path(run.data.tags["run_dir"]) / "tracking_buffer.jsonl").exists()


def test_store_failing_between_runs_is_one_line_exit_2(spec_file, store, monkeypatch, fake, capsys):
    from mlflow.exceptions import MlflowException

    real, calls = ablation.find_runs, []

    def find_runs_then_fail(*args):
        calls.append(args)
        if len(calls) > 2:  # after the first run's two look-ups
            raise MlflowException("API request failed: [Errno 111] Connection refused")
        return real(*args)

    monkeypatch.setattr(ablation, "find_runs", find_runs_then_fail)
    assert cli(spec_file, "--no-progress") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "error: tracking store failed while looking up earlier runs: [Errno 111] Connection refused; "
        "run the same command again to continue"
    )
    assert len(fake.calls) == 1


# ---------------------------------------------------------------------------------------------------------
# torchrun and a real tracking server


FAKE_LAUNCH = """\
# What blueberry.train.launch does, for the tests: rank 0 trains (fake) into the given run, writes result.json.
import argparse, os, sys

p = argparse.ArgumentParser()
for flag in ("--config", "--run-dir", "--tracking-uri", "--run-id"):
    p.add_argument(flag, required=True)
p.add_argument("--no-progress", action="store_true")
args = p.parse_args()
if int(os.environ["RANK"]) == 0:
    from blueberry import ablation
    from blueberry.config import load_config
    from blueberry.track import MLflowTracker
    from tests.test_ablation import FakeTrainer

    tracker = MLflowTracker.attach(args.tracking_uri, args.run_id, args.run_dir)
    result = FakeTrainer()(load_config(args.config), tracker=tracker, run_dir=args.run_dir)
    tracker.close()
    ablation.write_result(result, args.run_dir)
"""


def test_nproc_per_node_trains_each_run_under_torchrun(spec_file, store, monkeypatch, fake, tmp_path):
    (tmp_path / "fake_launch.py").write_text(FAKE_LAUNCH)
    monkeypatch.setattr(ablation, "LAUNCH_MODULE", "fake_launch")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{REPO}")
    assert (
        cli(spec_file, "--variants", "qk_on", "--seeds", "0", "--nproc-per-node", "2", "--no-progress") == 0
    )
    assert not fake.calls  # not in-process
    (run,) = child_runs(MlflowClient(tracking_uri=store))
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
    assert "val_bpb" in run.data.metrics and run.data.params["model.qk_norm"] == "True"
    assert Path(run.data.tags["checkpoint"]).is_dir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` process on a free local port (its own process group, so it can be killed)."""

    def __init__(self, root: Path):
        shutil.copyfile(_template_db(), root / "srv.db")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "server.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'srv.db'}",
             "--default-artifact-root", str(root / "art")],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self.url
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 2), (signal.SIGKILL, None)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.close()


@pytest.fixture(scope="module", autouse=True)
def _early_server(request, tmp_path_factory):
    """Boot the server for the real-server test as soon as this module starts, so its slow start-up
    overlaps the other tests; it is stopped when the module ends, however the tests end."""
    if not any(item.name == "test_against_a_real_tracking_server" for item in request.session.items):
        yield None
        return
    server = MlflowServer(tmp_path_factory.mktemp("server"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_server(_early_server):
    return _early_server.wait_ready()


@pytest.mark.slow
def test_against_a_real_tracking_server(spec_file, mlflow_server, tmp_path, monkeypatch, fake):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = cli(
        spec_file, "--tracking-uri", mlflow_server, "--variants", "qk_on", "--seeds", "0", "--no-progress"
    )
    assert code == 0 and len(fake.calls) == 1
    client = MlflowClient(tracking_uri=mlflow_server)
    (run,) = child_runs(client)
    assert run.info.status == "FINISHED" and run.data.metrics["val_loss"] > 0
    assert client.list_artifacts(parent_runs(client)[0].info.run_id)  # spec, configs and report
    report = (tmp_path / "reports" / "demo.md").read_text()
    assert markdown_rows(report, "Results")["qk_on"][1] == "1 / 0"
    assert not (tmp_path / "mlflow.db").exists()
    assert resolve_tracking_uri(mlflow_server) == mlflow_server
