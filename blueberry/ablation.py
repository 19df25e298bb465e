"""Ablations: train every (variant, seed) of a spec under one budget, track it in MLflow, report on it.

A spec is YAML: the usual RunConfig content (`preset:`/`base:`/sections) is the shared base, `variants:`
maps each variant name to dotted overrides, `seeds:` lists the seeds every variant runs with, and
`baseline:` names the variant the others are compared with. The config of one run is built in this
order, later steps winning:

    spec base  ->  --quick (tiny sizes)  ->  --set  ->  the variant's overrides  ->  train.seed

so `--quick` and `--set` change what all variants share while each variant still toggles its own axis.

A run is identified by (config_hash, seed), recorded as tags on its MLflow run. Re-running a spec skips
identities that already have a finished run and resumes interrupted ones in place (same MLflow run, same
run folder, the trainer continuing from its last checkpoint), so the same command completes an
ablation after a crash or Ctrl-C and no identity ever gets two finished runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel
from rich.console import Console

from blueberry.config import (
    PRESET_DIR,
    RunConfig,
    build_config,
    check_paths_exist,
    deep_merge,
    dump_yaml,
    expand_dotted,
    parse_overrides,
    read_yaml,
    resolve_raw,
)
from blueberry.errors import BlueberryError, ConfigError

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from blueberry.sweep import SweepSpec
    from blueberry.track import MLflowTracker

SPEC_KEYS = ("name", "description", "kind", "seeds", "baseline", "variants")
CONFIG_KEYS = ("preset", "base", *RunConfig.model_fields)
SPEC_KINDS = ("ablation", "sweep")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

QUICK_SEEDS = (0, 1)
QUICK_BUDGET = "30s"
QUICK_VOCAB = 4096

LAUNCH_MODULE = "blueberry.train.launch"  # run under torchrun for --nproc-per-node > 1
RESULT_FILE = "result.json"
ERROR_FILE = "error.txt"
LOCK_FILE = ".lock"

# What the trainer logs at its steps (the Tracker contract); anything else in RunResult.metrics is final-only.
STEP_METRICS = frozenset(
    ("val_loss", "val_ppl", "val_acc", "val_bpb", "tokens_seen", "train_time_s", "progress", "train_loss", "lr",
     "grad_norm", "tokens_per_sec", "mfu", "peak_mem_mb")
)  # fmt: skip

# Tag values of `status` on child runs, and the MLflow run status each one ends with.
STATUS_TO_MLFLOW = {"finished": "FINISHED", "diverged": "FINISHED", "failed": "FAILED", "killed": "KILLED"}


def train_fn(cfg: RunConfig, tracker: Any = None, run_dir: str | Path | None = None, progress: bool = True):
    """The trainer, imported only when a run starts, so spec checks and --dry-run never load it."""
    from blueberry.train.trainer import train

    return train(cfg, tracker=tracker, run_dir=run_dir, progress=progress)


# ---------------------------------------------------------------------------------------------------------
# The spec


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]  # as written in the spec (dotted or nested)
    config: RunConfig  # the full config, train.seed not yet set


@dataclass(frozen=True)
class PlannedRun:
    """One (variant, seed): its config, identity and folder."""

    ablation: str
    variant: str
    seed: int
    config: RunConfig

    @property
    def config_hash(self) -> str:
        return self.config.config_hash

    @property
    def run_dir(self) -> Path:
        return (
            Path(self.config.train.out_dir)
            / self.ablation
            / self.variant
            / f"seed{self.seed}-{self.config_hash}"
        )


@dataclass(frozen=True)
class AblationSpec:
    name: str
    path: Path
    seeds: tuple[int, ...]
    baseline: str
    variants: dict[str, Variant]  # every variant of the spec, in spec order
    selected: tuple[str, ...]  # the ones this invocation runs (--variants)
    description: str = ""
    kind: str = "ablation"
    quick: bool = False

    def runs(self) -> list[PlannedRun]:
        """The run matrix, variant-major: every selected variant with every seed."""
        out = []
        for name in self.selected:
            base = self.variants[name].config
            for seed in self.seeds:
                cfg = base.model_copy(update={"train": base.train.model_copy(update={"seed": seed})})
                out.append(PlannedRun(self.name, name, seed, cfg))
        return out

    def hashes(self) -> dict[str, str]:
        """variant -> config_hash, for picking this spec's runs out of the tracking store."""
        return {n: v.config.config_hash for n, v in self.variants.items()}


