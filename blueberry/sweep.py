"""Sweeps: Optuna searches a space of RunConfig values under one fixed budget, then the best trials are
re-run with more seeds and compared with the base config.

A sweep spec is YAML with `kind: sweep`: the usual RunConfig content (`preset:`/`base:`/sections) is the
base config, and

    objective: {metric: val_bpb, direction: minimize}     # val_loss | val_bpb | val_ppl | val_acc
    n_trials: 40                                           # trials in the study, over all invocations
    sampler: tpe                                           # tpe | random | grid | cmaes, or {name: tpe, seed: 0}
    pruner: median                                         # median | hyperband | none, or {name: median, ...}
    search_space:
      optim.lr: {type: float, low: 0.005, high: 0.1, log: true}
      model.mlp: {type: categorical, choices: [swiglu, geglu]}
      model.n_layers: {type: int, low: 4, high: 12, step: 2}
    confirm: {top_k: 3, seeds: 3}                          # optional

The study (named after the spec) lives in an Optuna storage, sqlite:///optuna.db by default, so
re-running a sweep continues it. Trial 0 is the base config. Every trial is an MLflow child run of the
invocation's parent run. The objective at each of the trainer's eval points goes to the pruner through
the trial's tracker, which stops a pruned run by raising from `log_metrics` (the trainer needs no hook).
A diverged trial is a result, not an error: it completes with the worst finite value the study has seen
(DIVERGED_FALLBACK when there is none) and the user attribute status=diverged.

The confirm stage is an ablation named `<sweep>-confirm` (variants: `base` and `trial-<n>` for the top-k
distinct configs, each with every confirm seed), run by the ablation runner, so it is tracked, resumable
and reported like any ablation; the sweep report adds its statistics against the base config.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
import traceback
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from rich.console import Console

from blueberry import ablation
from blueberry.ablation import (
    CONFIG_KEYS,
    ERROR_FILE,
    QUICK_BUDGET,
    QUICK_SEEDS,
    STEP_METRICS,
    AblationRunner,
    AblationSpec,
    TrainResult,
    Variant,
    _seed_list,
    format_budget,
    quick_overrides,
    spec_header,
    store_errors,
)
from blueberry.config import (
    RunConfig,
    build_config,
    check_paths_exist,
    deep_merge,
    dump_yaml,
    expand_dotted,
    parse_overrides,
    resolve_raw,
)
from blueberry.errors import BlueberryError, ConfigError
from blueberry.workers import (
    DEFAULT_HEARTBEAT,
    KEY,
    ClaimLock,
    Heartbeat,
    RunQueue,
    duplicate_reason,
    fail_and_requeue,
    live,
    note,
    open_storage,
    poll_interval,
    quiet_optuna,
    tell_safely,
    void,
    with_retries,
    worker_id,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from blueberry.track import MLflowTracker

SWEEP_KEYS = (
    "name",
    "description",
    "kind",
    "objective",
    "n_trials",
    "sampler",
    "pruner",
    "search_space",
    "confirm",
)
OBJECTIVE_METRICS = ("val_loss", "val_bpb", "val_ppl", "val_acc")
DIRECTIONS = ("minimize", "maximize")
PARAM_TYPES = ("float", "int", "categorical")
PARAM_KEYS = {
    "float": ("type", "low", "high", "log", "step"),
    "int": ("type", "low", "high", "log", "step"),
    "categorical": ("type", "choices"),
}
SAMPLER_OPTIONS = {
    "tpe": ("seed", "n_startup_trials"),
    "random": ("seed",),
    "grid": ("seed",),
    "cmaes": ("seed", "n_startup_trials"),
}
PRUNER_OPTIONS = {
    "median": ("n_startup_trials", "n_warmup_steps", "interval_steps"),
    "hyperband": ("min_resource", "reduction_factor"),
    "none": (),
}
DIVERGED_FALLBACK = 1e30  # objective of a diverged trial when the study has no finite value yet (sign: worst)
TOP_K_SHOWN = 10


# ---------------------------------------------------------------------------------------------------------
# The spec


@dataclass(frozen=True)
class Param:
    """One axis of the search space: a RunConfig field and the values Optuna may give it."""

    path: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.path, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.path, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.path, list(self.choices))

    def grid(self) -> list[Any]:
        if self.type == "categorical":
            return list(self.choices)
        return list(range(self.low, self.high + 1, self.step or 1))

    def describe(self) -> str:
        if self.type == "categorical":
            return ", ".join(map(str, self.choices))
        extra = ", log" if self.log else (f", step {self.step}" if self.step else "")
        return f"[{self.low}, {self.high}]{extra}"


@dataclass(frozen=True)
class Confirm:
    top_k: int
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class SweepSpec:
    name: str
    path: Path
    # The resolved config dict (after --quick and --set) that each trial merges its params into.
    base_raw: dict[str, Any]
    base: RunConfig
    metric: str
    direction: str
    n_trials: int
    sampler: str
    sampler_options: dict[str, Any]
    pruner: str
    pruner_options: dict[str, Any]
    space: tuple[Param, ...]
    confirm: Confirm | None
    description: str = ""
    kind: str = "sweep"
    quick: bool = False

    @property
    def base_params(self) -> dict[str, Any]:
        return {p.path: config_value(self.base, p.path) for p in self.space}

    def config_for(self, params: Mapping[str, Any], where: str = "trial") -> RunConfig:
        return build_config(deep_merge(self.base_raw, expand_dotted(dict(params))), where)

    @property
    def minimize(self) -> bool:
        return self.direction == "minimize"


def config_value(cfg: RunConfig, path: str) -> Any:
    node: Any = cfg.to_dict()
    for part in path.split("."):
        node = node[part]
    return node


def _field_path(path: str, where: str) -> None:
    """A search-space key must be a leaf field of RunConfig (a typo must not become a new key)."""
    from pydantic import BaseModel

    model: type[BaseModel] = RunConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        if part not in model.model_fields:
            allowed = ", ".join(sorted(model.model_fields))
            raise ConfigError(
                f"{where}: {path}: unknown parameter; allowed under {prefix or 'top level'}: {allowed}"
            )
        ann = model.model_fields[part].annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if i == len(parts) - 1:
                raise ConfigError(
                    f"{where}: {path}: is a section; name one of its fields, e.g. {path}.{next(iter(ann.model_fields))}"
                )
            model = ann
        elif i < len(parts) - 1:
            raise ConfigError(f"{where}: {path}: {'.'.join(parts[: i + 1])} is not a section")


def _number(v: Any, ints: bool) -> bool:
    if isinstance(v, bool):
        return False
    return isinstance(v, int) if ints else isinstance(v, int | float)


def _parse_param(path: str, raw: Any, where: str, base: RunConfig, base_raw: dict[str, Any]) -> Param:
    w = f"{where}: search_space.{path}"
    _field_path(path, f"{where}: search_space")
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{w}: expected a mapping such as {{type: float, low: 0.001, high: 0.1}}, got {raw!r}"
        )
    kind = raw.get("type")
    if kind not in PARAM_TYPES:
        raise ConfigError(f"{w}: type: unknown type {kind!r}; allowed: {', '.join(PARAM_TYPES)}")
    extra = [k for k in raw if k not in PARAM_KEYS[kind]]
    if extra:
        raise ConfigError(
            f"{w}: {extra[0]}: unknown key for type {kind}; allowed: {', '.join(PARAM_KEYS[kind])}"
        )
    base_value = config_value(base, path)
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{w}: choices: expected a non-empty list, got {choices!r}")
        for c in choices:
            if c is not None and not isinstance(c, bool | int | float | str):
                raise ConfigError(
                    f"{w}: choices: {c!r} is not a scalar (Optuna stores only null, booleans, numbers and text)"
                )
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise ConfigError(f"{w}: choices: each value once, got {choices!r}")
        param = Param(path, kind, choices=tuple(choices))
        probes = list(choices)
    else:
        ints = kind == "int"
        low, high, log, step = raw.get("low"), raw.get("high"), raw.get("log", False), raw.get("step")
        for name, v in (("low", low), ("high", high)):
            if not _number(v, ints):
                raise ConfigError(f"{w}: {name}: expected {'an integer' if ints else 'a number'}, got {v!r}")
        if low >= high:
            raise ConfigError(f"{w}: low ({low}) must be below high ({high})")
        if not isinstance(log, bool):
            raise ConfigError(f"{w}: log: expected true or false, got {log!r}")
        if log and low <= 0:
            raise ConfigError(f"{w}: log: needs low > 0, got low {low}")
        if step is not None:
            if not _number(step, ints) or step <= 0:
                raise ConfigError(
                    f"{w}: step: expected a positive {'integer' if ints else 'number'}, got {step!r}"
                )
            if log and (not ints or step != 1):
                raise ConfigError(f"{w}: step and log: Optuna cannot combine a step with a log scale")
        param = Param(path, kind, low, high, log, step)
        probes = [low, high]
    for value in probes:  # every choice and both ends must make a valid config on their own
        build_config(deep_merge(base_raw, expand_dotted({path: value})), f"{w} = {value!r}")
    # Trial 0 runs the base config, so its values must be points of the space.
    if kind == "categorical":
        if not any(c == base_value and type(c) is type(base_value) for c in param.choices):
            raise ConfigError(
                f"{w}: the base config's value {base_value!r} is not among the choices; trial 0 runs the base "
                "config, so add it to the choices or set it in the spec"
            )
    elif not _number(base_value, kind == "int") or not param.low <= base_value <= param.high:
        raise ConfigError(
            f"{w}: the base config's value {base_value!r} is outside [{param.low}, {param.high}]; trial 0 runs "
            "the base config, so widen the range or set the value in the spec"
        )
    elif kind == "int" and param.step and (base_value - param.low) % param.step:
        raise ConfigError(f"{w}: the base config's value {base_value} is not on the grid low + k * step")
    return param


def _named_options(
    raw: Any, what: str, options: Mapping[str, Sequence[str]], where: str
) -> tuple[str, dict[str, Any]]:
    """`tpe` or `{name: tpe, seed: 0}` -> ("tpe", {"seed": 0})."""
    if isinstance(raw, Mapping):
        opts = dict(raw)
        name = opts.pop("name", None)
    else:
        name, opts = raw, {}
    if name not in options:
        raise ConfigError(f"{where}: {what}: unknown {what} {name!r}; allowed: {', '.join(options)}")
    for k, v in opts.items():
        if k not in options[name]:
            allowed = ", ".join(options[name]) or "none"
            raise ConfigError(f"{where}: {what}.{k}: unknown option for {name}; allowed: {allowed}")
        if not _number(v, True) or v < 0:
            raise ConfigError(f"{where}: {what}.{k}: expected a non-negative integer, got {v!r}")
    return name, opts


def parse_sweep(
    data: dict[str, Any],
    path: Path,
    overrides: Sequence[str] = (),
    quick: bool = False,
    seeds_override: Sequence[int] | None = None,
) -> SweepSpec:
    """Validate a `kind: sweep` spec completely (every choice and range end builds a valid config)."""
    where = str(path)
    name, description = spec_header(data, where, SWEEP_KEYS, "unknown key for a sweep")

    objective = data.get("objective", {"metric": "val_bpb", "direction": "minimize"})
    if not isinstance(objective, Mapping):
        raise ConfigError(
            f"{where}: objective: expected {{metric: val_bpb, direction: minimize}}, got {objective!r}"
        )
    extra = [k for k in objective if k not in ("metric", "direction")]
    if extra:
        raise ConfigError(f"{where}: objective.{extra[0]}: unknown key; allowed: metric, direction")
    metric, direction = objective.get("metric", "val_bpb"), objective.get("direction", "minimize")
    if metric not in OBJECTIVE_METRICS:
        raise ConfigError(
            f"{where}: objective.metric: unknown metric {metric!r}; allowed: {', '.join(OBJECTIVE_METRICS)}"
        )
    if direction not in DIRECTIONS:
        raise ConfigError(f"{where}: objective.direction: expected minimize or maximize, got {direction!r}")

    n_trials = data.get("n_trials")
    if not _number(n_trials, True) or n_trials <= 0:
        raise ConfigError(f"{where}: n_trials: expected a positive integer, got {n_trials!r}")
    sampler, sampler_opts = _named_options(data.get("sampler", "tpe"), "sampler", SAMPLER_OPTIONS, where)
    pruner, pruner_opts = _named_options(data.get("pruner", "median"), "pruner", PRUNER_OPTIONS, where)

    base_raw = resolve_raw({k: v for k, v in data.items() if k in CONFIG_KEYS}, path.resolve())
    if quick:
        base_raw = deep_merge(base_raw, quick_overrides())
        base_raw["budget"] = {"time": QUICK_BUDGET}
    cli = parse_overrides(overrides)
    check_paths_exist(cli)
    base_raw = deep_merge(base_raw, cli)
    if "budget" not in base_raw:  # else every trial would silently get RunConfig's default budget
        raise ConfigError(
            f"{where}: budget: missing; a sweep compares trials under one fixed budget: set budget.time, "
            "budget.tokens, budget.steps or budget.flops (e.g. budget: {time: 2m24s}), or start from a preset"
        )
    base = build_config(base_raw, where)

    raw_space = data.get("search_space")
    if not isinstance(raw_space, Mapping) or not raw_space:
        raise ConfigError(
            f"{where}: search_space: expected a non-empty mapping of config key -> {{type: ...}}"
        )
    space = tuple(_parse_param(str(k), v, where, base, base_raw) for k, v in raw_space.items())

    if sampler == "grid":
        bad = [p for p in space if p.type == "float" or (p.type == "int" and p.log)]
        if bad:
            raise ConfigError(
                f"{where}: sampler: grid needs categorical or int (step) parameters; {bad[0].path} is "
                f"{'a float' if bad[0].type == 'float' else 'an int on a log scale'}"
            )
    if sampler == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"{where}: sampler: cmaes needs the cmaes package (pip install cmaes)"
            ) from None
        if not any(p.type != "categorical" for p in space):
            raise ConfigError(f"{where}: sampler: cmaes needs at least one float or int parameter; use tpe")

    confirm = _parse_confirm(data.get("confirm"), where, quick, seeds_override)
    return SweepSpec(
        name, path, base_raw, base, metric, direction, int(n_trials), sampler, sampler_opts, pruner, pruner_opts,
        space, confirm, description, "sweep", quick,
    )  # fmt: skip


def _parse_confirm(raw: Any, where: str, quick: bool, seeds_override: Sequence[int] | None) -> Confirm | None:
    if raw is None:
        if seeds_override:
            raise ConfigError("--seeds: this sweep has no confirm stage (add confirm: {top_k: 3, seeds: 3})")
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: confirm: expected {{top_k: 3, seeds: 3}}, got {raw!r}")
    extra = [k for k in raw if k not in ("top_k", "seeds")]
    if extra:
        raise ConfigError(f"{where}: confirm.{extra[0]}: unknown key; allowed: top_k, seeds")
    top_k = raw.get("top_k", 3)
    if not _number(top_k, True) or top_k < 1:
        raise ConfigError(f"{where}: confirm.top_k: expected a positive integer, got {top_k!r}")
    seeds = raw.get("seeds", 3)
    if _number(seeds, True):
        if seeds < 2:
            raise ConfigError(
                f"{where}: confirm.seeds: at least 2 (statistics need 2 seeds a side), got {seeds}"
            )
        seeds = list(range(seeds))
    seeds = _seed_list(seeds, f"{where}: confirm")
    if seeds_override:
        seeds = _seed_list(list(seeds_override), "--seeds")
    elif quick:
        seeds = QUICK_SEEDS
    return Confirm(int(top_k), seeds)


def check_sweep_cli(args: argparse.Namespace) -> None:
    if args.variants is not None:
        raise ConfigError("--variants: a sweep has no variants")
    if args.nproc_per_node != 1:
        raise ConfigError(
            "--nproc-per-node: sweep trials train in this process (the pruner watches them); use 1"
        )


# ---------------------------------------------------------------------------------------------------------
# Optuna pieces


def make_sampler(spec: SweepSpec, seed: int | None) -> optuna.samplers.BaseSampler:
    opts = {k: v for k, v in spec.sampler_options.items() if k != "seed"}
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, **opts)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "cmaes":
        with quiet_optuna():
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False, **opts)
    base = spec.base_params
    return GridSampler({p.path: p.grid() for p in spec.space}, base, seed=spec.sampler_options.get("seed", 0))


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid with the base point first (trial 0 is the base config in every sweep), and without
    its study.stop() after the last point, which only works inside study.optimize (the sweep loop asks
    `is_exhausted` itself). Optuna shuffles the grid with a fixed seed, so all workers share one order."""

    def __init__(self, search_space: dict[str, list[Any]], first: dict[str, Any], seed: int | None = None):
        super().__init__(search_space, seed=seed)
        point = tuple(first[name] for name in self._param_names)
        self._all_grids.remove(point)
        self._all_grids.insert(0, point)

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    o = spec.pruner_options
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(**o)
    if spec.pruner == "hyperband":
        evals = max(1, round(1 / spec.base.eval.every))
        return optuna.pruners.HyperbandPruner(min_resource=o.get("min_resource", 1), max_resource=evals,
                                              reduction_factor=o.get("reduction_factor", 3))  # fmt: skip
    return optuna.pruners.NopPruner()


