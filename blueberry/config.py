"""Typed, frozen run configuration, loaded from YAML with `base:`/`preset:` inheritance and `--set` overrides.

One `RunConfig` describes a training run completely. Its sections are pydantic models with
`extra="forbid"`, so an unknown key is an error rather than a silently ignored typo. Registry axes
(`model.norm`, `optim.name`, ...) are checked against the registered names after `plugins` are imported.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, field_validator, model_validator

from blueberry.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"

# ---------------------------------------------------------------------------------------------------------
# Human-friendly scalar types: durations ("2m24s", "144s", 90) and counts ("5M", "1.5B", 1000).

_DURATION_RE = re.compile(
    r"^(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s?)?$"
)
_COUNT_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_duration(value: Any) -> float:
    """Seconds from 90, 90.5, "90", "144s", "2m24s", "1h30m"."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 2m24s, 144s or 90, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip().lower()
    m = _DURATION_RE.match(text)
    if not text or not m or not any(m.groupdict().values()):
        raise ValueError(f"expected a duration like 2m24s, 144s or 90, got {value!r}")
    h, mi, s = (float(m.group(k) or 0) for k in ("h", "m", "s"))
    return h * 3600 + mi * 60 + s


def parse_count(value: Any) -> int:
    """An integer from 1000, "5M", "1.5B", "100k", "2e6"."""
    if isinstance(value, bool):
        raise ValueError(f"expected a count like 5M, 1.5B or 1000, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"expected a whole count, got {value!r}")
        return int(value)
    text = str(value).strip().lower().replace("_", "")
    m = re.match(r"^(\d+(?:\.\d+)?(?:e\d+)?)([kmbgt]?)$", text)
    if not m:
        raise ValueError(f"expected a count like 5M, 1.5B or 1000, got {value!r}")
    n = float(m.group(1)) * _COUNT_SUFFIX[m.group(2)]
    return int(round(n))


Duration = Annotated[float, BeforeValidator(parse_duration)]
Count = Annotated[int, BeforeValidator(parse_count)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _registry_check(axis: str, value: str) -> str:
    from blueberry.registry import AXES, load_builtin_components

    load_builtin_components()
    reg = AXES[axis]
    if value not in reg:
        raise ValueError(f"unknown name {value!r}; registered: {', '.join(reg.names())}")
    return value


# ---------------------------------------------------------------------------------------------------------
# Sections


class ModelConfig(Section):
    """The architecture. Every field is an ablation axis; the defaults are the seed's recipe."""

    n_layers: int = 8
    d_model: int = 256
    n_heads: int = 8
    n_kv_heads: int = 2
    vocab_size: int | None = None  # None: follow the tokenizer
    seq_len: int = 256
    ffn_mult: float = 3.5  # d_ff = ffn_mult * d_model rounded up to a multiple of 32, unless d_ff is set
    d_ff: int | None = None
    qk_norm: bool = True
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    norm_placement: str = "sandwich"
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # share of head_dim frequency pairs that rotate (the seed: 0.5)
    mlp: str = "swiglu"
    tie_embeddings: bool = False
    embed_scale: bool = True
    init: str = "depth_aware"
    init_std: float = 0.02
    zero_init_outputs: bool = True
    logit_softcap: float | None = None
    attn_gate: bool = False  # sigmoid gate on each head's output, computed from the block input
    bias: bool = False

    @field_validator("norm")
    @classmethod
    def _norm(cls, v: str) -> str:
        return _registry_check("model.norm", v)

    @field_validator("norm_placement")
    @classmethod
    def _placement(cls, v: str) -> str:
        return _registry_check("model.norm_placement", v)

    @field_validator("position")
    @classmethod
    def _position(cls, v: str) -> str:
        return _registry_check("model.position", v)

    @field_validator("mlp")
    @classmethod
    def _mlp(cls, v: str) -> str:
        return _registry_check("model.mlp", v)

    @field_validator("init")
    @classmethod
    def _init(cls, v: str) -> str:
        return _registry_check("model.init", v)

    @field_validator("n_layers", "d_model", "n_heads", "n_kv_heads", "seq_len")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"must be a positive integer, got {v}")
        return v

    @field_validator("rope_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"must be in (0, 1], got {v}")
        return v

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got d_model/n_heads = {self.head_dim}")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ValueError(f"logit_softcap must be positive or null, got {self.logit_softcap}")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return int(math.ceil(self.ffn_mult * self.d_model / 32) * 32)


class DataConfig(Section):
    """Where the text comes from and how it is split (by document, so train and validation never overlap)."""

    source: str = "default"  # default | hf:NAME[:CONFIG] | a local file, folder or glob
    text_field: str = "text"
    hf_split: str = "train"
    max_docs: int | None = None
    max_bytes: Count | None = None
    val_fraction: float = 0.05
    cache_dir: str | None = None  # default: $BLUEBERRY_CACHE or ~/.cache/blueberry

    @field_validator("max_docs", "max_bytes")
    @classmethod
    def _limit(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"must be positive or null, got {v}")
        return v

    @field_validator("val_fraction")
    @classmethod
    def _frac(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError(f"must be in (0, 1), got {v}")
        return v


class TokenizerConfig(Section):
    """A byte-level BPE trained on the training split, or a saved/pretrained one."""

    vocab_size: int = 24576
    min_frequency: int = 2
    path: str | None = None  # a tokenizer.json
    hf: str | None = None  # Tokenizer.from_pretrained(NAME); needs the hub

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerConfig:
        if self.path and self.hf:
            raise ValueError("set at most one of tokenizer.path and tokenizer.hf")
        if self.vocab_size < 260:
            raise ValueError(
                f"tokenizer.vocab_size must be >= 260 (256 bytes + specials), got {self.vocab_size}"
            )
        return self


class OptimConfig(Section):
    name: str = "muon"
    lr: float = 0.01  # Muon's lr for hidden matrices; with adamw, the lr of everything
    adam_lr: float = 1e-3  # AdamW lr for embeddings, head, gains when name=muon
    weight_decay: float = 0.1
    momentum: float = 0.95
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    head_in_muon: bool = False  # the seed routed the LM head to Muon
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = "original"
    momentum_warmup: float = 0.0  # fraction of the budget over which Muon momentum ramps up
    momentum_start: float = 0.85
    decay_embeddings: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _registry_check("optim.name", v)

    @field_validator("lr", "adam_lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"must be positive, got {v}")
        return v


class ScheduleConfig(Section):
    """LR multiplier as a function of budget progress p in [0, 1]."""

    name: str = "cosine"
    warmup: float = 0.0  # fraction of the budget
    min_lr_ratio: float = 0.1  # end value of cosine/linear/wsd
    decay_frac: float = 0.2  # wsd: last fraction of the budget spent decaying
    milestones: tuple[float, ...] = (0.8, 0.9)  # step: progress points
    gammas: tuple[float, ...] = (0.316, 0.1)  # step: multiplier after each milestone

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _registry_check("schedule.name", v)

    @model_validator(mode="after")
    def _ranges(self) -> ScheduleConfig:
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"schedule.warmup must be in [0, 1), got {self.warmup}")
        if not 0.0 < self.decay_frac <= 1.0:
            raise ValueError(f"schedule.decay_frac must be in (0, 1], got {self.decay_frac}")
        if len(self.milestones) != len(self.gammas):
            raise ValueError("schedule.milestones and schedule.gammas must have the same length")
        return self


class BudgetConfig(Section):
    """The fixed budget every variant gets. Several limits: whichever ends first."""

    time: Duration | None = None  # seconds of training steps (eval, checkpoints, logging excluded)
    tokens: Count | None = None
    steps: int | None = None
    flops: Count | None = None

    @model_validator(mode="after")
    def _some(self) -> BudgetConfig:
        limits = {k: getattr(self, k) for k in ("time", "tokens", "steps", "flops")}
        if all(v is None for v in limits.values()):
            raise ValueError("set at least one of budget.time, budget.tokens, budget.steps, budget.flops")
        for k, v in limits.items():
            if v is not None and v <= 0:
                raise ValueError(f"budget.{k} must be positive, got {v}")
        return self


class TrainConfig(Section):
    seed: int = 0
    micro_batch: int = 16
    grad_accum: int = 4
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: Literal["auto"] | bool = "auto"
    compile_warmup_steps: int = 3
    device: str = "auto"
    log_every: int = 10  # optimizer steps between logged training metrics
    out_dir: str = "runs"
    loss_ceiling: float | None = 50.0  # a loss above this (or non-finite) ends the run as `diverged`
    cpu_peak_tflops: float | None = None  # for MFU on CPU; None leaves MFU empty there
    threads: int | None = None  # torch.set_num_threads; None keeps torch's default

    @field_validator("micro_batch", "grad_accum", "log_every")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"must be a positive integer, got {v}")
        return v


class EvalConfig(Section):
    every: float = 0.1  # evaluate at every multiple of this fraction of the budget, and at the end
    val_tokens: Count = 131072
    batch_size: int = 16

    @field_validator("val_tokens", "batch_size")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"must be positive, got {v}")
        return v

    @field_validator("every")
    @classmethod
    def _every(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"must be in (0, 1], got {v}")
        return v


class TrackingConfig(Section):
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str | None = None


class RunConfig(Section):
    """Everything one training run needs. `config_hash` identifies it (the seed and tracking excluded)."""

    plugins: tuple[str, ...] = ()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    budget: BudgetConfig = BudgetConfig(steps=100)
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _cross(self) -> RunConfig:
        vocab = self.model.vocab_size
        if vocab is not None and self.tokenizer.path is None and self.tokenizer.hf is None:
            if vocab < self.tokenizer.vocab_size:
                raise ValueError(
                    f"model.vocab_size ({vocab}) is smaller than tokenizer.vocab_size ({self.tokenizer.vocab_size})"
                )
        return self

    @property
    def config_hash(self) -> str:
        return config_hash(self)

    def with_vocab(self, vocab_size: int) -> RunConfig:
        """The same config with model.vocab_size filled in from the tokenizer."""
        return self.model_copy(update={"model": self.model.model_copy(update={"vocab_size": vocab_size})})

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def config_hash(cfg: RunConfig) -> str:
    """sha256 of the canonical JSON of the resolved config, without train.seed and tracking.

    Leaving the seed out makes every seed of a variant share one hash, so runs are identified by
    (config_hash, seed) and grouped by config_hash.
    """
    d = cfg.to_dict()
    d["train"].pop("seed")
    d.pop("tracking")
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# Loading: YAML files with base:/preset: inheritance, dotted overrides, plugins.


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_raw(
    data: dict[str, Any], origin: Path | None = None, _seen: tuple[Path, ...] = ()
) -> dict[str, Any]:
    """Expand `base:` (a path relative to the file) and `preset:` (a name) recursively; later keys win."""
    data = dict(data)
    here = origin.parent if origin else Path.cwd()
    where = str(origin) if origin else "config"
    reject_empty_budget(data, where)
    merged: dict[str, Any] = {}
    if "preset" in data:
        name = data.pop("preset")
        if not isinstance(name, str) or not (PRESET_DIR / f"{name}.yaml").is_file():
            raise ConfigError(
                f"{where}: preset: unknown preset {name!r}; available: {', '.join(preset_names())}"
            )
        p = PRESET_DIR / f"{name}.yaml"
        merged = deep_merge(merged, resolve_raw(read_yaml(p), p, _seen + (p,)))
    if "base" in data:
        rel = data.pop("base")
        if not isinstance(rel, str):
            raise ConfigError(f"{where}: base: expected a file path, got {rel!r}")
        p = (here / rel).resolve()
        if p in _seen:
            chain = " -> ".join(str(s) for s in _seen + (p,))
            raise ConfigError(f"{where}: base: inheritance cycle: {chain}")
        if not p.is_file():
            raise ConfigError(f"{where}: base: file not found: {p}")
        merged = deep_merge(merged, resolve_raw(read_yaml(p), p, _seen + (p,)))
    return deep_merge(merged, expand_dotted(data))


def expand_dotted(data: Mapping[str, Any]) -> dict[str, Any]:
    """{"model.qk_norm": False} -> {"model": {"qk_norm": False}} (nested mappings are merged)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, Mapping):
            v = expand_dotted(v)
        parts = str(k).split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{k}: conflicts with a scalar value set for {p}")
        leaf = parts[-1]
        if isinstance(v, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = deep_merge(node[leaf], v)
        else:
            node[leaf] = v
    return out


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """["model.qk_norm=false", "budget.time=2m"] -> nested dict; values parsed as YAML scalars."""
    flat: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. model.qk_norm=false")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            flat[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            flat[key] = raw
    out = expand_dotted(flat)
    reject_empty_budget(out, "--set")
    return out


def reject_empty_budget(data: Mapping[str, Any], where: str) -> None:
    """An explicit `budget: {}` or `budget: null` is an error, never a silent fall-back to an inherited or
    default budget: the budget is what every variant is compared under."""
    if "budget" in data and (data["budget"] is None or data["budget"] == {}):
        raise ConfigError(
            f"{where}: budget: empty; set at least one of budget.time, budget.tokens, budget.steps, "
            "budget.flops, e.g. budget: {time: 2m24s}"
        )


def check_paths_exist(overrides: Mapping[str, Any], model: type[BaseModel] = None, prefix: str = "") -> None:
    """Reject a `--set` whose dotted path is not a field of RunConfig (before any other error)."""
    model = model or RunConfig
    for k, v in overrides.items():
        path = f"{prefix}{k}"
        if k not in model.model_fields:
            allowed = ", ".join(sorted(model.model_fields))
            raise ConfigError(
                f"--set {path}: no such config key; allowed under {prefix[:-1] or 'top level'}: {allowed}"
            )
        ann = model.model_fields[k].annotation
        if isinstance(v, Mapping) and isinstance(ann, type) and issubclass(ann, BaseModel):
            check_paths_exist(v, ann, f"{path}.")


def import_plugins(names: Any, where: str = "config") -> tuple[str, ...]:
    """Import exactly the modules the user listed, so their @register decorators run."""
    if names is None:
        return ()
    if isinstance(names, str) or not isinstance(names, list | tuple):
        raise ConfigError(f"{where}: plugins: expected a list of module names, got {names!r}")
    for name in names:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", name):
            raise ConfigError(f"{where}: plugins: {name!r} is not a module name")
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any import failure is the user's plugin's problem
            raise ConfigError(f"{where}: plugins: cannot import {name!r}: {type(e).__name__}: {e}") from None
    return tuple(names)


def format_validation_error(e: ValidationError, where: str) -> str:
    """The first pydantic error as one line: `where: dotted.key: message (got value)`."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
        parent = _section_for(err["loc"][:-1])
        if parent is not None:
            msg += f"; allowed: {', '.join(sorted(parent.model_fields))}"
    got = err.get("input")
    shown = (
        ""
        if err["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) or repr(got) in msg
        else f" (got {got!r})"
    )
    more = f" [+{len(e.errors()) - 1} more]" if len(e.errors()) > 1 else ""
    return f"{where}: {loc or 'config'}: {msg}{shown}{more}"


def _section_for(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return None
        model = field.annotation
    return model


def build_config(raw: Mapping[str, Any], where: str = "config") -> RunConfig:
    """Validate an already-resolved dict (no base/preset keys) into a RunConfig."""
    raw = dict(raw)
    reject_empty_budget(raw, where)
    import_plugins(raw.get("plugins"), where)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, where)) from None


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    data: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Load a RunConfig from a YAML file and/or a dict, then apply `--set KEY=VALUE` overrides."""
    where = str(path) if path else "config"
    raw = read_yaml(path) if path else {}
    if data:
        raw = deep_merge(raw, dict(data))
    resolved = resolve_raw(raw, Path(path).resolve() if path else None)
    over = parse_overrides(overrides)
    check_paths_exist(over)
    return build_config(deep_merge(resolved, over), where)


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