def read_spec_yaml(path: Path) -> dict[str, Any]:
    """Parse a spec, refusing duplicate mapping keys, which plain YAML would silently overwrite."""
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    loader = yaml.SafeLoader(path.read_text())
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        _check_duplicate_keys(node, path, ())
        data = loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _check_duplicate_keys(node: yaml.Node, path: Path, at: tuple[str, ...]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key != "<<":
                line = key_node.start_mark.line + 1
                if key in seen:
                    what = "duplicate variant" if at == ("variants",) else "duplicate key"
                    where = ".".join(at) or "top level"
                    raise ConfigError(f"{path}: {where}: {what} {key!r} (lines {seen[key]} and {line})")
                seen[key] = line
            _check_duplicate_keys(value_node, path, (*at, key or "?"))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicate_keys(item, path, (*at, str(i)))


def _check_override_paths(
    over: Mapping[str, Any], where: str, model: type[BaseModel] = RunConfig, prefix: str = ""
):
    """A variant override must name an existing RunConfig field: a typo is an error, never a new key."""
    for k, v in over.items():
        key = f"{prefix}{k}"
        if k not in model.model_fields:
            allowed = ", ".join(sorted(model.model_fields))
            raise ConfigError(
                f"{where}: {key}: unknown key; allowed under {prefix[:-1] or 'top level'}: {allowed}"
            )
        ann = model.model_fields[k].annotation
        if isinstance(v, Mapping) and isinstance(ann, type) and issubclass(ann, BaseModel):
            _check_override_paths(v, where, ann, f"{key}.")


def quick_overrides() -> dict[str, Any]:
    """The CPU scale: the tiny preset's own model/train/eval sizes and a 4096-token vocabulary.

    Only tiny's own keys are taken (not the seed recipe it inherits), so a spec based on another
    recipe keeps its architecture and just shrinks.
    """
    tiny = read_yaml(PRESET_DIR / "tiny.yaml")
    out = {k: tiny[k] for k in ("model", "train", "eval") if k in tiny}
    out["tokenizer"] = {"vocab_size": QUICK_VOCAB}
    return out


def _seed_list(value: Any, where: str) -> tuple[int, ...]:
    ok = (
        isinstance(value, list)
        and value
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)
    )
    if not ok:
        raise ConfigError(
            f"{where}: seeds: expected a non-empty list of non-negative integers, got {value!r}"
        )
    dup = sorted({s for s in value if value.count(s) > 1})
    if dup:
        raise ConfigError(f"{where}: seeds: each seed once, got {dup[0]} more than once")
    return tuple(value)