class PruneTrial(Exception):
    """Raised from the trial's tracker when the pruner stops a trial; the sweep runner catches it.
    (The trainer lets tracker exceptions propagate; its try/finally closes the progress view.)"""


class TrialTracker:
    """The trainer's tracker for one trial: everything goes to MLflow, and the objective at each eval
    point is also reported to Optuna, whose pruner may stop the run there."""

    def __init__(self, inner: MLflowTracker, trial: optuna.Trial, metric: str, eval_every: float):
        self.inner, self.trial, self.metric, self.every = inner, trial, metric, eval_every
        self.reported: dict[int, float] = {}
        self._warned = False

    @property
    def run_id(self) -> str | None:
        return self.inner.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.inner.log_params(params)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.inner.set_tags(tags)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.inner.log_artifact(local_path, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.inner.log_text(text, artifact_file)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.inner.log_metrics(metrics, step)
        value, progress = metrics.get(self.metric), metrics.get("progress")
        if value is None or progress is None or not math.isfinite(float(value)):
            return
        # The eval index (not the optimizer step) is the pruner's step: index k is the same share of the
        # budget in every trial, whatever its speed.
        k = max(1, round(float(progress) / self.every))
        self.reported[k] = float(value)
        try:
            with quiet_optuna():
                self.trial.report(float(value), k)
                prune = self.trial.should_prune()
        except Exception as e:  # noqa: BLE001 - the storage failing must not cost the run
            if not self._warned:
                print(
                    f"warning: trial {self.trial.number}: cannot report to Optuna ({type(e).__name__}: {e})",
                    file=sys.stderr,
                )
                self._warned = True
            return
        if prune:
            raise PruneTrial(f"pruned at eval {k} with {self.metric} {value:.4f}")


# ---------------------------------------------------------------------------------------------------------
# Running


@dataclass
class TrialOutcome:
    number: int
    status: str  # finished | diverged | pruned | failed
    value: float | None = None
    run_id: str | None = None
    detail: str = ""


class SweepRunner:
    """Runs the trials of one sweep spec against one study and one MLflow experiment, then its confirm stage."""

    def __init__(
        self,
        spec: SweepSpec,
        client: MlflowClient,
        experiment_id: str,
        tracking_uri: str,
        storage_url: str,
        *,
        command: str = "",
        worker: bool = False,
        heartbeat: int = DEFAULT_HEARTBEAT,
        progress: bool = True,
        reports_dir: str | Path = "reports",
    ):
        self.spec = spec
        self.client = client
        self.experiment_id = experiment_id
        self.uri = tracking_uri
        self.storage_url = storage_url
        self.command = command
        self.worker = worker
        self.heartbeat = heartbeat
        self.progress = progress
        self.reports_dir = Path(reports_dir)
        self.parent: MLflowTracker | None = None
        self.storage = None
        self.lock = ClaimLock(storage_url)
        self.console = Console()

    # -- the study

    def open_study(self) -> optuna.Study:
        """Create or load the study; enqueue the base config as trial 0 when the study is new."""
        spec = self.spec
        if self.storage is None:
            self.storage = open_storage(self.storage_url, self.heartbeat)
        with quiet_optuna():
            study = with_retries(lambda: optuna.create_study(
                study_name=spec.name, storage=self.storage, direction=spec.direction,
                pruner=make_pruner(spec), load_if_exists=True,
            ))  # fmt: skip
        have = study.direction.name.lower()
        if have != spec.direction:
            raise ConfigError(
                f"objective.direction: study {spec.name!r} in the storage was created to {have}; "
                "use another sweep name for the other direction"
            )
        existing = len(study.get_trials(deepcopy=False))
        seed = spec.sampler_options.get("seed")
        # Seeded samplers are offset by the trials already there, so a continued sweep does not re-draw the
        # points of the first invocation; workers sample unseeded, so two of them never draw the same point.
        study.sampler = make_sampler(spec, None if self.worker or seed is None else seed + existing)
        if existing == 0 and spec.sampler != "grid":  # grid: the sampler puts the base point first
            with self.lock:
                if not study.get_trials(deepcopy=False):
                    study.enqueue_trial(spec.base_params, user_attrs={KEY: "base"})
        return study

    # -- the whole invocation

    def run(self) -> int:
        from blueberry.track import MLflowTracker

        study = self.open_study()
        with store_errors("creating the parent run"):
            parent = self._create_parent()
        self.parent = MLflowTracker(
            self.client, parent.info.run_id, self._out_root() / "tracking_buffer-parent.jsonl"
        )
        outcomes: list[TrialOutcome] = []
        code = 0
        try:
            self._log_parent_inputs()
            outcomes = self.run_trials(study)
            code = self.run_confirm(study)
            with store_errors("reading runs for the report"):
                report = self.write_report(study)
            self.parent.log_artifact(report)
            for png in sorted((report.parent / self.spec.name).glob("*.png")):
                self.parent.log_artifact(png, "report")
        except KeyboardInterrupt:
            self._end_parent("killed")
            raise
        except Exception:
            self._end_parent("failed")
            raise
        failed = any(o.status == "failed" for o in outcomes) or code != 0
        self._end_parent("failed" if failed else "finished")
        counts = ", ".join(
            f"{sum(o.status == s for o in outcomes)} {s}"
            for s in ("finished", "diverged", "pruned", "failed")
            if any(o.status == s for o in outcomes)
        )
        self.console.print(
            f"[bold]{self.spec.name}[/]: {counts or 'no new trials'} in this invocation; report: {report}"
        )
        return 1 if failed else 0

    def _out_root(self) -> Path:
        return Path(self.spec.base.train.out_dir) / self.spec.name

    def _create_parent(self):
        from blueberry.runinfo import run_info
        from blueberry.track import redact_uri

        return self.client.create_run(
            self.experiment_id,
            run_name=f"{self.spec.name}{'-quick' if self.spec.quick else ''}",
            tags={
                **run_info(),
                "sweep": self.spec.name,
                "kind": "sweep",
                "status": "running",
                "command": self.command,
                "spec": str(self.spec.path),
                "quick": str(self.spec.quick).lower(),
                "storage": redact_uri(self.storage_url),
                "worker": worker_id(),
                "mlflow.note.content": self.spec.description,
            },
        )

    def _log_parent_inputs(self) -> None:
        assert self.parent is not None
        spec = self.spec
        self.parent.log_params({
            "objective": f"{spec.direction} {spec.metric}", "n_trials": spec.n_trials, "sampler": spec.sampler,
            "pruner": spec.pruner, "search_space": json.dumps({p.path: p.describe() for p in spec.space}),
        })  # fmt: skip
        try:
            self.parent.log_text(spec.path.read_text(), "spec.yaml")
        except OSError:
            pass
        self.parent.log_text(dump_yaml(spec.base), "configs/base.yaml")

    def _end_parent(self, status: str) -> None:
        if self.parent is not None:
            self.parent.set_tags({"status": status})
            self.parent.close(ablation.STATUS_TO_MLFLOW[status])

    # -- trials

    def run_trials(self, study: optuna.Study) -> list[TrialOutcome]:
        """Claim and run trials until the study holds n_trials of them and none is queued or running."""
        outcomes = []
        status = Console(stderr=True)
        while (trial := self.next_trial(study, status)) is not None:
            if self.progress:
                done = len(live(study.get_trials(deepcopy=False)))
                status.print(
                    f"[bold]{self.spec.name}[/] trial {trial.number} ({done}/{self.spec.n_trials} in the study)"
                )
            o = self.run_trial(study, trial)
            outcomes.append(o)
            style = {"finished": "green", "diverged": "yellow", "pruned": "dim", "failed": "red"}[o.status]
            value = f"{self.spec.metric} {o.value:.4f}" if o.value is not None else ""
            self.console.print(f"[{style}]{o.status:>8}[/] trial {o.number}  {value}  {o.detail}".rstrip())
        return outcomes

    def next_trial(self, study: optuna.Study, status: Console) -> optuna.Trial | None:
        """A claimed trial (a queued one first, else a newly sampled one while the study has room), or
        None when the study is complete. Waits while other processes still run trials, since a dead one's
        trial comes back as a queued retry after the heartbeat grace period."""
        from optuna.storages import fail_stale_trials
        from optuna.trial import TrialState

        announced = False
        while True:
            with self.lock, quiet_optuna():
                fail_stale_trials(study)
                counted = live(study.get_trials(deepcopy=False))
                waiting = any(t.state == TrialState.WAITING for t in counted)
                room = len(counted) < self.spec.n_trials and not self._grid_exhausted(study)
                if waiting or room:
                    trial = study.ask()
                    self.storage.record_heartbeat(trial._trial_id)
                    if KEY not in trial.user_attrs:
                        trial.set_user_attr(KEY, f"trial-{trial.number}")
                    # a retry carries the user attributes of the trial it replaces: reset what is per-try
                    note(trial, worker=worker_id(), status="running")
                    frozen = self.storage.get_trial(trial._trial_id)
                    trials = study.get_trials(deepcopy=False)
                    reason = duplicate_reason(frozen, trials) or self._surplus(frozen, trials)
                    if reason is None:
                        return trial
                    void(study, frozen, reason)
                    continue
                running = sum(t.state == TrialState.RUNNING for t in counted)
            if not running:
                return None
            if not announced:
                status.print(
                    f"waiting: {running} trials running elsewhere (or in a process that died less than "
                    f"{3 * self.heartbeat}s ago)"
                )
                announced = True
            time.sleep(poll_interval(self.heartbeat))

    def _surplus(self, trial, trials) -> str | None:
        """Two processes may sample at the same moment; the trial beyond n_trials (by number) yields."""
        numbers = [t.number for t in live(trials)]
        if trial.number in numbers[: self.spec.n_trials]:
            return None
        return f"surplus: the study already has {self.spec.n_trials} trials"

    @staticmethod
    def _grid_exhausted(study: optuna.Study) -> bool:
        s = study.sampler
        return isinstance(s, optuna.samplers.GridSampler) and s.is_exhausted(study)

    def run_trial(self, study: optuna.Study, trial: optuna.Trial) -> TrialOutcome:
        from optuna.trial import TrialState

        from blueberry.runinfo import run_info
        from blueberry.track import BUFFER_FILE, MLflowTracker

        spec = self.spec
        params = {p.path: p.suggest(trial) for p in spec.space}
        try:
            cfg: RunConfig | None = spec.config_for(params, f"trial {trial.number}")
            error = ""
        except ConfigError as e:  # a combination of valid values can still be an invalid config
            cfg, error = None, str(e)
        tags = {
            **run_info(),
            "sweep": spec.name,
            "kind": "trial",
            "trial": str(trial.number),
            "status": "running",
            "worker": worker_id(),
            "mlflow.parentRunId": self.parent.run_id if self.parent else "",
            **{f"trial.{k}": str(v) for k, v in params.items()},
        }
        if cfg is not None:
            tags["trial_config_hash"] = cfg.config_hash
        with store_errors("starting the trial's MLflow run"):
            run_id = self.client.create_run(
                self.experiment_id, run_name=f"{spec.name}-trial-{trial.number}", tags=tags
            ).info.run_id
        note(trial, mlflow_run_id=run_id)
        if cfg is None:
            self.client.set_tag(run_id, "status", "failed")
            self.client.set_tag(run_id, "error", error[:5000])
            self.client.set_terminated(run_id, "FAILED")
            note(trial, status="failed", error=error[:1000])
            tell_safely(study, trial.number, state=TrialState.FAIL)
            return TrialOutcome(trial.number, "failed", None, run_id, error)

        # A fresh folder per trial: a re-queued trial starts over rather than resuming someone's half-run.
        run_dir = (Path(cfg.train.out_dir) / spec.name / f"trial-{trial.number:04d}-{run_id[:8]}").resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.client.set_tag(run_id, "run_dir", str(run_dir))
        note(trial, run_dir=str(run_dir))
        tracker = MLflowTracker(self.client, run_id, run_dir / BUFFER_FILE, retry_interval=60.0)
        watched = TrialTracker(tracker, trial, spec.metric, cfg.eval.every)
        with Heartbeat(self.storage, trial._trial_id):
            try:
                result = TrainResult.of(
                    ablation.train_fn(cfg, tracker=watched, run_dir=run_dir, progress=self.progress)
                )
            except PruneTrial as e:
                tracker.set_tags({"status": "pruned", "pruned": str(e)})
                tracker.close("FINISHED")
                note(trial, status="pruned")
                tell_safely(study, trial.number, state=TrialState.PRUNED)
                last = watched.reported[max(watched.reported)] if watched.reported else None
                return TrialOutcome(trial.number, "pruned", last, run_id, str(e))
            except KeyboardInterrupt:
                tracker.set_tags({"status": "killed"})
                tracker.close("KILLED")
                note(trial, status="killed")
                fail_and_requeue(study, trial._trial_id)  # the next invocation runs it again
                raise
            except BlueberryError as e:
                tracker.set_tags({"status": "failed", "error": str(e)})
                tracker.close("FAILED")
                note(trial, status="failed", error=str(e)[:1000])
                fail_and_requeue(study, trial._trial_id)
                raise BlueberryError(f"trial {trial.number}: {e}") from None
            except Exception as e:  # noqa: BLE001 - one failed trial must not stop the sweep
                from blueberry.checkpoint import atomic_write_text

                msg = f"{type(e).__name__}: {e}".splitlines()[0]
                tb = traceback.format_exc()
                atomic_write_text(run_dir / ERROR_FILE, tb)
                tracker.log_text(tb, ERROR_FILE)
                tracker.set_tags({"status": "failed", "error": msg})
                tracker.close("FAILED")
                note(trial, status="failed", error=msg[:1000])
                tell_safely(study, trial.number, state=TrialState.FAIL)
                return TrialOutcome(
                    trial.number, "failed", None, run_id, f"{msg} (traceback: {run_dir / ERROR_FILE})"
                )

        value = result.metrics.get(spec.metric)
        status = (
            "finished"
            if result.status == "finished" and value is not None and math.isfinite(value)
            else "diverged"
        )
        if status == "diverged":
            value = self.worst_value(study, watched.reported.values())
        final = {k: v for k, v in result.metrics.items() if k not in STEP_METRICS}
        final.setdefault("steps", float(result.steps))
        final.setdefault("wall_time_s", float(result.wall_time_s))
        tracker.log_metrics({**final, "objective": value}, step=int(result.steps))
        tracker.set_tags({"status": status})
        tracker.close("FINISHED")
        note(trial, status=status, steps=result.steps, tokens_seen=result.tokens_seen,
             train_time_s=result.train_time_s)  # fmt: skip
        tell_safely(study, trial.number, values=float(value), state=TrialState.COMPLETE)
        return TrialOutcome(trial.number, status, float(value), run_id)

    def worst_value(self, study: optuna.Study, own: Any) -> float:
        """The objective of a diverged trial: the worst finite value of the study's complete trials and of
        this trial's own evaluations, else DIVERGED_FALLBACK; a bad result for the sampler, but no outlier
        that wrecks the plots."""
        from optuna.trial import TrialState

        seen = [t.value for t in live(study.get_trials(deepcopy=False)) if t.state == TrialState.COMPLETE]
        seen = [float(v) for v in [*seen, *own] if v is not None and math.isfinite(v)]
        if not seen:
            return DIVERGED_FALLBACK if self.spec.minimize else -DIVERGED_FALLBACK
        return max(seen) if self.spec.minimize else min(seen)

    # -- the confirm stage

    def run_confirm(self, study: optuna.Study) -> int:
        cspec = confirm_spec(self.spec, study)
        if cspec is None:
            if self.spec.confirm is not None:
                self.console.print("confirm stage: no finished trial to confirm yet")
            return 0
        self.console.print(
            f"[bold]{cspec.name}[/]: {', '.join(cspec.variants)} x seeds {', '.join(map(str, cspec.seeds))}"
        )
        runner = AblationRunner(
            cspec, self.client, self.experiment_id, self.uri, command=self.command,
            progress=self.progress, reports_dir=self.reports_dir,
        )  # fmt: skip
        if self.worker:
            runner.queue = RunQueue(self.storage_url, cspec.name, cspec.runs(), self.heartbeat)
        return runner.run()

    def write_report(self, study: optuna.Study) -> Path:
        return write_sweep_report(
            self.spec, study, self.client, self.experiment_id, self.reports_dir, self.storage_url
        )


def ranked(spec: SweepSpec, study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Complete, non-diverged trials, best first (ties: the earlier trial)."""
    from optuna.trial import TrialState

    done = [
        t for t in live(study.get_trials(deepcopy=False))
        if t.state == TrialState.COMPLETE and t.user_attrs.get("status") != "diverged"
        and t.value is not None and math.isfinite(t.value)
    ]  # fmt: skip
    sign = 1.0 if spec.minimize else -1.0
    return sorted(done, key=lambda t: (sign * t.value, t.number))


def confirm_spec(spec: SweepSpec, study: optuna.Study) -> AblationSpec | None:
    """The confirm stage as an ablation: `base` plus the top-k distinct trial configs, every confirm seed."""
    if spec.confirm is None:
        return None
    best = ranked(spec, study)
    if not best:
        return None
    variants = {"base": Variant("base", {}, spec.base)}
    seen = {spec.base.config_hash}
    for t in best:
        if len(variants) > spec.confirm.top_k:
            break
        params = {p.path: t.params[p.path] for p in spec.space if p.path in t.params}
        try:
            cfg = spec.config_for(params)
        except ConfigError:
            continue
        if cfg.config_hash in seen:  # the base config itself, or a repeat of a better trial
            continue
        seen.add(cfg.config_hash)
        variants[f"trial-{t.number}"] = Variant(f"trial-{t.number}", params, cfg)
    return AblationSpec(
        name=f"{spec.name}-confirm",
        path=spec.path,
        seeds=spec.confirm.seeds,
        baseline="base",
        variants=variants,
        selected=tuple(variants),
        description=f"Confirm stage of sweep {spec.name}: its best trials and the base config, each with seeds "
        + ", ".join(map(str, spec.confirm.seeds)),
        kind="ablation",
        quick=spec.quick,
    )


# ---------------------------------------------------------------------------------------------------------
# The report


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _importances(study: optuna.Study, spec: SweepSpec) -> tuple[dict[str, float] | None, str]:
    """Parameter importances (fANOVA, seeded), or None and why not."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if len(done) < 2:
        return None, "n/a (needs at least 2 complete trials)"
    varying = [p.path for p in spec.space if len({json.dumps(t.params.get(p.path)) for t in done}) > 1]
    if not varying:
        return None, "n/a (no parameter varies among the complete trials)"
    try:
        with quiet_optuna():
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            return dict(
                optuna.importance.get_param_importances(study, evaluator=evaluator, params=varying)
            ), ""
    except Exception as e:  # noqa: BLE001 - importances are a nicety; the report must still be written
        return None, f"n/a ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def plot_sweep(study: optuna.Study, spec: SweepSpec, out_dir: Path) -> list[tuple[str, Path]]:
    """Optimisation history, slice and parallel-coordinate plots (Optuna's matplotlib versions, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    from blueberry.report import _save_figure

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    params = [p.path for p in spec.space]
    made = []
    plots = [
        (
            "optimisation history",
            "history.png",
            lambda: ovm.plot_optimization_history(study, target_name=spec.metric),
        ),
        ("slice plot", "slice.png", lambda: ovm.plot_slice(study, params=params, target_name=spec.metric)),
    ]
    if len(params) >= 2:
        plots.append(("parallel coordinates", "parallel_coordinate.png",
                      lambda: ovm.plot_parallel_coordinate(study, params=params, target_name=spec.metric)))  # fmt: skip
    for title, fname, draw in plots:
        # rc_context undoes the global style Optuna's plots switch to; their axis-limit warnings for
        # one-valued parameters say nothing the plot does not show.
        try:
            with quiet_optuna(), matplotlib.rc_context(), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                ax = draw()
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                _save_figure(fig, out_dir / fname)
                plt.close(fig)
            made.append((title, out_dir / fname))
        except Exception as e:  # noqa: BLE001 - a plot that cannot be drawn leaves a line, not a crash
            print(f"warning: {spec.name}: no {title} ({type(e).__name__}: {e})", file=sys.stderr)
            plt.close("all")
    return made


def _confirm_section(
    spec: SweepSpec, study: optuna.Study, client: MlflowClient, experiment_id: str
) -> list[str]:
    from blueberry.report import (
        DASH,
        ReportScope,
        collect_runs,
        fmt_mean_std,
        fmt_p,
        fmt_signed,
        markdown_table,
        summarize,
        verdict,
        welch,
    )

    if spec.confirm is None:
        return ["(this sweep has no confirm stage)", ""]
    cspec = confirm_spec(spec, study)
    if cspec is None:
        return ["(no finished trial to confirm yet)", ""]
    scope = ReportScope.of(cspec)
    sums = summarize(collect_runs(client, experiment_id, scope), scope)
    base = sums["base"].values(spec.metric)
    rows = []
    for name, s in sums.items():
        vals = s.values(spec.metric)
        params = cspec.variants[name].overrides
        diff = ", ".join(f"{k}={_fmt_value(v)}" for k, v in params.items()) or "(the base config)"
        if name == "base":
            rows.append(
                [
                    f"**{name}**",
                    diff,
                    f"{len(s.finished)} / {len(s.diverged)}",
                    fmt_mean_std(vals),
                    DASH,
                    DASH,
                    "baseline",
                ]
            )
            continue
        cmp = welch(base, vals)
        if cmp is not None and not spec.minimize:  # verdict() reads lower as better
            shown, judged = cmp, replace(cmp, diff=-cmp.diff)
        else:
            shown, judged = cmp, cmp
        rows.append([
            name, diff, f"{len(s.finished)} / {len(s.diverged)}", fmt_mean_std(vals),
            DASH if shown is None else f"{fmt_signed(shown.diff)} [{fmt_signed(shown.ci_low)}, {fmt_signed(shown.ci_high)}]",
            DASH if shown is None else fmt_p(shown.p),
            verdict(judged),
        ])  # fmt: skip
    better = "lower" if spec.minimize else "higher"
    return [
        markdown_table(
            [
                "config",
                "params",
                "runs (finished / diverged)",
                f"{spec.metric} (mean ± std)",
                "Δ vs base [95% CI]",
                "p (Welch)",
                "verdict",
            ],
            rows,
            "llrrrrl",
        ),  # fmt: skip
        "",
        f"Seeds {', '.join(map(str, cspec.seeds))}; Δ = config − base ({better} is better). "
        f"Full statistics: [{cspec.name}.md]({cspec.name}.md).",
        "",
    ]


def render_sweep_report(
    spec: SweepSpec,
    study: optuna.Study,
    *,
    experiment: str = "",
    storage: str = "",
    commands: Sequence[str] = (),
    importances: tuple[dict[str, float] | None, str] = (None, "n/a"),
    confirm: Sequence[str] = (),
    figures: Sequence[tuple[str, str]] = (),
    now: datetime | None = None,
) -> str:
    from optuna.trial import TrialState

    from blueberry.report import DASH, markdown_table

    trials = live(study.get_trials(deepcopy=False))
    now = now or datetime.now(timezone.utc)
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    diverged = sum(t.user_attrs.get("status") == "diverged" for t in by_state[TrialState.COMPLETE])
    best = ranked(spec, study)
    base_params = spec.base_params
    names = [p.path for p in spec.space]

    lines = [f"# Sweep: {spec.name}" + (" (quick, CPU scale)" if spec.quick else ""), ""]
    if spec.description:
        lines += [spec.description, ""]
    header = [
        ("date", now.strftime("%Y-%m-%d %H:%M UTC")),
        ("objective", f"{spec.direction} `{spec.metric}` (final evaluation of each trial)"),
        ("budget (each trial)", format_budget(spec.base)),
        ("sampler / pruner", f"{spec.sampler} / {spec.pruner}"),
        ("trials", f"{len(trials)} of {spec.n_trials}: {len(by_state[TrialState.COMPLETE])} complete "
                   f"({diverged} diverged), {len(by_state[TrialState.PRUNED])} pruned, "
                   f"{len(by_state[TrialState.FAIL])} failed, "
                   f"{len(by_state[TrialState.RUNNING]) + len(by_state[TrialState.WAITING])} running or queued"),
        ("Optuna study", f"`{spec.name}` in `{storage}`" if storage else f"`{spec.name}`"),
        ("MLflow experiment", f"`{experiment}`" if experiment else "unknown"),
        ("reproduce", " then ".join(f"`{c}`" for c in commands) if commands else "unknown"),
    ]  # fmt: skip
    lines += [f"- **{k}**: {v}" for k, v in header] + [""]

    lines += ["## Best trial", ""]
    if best:
        b = best[0]
        lines += [f"Trial **{b.number}**: {spec.metric} = **{b.value:.4f}**"
                  + (f" (MLflow run `{b.user_attrs['mlflow_run_id']}`)" if b.user_attrs.get("mlflow_run_id") else ""), ""]  # fmt: skip
        lines.append(markdown_table(
            ["parameter", "best", "base config"],
            [[f"`{n}`", _fmt_value(b.params.get(n, DASH)), _fmt_value(base_params[n])] for n in names],
        ))  # fmt: skip
    else:
        lines.append("(no finished trial yet)")
    lines.append("")

    lines += [f"## Top {min(TOP_K_SHOWN, len(best)) or ''} trials".replace("  ", " "), ""]
    if best:
        rows = [[i + 1, t.number, f"{t.value:.4f}", *(_fmt_value(t.params.get(n, DASH)) for n in names),
                 "yes" if t.params == base_params else ""] for i, t in enumerate(best[:TOP_K_SHOWN])]  # fmt: skip
        lines.append(markdown_table(["rank", "trial", spec.metric, *names, "base config"], rows,
                                    "rrr" + "l" * len(names) + "l"))  # fmt: skip
    else:
        lines.append("(none)")
    lines.append("")

    lines += ["## Parameter importances", ""]
    imp, why = importances
    if imp:
        lines.append(
            markdown_table(
                ["parameter", "importance"], [[f"`{k}`", f"{v:.3f}"] for k, v in imp.items()], "lr"
            )
        )
        lines += [
            "",
            "fANOVA over the complete trials (Optuna, seed 0); shares of the objective's variance.",
            "",
        ]
    else:
        lines += [why, ""]

    lines += ["## Confirm stage", "", *confirm]

    if figures:
        lines += ["## Plots", ""] + [f"![{title}]({path})" for title, path in figures] + [""]

    lines += ["## All trials", ""]
    rows = []
    for t in trials:
        status = t.user_attrs.get("status") or t.state.name.lower()
        value = f"{t.value:.4f}" if t.value is not None else DASH
        if t.state == TrialState.PRUNED and t.intermediate_values:
            value = f"({t.intermediate_values[max(t.intermediate_values)]:.4f} at eval {max(t.intermediate_values)})"
        rows.append([t.number, status, value, *(_fmt_value(t.params.get(n, DASH)) for n in names),
                     f"`{t.user_attrs['mlflow_run_id']}`" if t.user_attrs.get("mlflow_run_id") else DASH])  # fmt: skip
    if rows:
        lines.append(markdown_table(["trial", "status", spec.metric, *names, "MLflow run"], rows,
                                    "rlr" + "l" * len(names) + "l"))  # fmt: skip
    else:
        lines.append("(no trials yet)")
    lines.append("")
    return "\n".join(lines)


def _sweep_commands(client: MlflowClient, experiment_id: str, name: str) -> list[str]:
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.sweep = '{name}' and tags.kind = 'sweep'",
        order_by=["attributes.start_time ASC"], max_results=50,
    )  # fmt: skip
    return list(dict.fromkeys(r.data.tags["command"] for r in runs if r.data.tags.get("command")))


def write_sweep_report(
    spec: SweepSpec,
    study: optuna.Study,
    client: MlflowClient,
    experiment_id: str,
    reports_dir: str | Path = "reports",
    storage_url: str = "",
) -> Path:
    """reports/<sweep>.md and reports/<sweep>/*.png, from the study and the tracking store."""
    from blueberry.checkpoint import atomic_write_text
    from blueberry.track import redact_uri

    reports_dir = Path(reports_dir)
    figures = plot_sweep(study, spec, reports_dir / spec.name)
    exp = client.get_experiment(experiment_id)
    text = render_sweep_report(
        spec,
        study,
        experiment=exp.name if exp else experiment_id,
        storage=redact_uri(storage_url) if storage_url else "",
        commands=_sweep_commands(client, experiment_id, spec.name),
        importances=_importances(study, spec),
        confirm=_confirm_section(spec, study, client, experiment_id),
        figures=[(title, p.relative_to(reports_dir).as_posix()) for title, p in figures],
    )
    path = reports_dir / f"{spec.name}.md"
    atomic_write_text(path, text)
    return path


# ---------------------------------------------------------------------------------------------------------
# The command line (run_ablation.py dispatches here for `kind: sweep`)


def print_plan(spec: SweepSpec) -> None:
    from rich.table import Table

    from blueberry.report import human

    table = Table(
        title=f"{spec.name}: {spec.n_trials} trials, {spec.direction} {spec.metric}, sampler {spec.sampler}, "
        f"pruner {spec.pruner}",
        caption=f"budget {format_budget(spec.base)} per trial, {human(ablation.param_count(spec.base))} params "
        f"(base config {spec.base.config_hash})"
        + (
            f"; confirm: top {spec.confirm.top_k} x seeds {', '.join(map(str, spec.confirm.seeds))}"
            if spec.confirm
            else ""
        ),
    )
    for col in ("parameter", "type", "values", "base (trial 0)"):
        table.add_column(col, no_wrap=True)
    base = spec.base_params
    for p in spec.space:
        table.add_row(p.path, p.type, p.describe(), str(base[p.path]))
    console = Console()
    console.print(table)
    console.print("dry run: nothing trained, no study or MLflow run created")


def run_sweep_cli(args: argparse.Namespace, argv: Sequence[str], spec: SweepSpec) -> int:
    """`run_ablation.py SWEEP.yaml ...`: run (or join, with --worker) the sweep, or only rewrite its report."""
    from blueberry.track import connect, get_or_create_experiment, resolve_tracking_uri, sqlite_path
    from blueberry.workers import resolve_storage_url, sqlite_file

    check_sweep_cli(args)
    if not args.report_only:  # a missing corpus: one line now, not a failed trial in a new study
        from blueberry.data.cache import check_inputs

        try:
            check_inputs(spec.base)
        except BlueberryError as e:
            raise type(e)(f"{spec.path}: {e}") from None
    if args.dry_run:
        print_plan(spec)
        return 0
    uri = resolve_tracking_uri(args.tracking_uri or spec.base.tracking.uri)
    experiment = args.experiment or spec.base.tracking.experiment or spec.name
    storage_url = resolve_storage_url(args.storage)
    heartbeat = getattr(args, "heartbeat", DEFAULT_HEARTBEAT)

    if args.report_only:
        db = sqlite_file(storage_url)
        if db is not None and not db.is_file():
            raise ConfigError(f"--report-only: no Optuna storage at {db}; run the sweep first")
        mdb = sqlite_path(uri)
        if mdb is not None and not mdb.is_file():
            raise ConfigError(f"--report-only: no tracking store at {mdb}; run the sweep first")
        storage = open_storage(storage_url, heartbeat)
        try:
            study = optuna.load_study(study_name=spec.name, storage=storage)
        except KeyError:
            raise ConfigError(
                f"--report-only: no study {spec.name!r} in the Optuna storage; run the sweep first"
            ) from None
        client = connect(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ConfigError(f"--report-only: no MLflow experiment {experiment!r} in the tracking store")
        with store_errors("reading runs for the report"):
            path = write_sweep_report(spec, study, client, exp.experiment_id, args.reports_dir, storage_url)
        print(f"report: {path}")
        return 0

    storage = open_storage(storage_url, heartbeat)  # before the tracking store: a bad URL leaves nothing
    if args.worker:  # other workers may be creating the same tables and experiment right now
        from blueberry.workers import connect_shared

        client, experiment_id = connect_shared(uri, experiment)
    else:
        client = connect(uri)
        experiment_id = get_or_create_experiment(client, experiment, uri)
    runner = SweepRunner(
        spec, client, experiment_id, uri, storage_url,
        command=shlex.join(["python", "run_ablation.py", *argv]), worker=args.worker, heartbeat=heartbeat,
        progress=not args.no_progress, reports_dir=args.reports_dir,
    )  # fmt: skip
    runner.storage = storage
    return runner.run()