def load_spec(
    path: str | Path,
    overrides: Sequence[str] = (),
    quick: bool = False,
    variants: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> AblationSpec | SweepSpec:
    """Read and fully validate a spec: every variant's config is built, so bad input fails before training."""
    path = Path(path)
    data = read_spec_yaml(path)
    kind = data.get("kind", "ablation")
    if kind == "sweep":  # an Optuna search instead of a fixed matrix: blueberry/sweep.py
        from blueberry.sweep import parse_sweep

        if variants:
            raise ConfigError("--variants: a sweep has no variants")
        return parse_sweep(data, path, overrides, quick, seeds)
    if kind != "ablation":
        raise ConfigError(f"{path}: kind: unknown kind {kind!r}; allowed: {', '.join(SPEC_KINDS)}")
    return _parse_ablation(data, path, overrides, quick, variants, seeds)


def spec_header(
    data: Mapping[str, Any], where: str, spec_keys: Sequence[str], unknown_msg: str
) -> tuple[str, str]:
    """Checks every spec kind shares: no unknown top-level key, a valid `name`, a text `description`."""
    unknown = [k for k in data if k not in spec_keys and k not in CONFIG_KEYS]
    if unknown:
        raise ConfigError(
            f"{where}: {unknown[0]}: {unknown_msg}; allowed: {', '.join(spec_keys)} "
            f"and the config keys {', '.join(CONFIG_KEYS)}"
        )
    name = data.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{where}: name: expected a name of letters, digits, '_', '-' or '.', got {name!r}")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise ConfigError(f"{where}: description: expected text, got {description!r}")
    return name, description


def _parse_ablation(
    data: dict[str, Any],
    path: Path,
    overrides: Sequence[str],
    quick: bool,
    only: Sequence[str] | None,
    seeds_override: Sequence[int] | None,
) -> AblationSpec:
    where = str(path)
    name, description = spec_header(data, where, SPEC_KEYS, "unknown key")
    if "seeds" not in data:
        raise ConfigError(f"{where}: seeds: missing; e.g. seeds: [0, 1, 2]")
    seeds = _seed_list(data["seeds"], where)

    raw_variants = data.get("variants")
    if not isinstance(raw_variants, dict) or not raw_variants:
        raise ConfigError(f"{where}: variants: expected a non-empty mapping of variant name -> overrides")
    baseline = data.get("baseline")
    if baseline is None:
        raise ConfigError(
            f"{where}: baseline: missing; name one of the variants: {', '.join(map(str, raw_variants))}"
        )
    if baseline not in raw_variants:
        raise ConfigError(
            f"{where}: baseline: {baseline!r} is not a variant; variants: {', '.join(map(str, raw_variants))}"
        )

    base = resolve_raw({k: v for k, v in data.items() if k in CONFIG_KEYS}, path.resolve())
    if quick:
        base = deep_merge(base, quick_overrides())
        base["budget"] = {"time": QUICK_BUDGET}
    cli = parse_overrides(overrides)
    check_paths_exist(cli)
    base = deep_merge(base, cli)

    variants: dict[str, Variant] = {}
    by_hash: dict[str, str] = {}
    for vname, over in raw_variants.items():
        vwhere = f"{where}: variants.{vname}"
        if not isinstance(vname, str) or not _NAME_RE.match(vname):
            raise ConfigError(
                f"{where}: variants: {vname!r}: a variant name is letters, digits, '_', '-' or '.'"
            )
        if over is None:
            over = {}
        if not isinstance(over, dict):
            raise ConfigError(
                f"{vwhere}: expected a mapping of dotted overrides, e.g. {{model.qk_norm: false}}"
            )
        try:
            nested = expand_dotted(over)
        except ConfigError as e:
            raise ConfigError(f"{vwhere}: {e}") from None
        _check_override_paths(nested, vwhere)
        cfg = build_config(deep_merge(base, nested), vwhere)
        h = cfg.config_hash
        if h in by_hash:
            raise ConfigError(
                f"{vwhere}: resolves to the same config as variant {by_hash[h]!r} (hash {h}); variants must differ"
            )
        by_hash[h] = vname
        variants[vname] = Variant(vname, dict(over), cfg)
    if "budget" not in base and not any("budget" in expand_dotted(v.overrides) for v in variants.values()):
        raise ConfigError(  # else every variant would silently get RunConfig's default budget
            f"{where}: budget: missing; an ablation compares variants under one fixed budget: set budget.time, "
            "budget.tokens, budget.steps or budget.flops (e.g. budget: {time: 2m24s}), or start from a preset"
        )

    if only:
        missing = [v for v in only if v not in variants]
        if missing:
            raise ConfigError(f"--variants: unknown variant {missing[0]!r}; variants: {', '.join(variants)}")
        selected = tuple(dict.fromkeys(only))
    else:
        selected = tuple(variants)
    if seeds_override:
        seeds = _seed_list(list(seeds_override), "--seeds")
    elif quick:
        seeds = QUICK_SEEDS
    return AblationSpec(name, path, seeds, baseline, variants, selected, description, "ablation", quick)


# ---------------------------------------------------------------------------------------------------------
# Running


@dataclass
class Outcome:
    """What became of one planned run in this invocation."""

    variant: str
    seed: int
    status: str  # finished | diverged | failed | skipped | busy
    run_id: str | None = None
    detail: str = ""


@dataclass
class TrainResult:
    """RunResult as read back from result.json (the torchrun path), or normalised from the trainer's."""

    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    run_dir: str = ""
    checkpoint: str | None = None
    steps: int = 0
    tokens_seen: int = 0
    train_time_s: float = 0.0
    wall_time_s: float = 0.0

    @classmethod
    def of(cls, result: Any) -> TrainResult:
        d = asdict(result) if is_dataclass(result) else dict(result)
        known = {k: d.get(k) for k in cls.__dataclass_fields__ if k in d}
        for k in ("run_dir", "checkpoint"):
            if known.get(k) is not None:
                known[k] = str(known[k])
        known["metrics"] = {k: float(v) for k, v in (known.get("metrics") or {}).items() if v is not None}
        return cls(**known)


def write_result(result: Any, run_dir: str | Path) -> Path:
    """run_dir/result.json: the run's outcome, readable without the tracking store (and by the runner
    when the run was a torchrun subprocess)."""
    from blueberry.checkpoint import atomic_write_text

    path = Path(run_dir) / RESULT_FILE
    atomic_write_text(path, json.dumps(asdict(TrainResult.of(result)), indent=1))
    return path


def read_result(run_dir: str | Path) -> TrainResult:
    path = Path(run_dir) / RESULT_FILE
    try:
        return TrainResult.of(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise RuntimeError(f"the training process left no readable {path}: {e}") from None


class _RunLock:
    """A pid file in the run folder, so two invocations never train the same run folder at once."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self.held = False

    def holder(self) -> int | None:
        try:
            host, pid_text = self.path.read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            return None
        if host != socket.gethostname() or pid == os.getpid():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def acquire(self) -> bool:
        if self.holder() is not None:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"{socket.gethostname()} {os.getpid()}\n")
        self.held = True
        return True

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


@contextmanager
def store_errors(what: str) -> Iterator[None]:
    """The store failing between runs ends the invocation with one line; rerunning continues it."""
    try:
        yield
    except Exception as e:
        from mlflow.exceptions import MlflowException
        from requests.exceptions import RequestException

        from blueberry.track import TrackingError, short_reason

        if isinstance(e, MlflowException | RequestException):
            raise TrackingError(
                f"tracking store failed while {what}: {short_reason(e)}; run the same command again to continue"
            ) from None
        raise


def find_runs(client: MlflowClient, experiment_id: str, config_hash: str, seed: int) -> list:
    """Child runs of this identity, newest first."""
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.config_hash = '{config_hash}' and tags.seed = '{seed}'",
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )


class AblationRunner:
    """Executes the run matrix of one spec against one MLflow experiment."""

    # With --worker: a blueberry.workers.RunQueue, whose run_all claims runs from a shared database
    # instead of walking the matrix in order.
    queue: Any = None

    def __init__(
        self,
        spec: AblationSpec,
        client: MlflowClient,
        experiment_id: str,
        tracking_uri: str,
        command: str = "",
        nproc_per_node: int = 1,
        train: Callable[..., Any] | None = None,
        progress: bool = True,
        reports_dir: str | Path = "reports",
    ):
        self.spec = spec
        self.client = client
        self.experiment_id = experiment_id
        self.uri = tracking_uri
        self.command = command
        self.nproc = nproc_per_node
        self.train = train
        self.progress = progress
        self.reports_dir = Path(reports_dir)
        self.parent: MLflowTracker | None = None

    # -- the whole invocation

    def run(self) -> int:
        """Train what is missing, then write the report. Returns the exit code (0 ok, 1 a run failed)."""
        from blueberry.track import MLflowTracker

        console = Console()
        planned = self.spec.runs()
        self._replay_leftovers(planned)
        with store_errors("creating the parent run"):
            parent = self._create_parent()
        self.parent = MLflowTracker(
            self.client, parent.info.run_id, self._out_root() / "tracking_buffer-parent.jsonl"
        )
        outcomes: list[Outcome] = []
        try:
            self._log_parent_inputs()
            if self.queue is not None:
                outcomes = self.queue.run_all(self, planned, console)
            else:
                outcomes = self._run_all(planned, console)
            failed = [o for o in outcomes if o.status == "failed"]
            with store_errors("reading runs for the report"):
                report = self.write_report()
            self.parent.log_artifact(report)
            figures = report.parent / self.spec.name
            if figures.is_dir():
                for png in sorted(figures.glob("*.png")):
                    self.parent.log_artifact(png, "report")
        except KeyboardInterrupt:
            self._end_parent("killed")
            raise
        except Exception:
            self._end_parent("failed")
            raise
        self._end_parent("failed" if failed else "finished")
        console.print(
            f"[bold]{self.spec.name}[/]: "
            + ", ".join(
                f"{sum(o.status == s for o in outcomes)} {s}"
                for s in ("finished", "diverged", "skipped", "failed", "busy")
                if any(o.status == s for o in outcomes)
            )
            + f"; report: {report}"
        )
        return 1 if failed else 0

    def _create_parent(self):
        """The run of this invocation; the (variant, seed) runs are its children."""
        from blueberry.runinfo import run_info

        return self.client.create_run(
            self.experiment_id,
            run_name=f"{self.spec.name}{'-quick' if self.spec.quick else ''}",
            tags={
                **run_info(),
                "ablation": self.spec.name,
                "kind": "ablation",
                "status": "running",
                "command": self.command,
                "spec": str(self.spec.path),
                "quick": str(self.spec.quick).lower(),
                "mlflow.note.content": self.spec.description,
            },
        )

    def _out_root(self) -> Path:
        return Path(self.spec.variants[self.spec.baseline].config.train.out_dir) / self.spec.name

    def _end_parent(self, status: str) -> None:
        if self.parent is not None:
            self.parent.set_tags({"status": status})
            self.parent.close(STATUS_TO_MLFLOW[status])

    def _log_parent_inputs(self) -> None:
        assert self.parent is not None
        spec = self.spec
        self.parent.log_params(
            {
                "seeds": json.dumps(list(spec.seeds)),
                "baseline": spec.baseline,
                "variants": json.dumps(list(spec.selected)),
            }
        )
        try:
            self.parent.log_text(spec.path.read_text(), "spec.yaml")
        except OSError:
            pass
        for name in spec.selected:
            self.parent.log_text(dump_yaml(spec.variants[name].config), f"configs/{name}.yaml")

    def _replay_leftovers(self, planned: list[PlannedRun]) -> None:
        """Deliver tracking buffers an earlier invocation could not (so its final statuses count)."""
        from blueberry.track import BUFFER_FILE, replay_buffer

        buffers = [p.run_dir / BUFFER_FILE for p in planned] + [
            self._out_root() / "tracking_buffer-parent.jsonl"
        ]
        for buf in buffers:
            if buf.is_file():
                ok, n = replay_buffer(buf, self.client)
                print(
                    f"tracking: delivered {n} records left in {buf}" + ("" if ok else " (some remain)"),
                    file=sys.stderr,
                )

    def _run_all(self, planned: list[PlannedRun], console) -> list[Outcome]:
        """Each run in turn, an overall bar line before each (a static line, not a live display, so the
        trainer's own live bar never fights it for the terminal)."""
        status_console = Console(stderr=True)
        start = time.monotonic()
        outcomes = []
        for i, pr in enumerate(planned):
            if self.progress:
                status_console.print(self._overall_bar(i, len(planned), pr, time.monotonic() - start))
            o = self._run_one(pr)
            outcomes.append(o)
            style = {"finished": "green", "diverged": "yellow", "failed": "red"}.get(o.status, "dim")
            console.print(f"[{style}]{o.status:>8}[/] {pr.variant} seed {pr.seed}  {o.detail}".rstrip())
        return outcomes

    def _overall_bar(self, done: int, total: int, pr: PlannedRun, elapsed: float):
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        from blueberry.report import fmt_duration

        row = Table.grid(padding=(0, 1))
        row.add_row(
            f"[bold]{self.spec.name}[/]",
            ProgressBar(total=total, completed=done, width=20),
            f"{done}/{total} runs · {fmt_duration(elapsed)} · next: [bold]{pr.variant}[/] seed {pr.seed}",
        )
        return row

    # -- one (variant, seed)

    def _run_one(self, pr: PlannedRun) -> Outcome:
        with store_errors("looking up earlier runs"):
            existing = find_runs(self.client, self.experiment_id, pr.config_hash, pr.seed)
        if skip := self._finished(pr, existing):
            return skip
        lock = _RunLock(pr.run_dir)
        if not lock.acquire():
            return Outcome(pr.variant, pr.seed, "busy", None, f"(being trained by pid {lock.holder()})")
        try:
            with store_errors("looking up earlier runs"):  # again: another process may just have finished it
                existing = find_runs(self.client, self.experiment_id, pr.config_hash, pr.seed)
            if skip := self._finished(pr, existing):
                return skip
            with store_errors("starting the MLflow run"):
                run_id, run_dir = self._open_child(pr, existing)
            return self._train(pr, run_id, run_dir)
        finally:
            lock.release()

    @staticmethod
    def _finished(pr: PlannedRun, existing: list) -> Outcome | None:
        done = [r for r in existing if r.info.status == "FINISHED"]
        if not done:
            return None
        return Outcome(
            pr.variant, pr.seed, "skipped", done[0].info.run_id, f"(done in run {done[0].info.run_id})"
        )

    def _open_child(self, pr: PlannedRun, existing: list) -> tuple[str, Path]:
        """A new child run, or the newest interrupted one (RUNNING after a SIGKILL, KILLED, FAILED) to
        continue in place: same MLflow run, same folder, so the trainer resumes from its checkpoint."""
        from blueberry.runinfo import run_info

        assert self.parent is not None
        if existing:
            old = existing[0]
            run_id = old.info.run_id
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, "resumed_by", self.parent.run_id)
            self.client.set_tag(run_id, "status", "running")
            if old.info.status == "RUNNING":
                self._close_dead_parent(old.data.tags.get("mlflow.parentRunId"))
            return run_id, Path(old.data.tags.get("run_dir") or pr.run_dir.resolve())
        run_dir = pr.run_dir.resolve()
        tags = {
            **run_info(),
            "ablation": self.spec.name,
            "variant": pr.variant,
            "seed": str(pr.seed),
            "config_hash": pr.config_hash,
            "status": "running",
            "mlflow.parentRunId": self.parent.run_id,
            "run_dir": str(run_dir),
        }
        run = self.client.create_run(self.experiment_id, run_name=f"{pr.variant}-seed{pr.seed}", tags=tags)
        return run.info.run_id, run_dir

    def _train(self, pr: PlannedRun, run_id: str, run_dir: Path) -> Outcome:
        from blueberry.track import BUFFER_FILE, MLflowTracker

        run_dir.mkdir(parents=True, exist_ok=True)
        tracker = MLflowTracker(self.client, run_id, run_dir / BUFFER_FILE, retry_interval=60.0)
        try:
            if self.nproc > 1:
                result = self._launch(pr, run_dir, run_id, tracker)
            else:
                train = self.train or train_fn
                result = TrainResult.of(
                    train(pr.config, tracker=tracker, run_dir=run_dir, progress=self.progress)
                )
        except KeyboardInterrupt:
            tracker.set_tags({"status": "killed"})
            tracker.close("KILLED")
            raise
        except BlueberryError as e:
            tracker.set_tags({"status": "failed", "error": str(e)})
            tracker.close("FAILED")
            raise BlueberryError(f"{pr.variant} seed {pr.seed}: {e}") from None
        except Exception as e:  # noqa: BLE001 - one failed run must not stop the ablation
            msg = f"{type(e).__name__}: {e}".splitlines()[0]
            tb = traceback.format_exc()
            from blueberry.checkpoint import atomic_write_text

            atomic_write_text(run_dir / ERROR_FILE, tb)
            tracker.log_text(tb, ERROR_FILE)
            tracker.set_tags({"status": "failed", "error": msg})
            tracker.close("FAILED")
            return Outcome(
                pr.variant, pr.seed, "failed", run_id, f"{msg} (traceback: {run_dir / ERROR_FILE})"
            )

        status = result.status if result.status in ("finished", "diverged") else "failed"
        if self.nproc <= 1:
            write_result(result, run_dir)
        self._log_final(tracker, result)
        ckpt = str(Path(result.checkpoint).resolve()) if result.checkpoint else ""
        tracker.set_tags({"status": status, "checkpoint": ckpt})
        tracker.close(STATUS_TO_MLFLOW[status])
        detail = "  ".join(
            f"{k} {result.metrics[k]:.4f}" for k in ("val_loss", "val_bpb") if k in result.metrics
        )
        return Outcome(pr.variant, pr.seed, status, run_id, detail)

    def _close_dead_parent(self, parent_id: str | None) -> None:
        """A child left RUNNING whose folder nobody holds was orphaned by a killed invocation: that
        invocation's parent run is marked KILLED too, so the UI does not show it running forever."""
        if not parent_id or self.parent is None or parent_id == self.parent.run_id:
            return
        try:
            if self.client.get_run(parent_id).info.status == "RUNNING":
                self.client.set_tag(parent_id, "status", "killed")
                self.client.set_terminated(parent_id, "KILLED")
        except Exception:  # noqa: BLE001 - tidying only
            pass

    def _log_final(self, tracker: MLflowTracker, result: TrainResult) -> None:
        """Final-only numbers (steps, wall time, params) go on the run too; what the trainer logs per step
        is not logged again, so histories keep one point per step."""
        final = {k: v for k, v in result.metrics.items() if k not in STEP_METRICS}
        final.setdefault("steps", float(result.steps))
        final.setdefault("wall_time_s", float(result.wall_time_s))
        tracker.log_metrics(final, step=int(result.steps))

    def _launch(self, pr: PlannedRun, run_dir: Path, run_id: str, tracker: MLflowTracker) -> TrainResult:
        """Train under torchrun; rank 0 of blueberry.train.launch logs to `run_id` and writes result.json."""
        from blueberry.checkpoint import atomic_write_text

        tracker.flush()  # the subprocess appends to the same buffer file: hand it over empty
        cfg_path = run_dir / "config.yaml"
        atomic_write_text(cfg_path, dump_yaml(pr.config))
        (run_dir / RESULT_FILE).unlink(missing_ok=True)
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.nproc}",
            "-m", LAUNCH_MODULE,
            "--config", str(cfg_path), "--run-dir", str(run_dir), "--tracking-uri", self.uri, "--run-id", run_id,
        ] + ([] if self.progress else ["--no-progress"])  # fmt: skip
        proc = subprocess.Popen(cmd)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:  # torchrun got the same SIGINT; let it keep its last checkpoint and exit
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait()
            raise
        if rc in (130, -signal.SIGINT):
            raise KeyboardInterrupt
        if rc != 0:
            raise RuntimeError(f"torchrun exited with code {rc} (its output is above)")
        return read_result(run_dir)

    # -- the report

    def write_report(self) -> Path:
        from blueberry.report import ReportScope, write_report

        return write_report(self.client, self.experiment_id, ReportScope.of(self.spec), self.reports_dir)


# ---------------------------------------------------------------------------------------------------------
# The command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_ablation.py",
        description="Train every variant x seed of an ablation spec under one budget, track it in MLflow "
        "and write a statistical report to reports/<name>.md.",
        epilog="Config order: spec base, then --quick, then --set, then each variant's overrides. "
        "Try it without a GPU: python run_ablation.py ablations/qknorm.yaml --quick",
    )
    p.add_argument("spec", type=Path, help="an ablation spec (YAML), e.g. ablations/qknorm.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key for every variant (applied before the variants' overrides)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="CPU scale: tiny model, vocab 4096, budget 30s, seeds 0,1 (about 5 min for 2 variants)",
    )
    p.add_argument("--variants", default=None, help="comma-separated variants to run (default: all)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the spec's)")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the spec's name)")
    p.add_argument(
        "--dry-run", action="store_true", help="print the run matrix; train nothing, track nothing"
    )
    p.add_argument(
        "--report-only", action="store_true", help="only (re)write the report from the tracking store"
    )
    p.add_argument("--reports-dir", default="reports", help="where reports go (default: reports)")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        help="train each run with torchrun on N processes (default 1: in this process)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna storage of sweeps and of --worker queues, e.g. postgresql://user@host/db "
        "(default: sqlite:///optuna.db in the working directory)",
    )
    p.add_argument(
        "--worker",
        action="store_true",
        help="run as one of many workers (any number of machines, one --storage): claim runs/trials from the "
        "shared database until none are left; a dead worker's run is re-queued",
    )
    p.add_argument(
        "--heartbeat",
        type=int,
        default=20,
        metavar="SECONDS",
        help="seconds between a worker's heartbeats; a run silent for 3x this is re-queued (default 20)",
    )
    return p  # fmt: skip


def _csv(text: str | None, what: str, cast: Callable[[str], Any] = str) -> list | None:
    if text is None:
        return None
    items = [s.strip() for s in text.split(",") if s.strip()]
    try:
        out = [cast(s) for s in items]
    except ValueError:
        raise ConfigError(f"{what}: expected a comma-separated list, got {text!r}") from None
    if not out:
        raise ConfigError(f"{what}: empty list")
    return out


def format_budget(cfg: RunConfig) -> str:
    from blueberry.report import human

    b = cfg.budget
    parts = []
    if b.time is not None:
        m, s = divmod(round(b.time), 60)
        parts.append(f"time {m}m{s:02d}s" if m else f"time {s}s")
    for k in ("tokens", "steps", "flops"):
        v = getattr(b, k)
        if v is not None:
            parts.append(f"{k} {human(v)}")
    return ", ".join(parts)


def param_count(cfg: RunConfig) -> int:
    """Parameters from the config alone (vocab from the tokenizer when the model leaves it open)."""
    from blueberry.model import analytic_param_count

    model = cfg.model
    if model.vocab_size is None:
        model = model.model_copy(update={"vocab_size": cfg.tokenizer.vocab_size})
    return analytic_param_count(model)


def print_matrix(spec: AblationSpec) -> None:
    from rich.table import Table

    from blueberry.report import human

    runs = spec.runs()
    table = Table(
        title=f"{spec.name}: {len(spec.selected)} variants x {len(spec.seeds)} seeds = {len(runs)} runs",
        caption=f"* baseline; run folders: {Path(runs[0].config.train.out_dir) / spec.name}/<variant>/seed<seed>-<hash>",
    )
    for col in ("variant", "seed", "config hash", "params", "budget"):
        table.add_column(col, justify="right" if col in ("seed", "params") else "left", no_wrap=True)
    for r in runs:
        label = f"{r.variant} *" if r.variant == spec.baseline else r.variant
        table.add_row(
            label, str(r.seed), r.config_hash, human(param_count(r.config)), format_budget(r.config)
        )
    console = Console()
    console.print(table)
    console.print("dry run: nothing trained, no MLflow run created")


def check_inputs(spec: AblationSpec) -> None:
    """The data side of every selected variant (source, tokenizer, validation window), checked before anything
    is tracked or cached, so a missing corpus is one line rather than a FAILED run in a new store."""
    from blueberry.data.cache import check_inputs as check_data

    seen = set()
    for name in spec.selected:
        cfg = spec.variants[name].config
        key = json.dumps([cfg.data.model_dump(mode="json"), cfg.tokenizer.model_dump(mode="json"),
                          cfg.model.vocab_size, cfg.model.seq_len, cfg.eval.val_tokens])  # fmt: skip
        if key not in seen:
            seen.add(key)
            try:
                check_data(cfg)
            except BlueberryError as e:
                raise type(e)(f"{spec.path}: variants.{name}: {e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """`run_ablation.py`. Exit codes: 0 ok (diverged runs are results), 1 a run failed, 2 bad input, 130 Ctrl-C."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node: must be at least 1, got {args.nproc_per_node}")
    spec = load_spec(
        args.spec,
        overrides=args.overrides,
        quick=args.quick,
        variants=_csv(args.variants, "--variants"),
        seeds=_csv(args.seeds, "--seeds", int),
    )
    if spec.kind == "sweep":
        from blueberry.sweep import run_sweep_cli

        with _http_defaults():
            return run_sweep_cli(args, argv, spec)
    if not args.report_only:
        check_inputs(spec)
    if args.dry_run:
        print_matrix(spec)
        return 0

    with _http_defaults():
        return _track_and_run(args, argv, spec)


@contextmanager
def _http_defaults() -> Iterator[None]:
    """A flaky server should cost seconds per attempt, not MLflow's default minutes of retries
    (unless the user chose otherwise); the torchrun children inherit the same settings."""
    defaults = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    }
    added = [k for k in defaults if k not in os.environ]
    for k in added:
        os.environ[k] = defaults[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _track_and_run(args: argparse.Namespace, argv: list[str], spec: AblationSpec) -> int:
    from blueberry.track import connect, get_or_create_experiment, resolve_tracking_uri, sqlite_path

    base_cfg = spec.variants[spec.baseline].config
    uri = resolve_tracking_uri(args.tracking_uri or base_cfg.tracking.uri)
    experiment = args.experiment or base_cfg.tracking.experiment or spec.name

    if args.report_only:
        db = sqlite_path(uri)
        if db is not None and not db.is_file():
            raise ConfigError(f"--report-only: no tracking store at {db}; run the ablation first")
        client = connect(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ConfigError(f"--report-only: no MLflow experiment {experiment!r} in the tracking store")
        from blueberry.report import ReportScope, write_report

        with store_errors("reading runs for the report"):
            path = write_report(client, exp.experiment_id, ReportScope.of(spec), Path(args.reports_dir))
        print(f"report: {path}")
        return 0

    if args.storage and not args.worker:
        raise ConfigError("--storage: an ablation uses the Optuna storage only as the queue of --worker")
    if args.worker:  # other workers may be creating the same tables and experiment right now
        from blueberry.workers import RunQueue, connect_shared, resolve_storage_url

        # the queue first: a bad --storage is one line before any tracking store is created
        queue = RunQueue(resolve_storage_url(args.storage), spec.name, spec.runs(), args.heartbeat)
        client, experiment_id = connect_shared(uri, experiment)
    else:
        client = connect(uri)
        experiment_id = get_or_create_experiment(client, experiment, uri)
    command = shlex.join(["python", "run_ablation.py", *argv])
    runner = AblationRunner(
        spec,
        client,
        experiment_id,
        uri,
        command=command,
        nproc_per_node=args.nproc_per_node,
        progress=not args.no_progress,
        reports_dir=args.reports_dir,
    )
    if args.worker:  # runs are claimed from the shared database: blueberry/workers.py
        runner.queue = queue
    return runner.run()
