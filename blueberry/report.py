"""Markdown reports of an ablation, built only from the tracking store.

Reading everything back from MLflow (never from the runner's memory) means a report can be rewritten at
any time (`--report-only`), covers runs from earlier invocations, and shows exactly what was recorded.

Statistics: per variant, mean ± sample std over seeds of the final metrics; against the baseline, the
difference of means with a 95% Welch confidence interval and Welch's t-test p-value (unequal variances,
since a variant may well change the seed-to-seed spread). Diverged runs are counted and excluded from
the means. With fewer than 2 seeds on either side there is no test, and the report says so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from blueberry.checkpoint import atomic_write_text

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from blueberry.ablation import AblationSpec

ALPHA = 0.05
FINAL_METRICS = ("val_loss", "val_bpb", "val_ppl", "val_acc")
DASH = "—"


# ---------------------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True)
class Comparison:
    """variant minus baseline, with a Welch confidence interval and p-value."""

    diff: float
    ci_low: float
    ci_high: float
    p: float
    df: float
    n_baseline: int
    n_variant: int


def welch(baseline: Sequence[float], variant: Sequence[float], confidence: float = 0.95) -> Comparison | None:
    """Difference of means (variant - baseline) with its Welch CI and two-sided p; None under 2 seeds a side."""
    from scipy import stats

    a, b = np.asarray(baseline, dtype=float), np.asarray(variant, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return None
    diff = float(b.mean() - a.mean())
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:  # identical results within each side: the difference is exact
        return Comparison(diff, diff, diff, 1.0 if diff == 0 else 0.0, math.inf, len(a), len(b))
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    p = float(stats.ttest_ind(b, a, equal_var=False).pvalue)
    return Comparison(diff, diff - half, diff + half, p, float(df), len(a), len(b))


def verdict(cmp: Comparison | None, alpha: float = ALPHA) -> str:
    """For a lower-is-better metric (loss, bits per byte)."""
    if cmp is None:
        return "n/a (need >= 2 seeds)"
    if cmp.p < alpha:
        return "better" if cmp.diff < 0 else "worse"
    return "no significant difference"


# ---------------------------------------------------------------------------------------------------------
# Reading the store


@dataclass(frozen=True)
class ReportScope:
    """Which runs belong to a report: the spec's variants, identified by config hash (any seed)."""

    name: str
    baseline: str
    variants: dict[str, str]  # variant -> config_hash, in spec order
    quick: bool = False

    @classmethod
    def of(cls, spec: AblationSpec) -> ReportScope:
        return cls(spec.name, spec.baseline, spec.hashes(), spec.quick)


@dataclass
class RunRecord:
    run_id: str
    variant: str
    seed: int
    status: str  # the `status` tag: finished | diverged | failed | killed | running
    start_time: int
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.status in ("finished", "diverged")

    def number(self, key: str) -> float | None:
        """A value from metrics, else params, else tags (the trainer may record counts in any of them)."""
        for source in (self.metrics, self.params, self.tags):
            if key in source:
                try:
                    v = float(source[key])
                except (TypeError, ValueError):
                    continue
                if math.isfinite(v):
                    return v
        return None

    @property
    def tokens_per_sec(self) -> float | None:
        tokens, secs = self.number("tokens_seen"), self.number("train_time_s")
        if tokens and secs:
            return tokens / secs
        return self.number("tokens_per_sec")


def _search_all(client: MlflowClient, experiment_id: str, filter_string: str) -> list:
    out, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=filter_string, max_results=1000, page_token=token
        )
        out.extend(page)
        token = page.token
        if not token:
            return out


def _status(run) -> str:
    tag = run.data.tags.get("status")
    if tag:
        return tag
    return {"FINISHED": "finished", "FAILED": "failed", "KILLED": "killed"}.get(run.info.status, "running")


def collect_runs(client: MlflowClient, experiment_id: str, scope: ReportScope) -> list[RunRecord]:
    """Every child run of the scope's variants, with one complete run per (variant, seed) at most."""
    records: list[RunRecord] = []
    for variant, h in scope.variants.items():
        runs = _search_all(client, experiment_id, f"tags.config_hash = '{h}'")
        runs.sort(key=lambda r: r.info.start_time or 0, reverse=True)
        have_complete: set[int] = set()
        for run in runs:
            try:
                seed = int(run.data.tags.get("seed", ""))
            except ValueError:
                continue
            rec = RunRecord(
                run.info.run_id, variant, seed, _status(run), run.info.start_time or 0,
                dict(run.data.metrics), dict(run.data.params), dict(run.data.tags),
            )  # fmt: skip
            if rec.complete:
                if seed in have_complete:  # never expected; the newest complete run wins
                    continue
                have_complete.add(seed)
            records.append(rec)
    records.sort(key=lambda r: (list(scope.variants).index(r.variant), r.seed, -r.start_time))
    return records


def eval_curve(
    client: MlflowClient, run_id: str, x_key: str, y_key: str = "val_loss"
) -> list[tuple[float, float]]:
    """(x, y) at each eval point: y's history joined with x's value logged at the same optimizer step."""
    ys = _latest_per_step(client.get_metric_history(run_id, y_key))
    xs = _latest_per_step(client.get_metric_history(run_id, x_key))
    return [(xs[step], y) for step, y in sorted(ys.items()) if step in xs]


def _latest_per_step(history: Iterable) -> dict[int, float]:
    """One value per step: a resumed run may have logged the same step twice; the newer one counts."""
    best: dict[int, tuple[int, float]] = {}
    for m in history:
        if m.step not in best or m.timestamp >= best[m.step][0]:
            best[m.step] = (m.timestamp, m.value)
    return {step: v for step, (_, v) in best.items()}


# ---------------------------------------------------------------------------------------------------------
# Summaries


@dataclass
class VariantSummary:
    name: str
    finished: list[RunRecord]
    diverged: list[RunRecord]
    incomplete: list[RunRecord]

    def values(self, key: str) -> list[float]:
        return [v for r in self.finished if (v := r.number(key)) is not None]

    def per_run(self, fn: Callable[[RunRecord], float | None]) -> list[float]:
        return [v for r in self.finished if (v := fn(r)) is not None]


def summarize(records: Sequence[RunRecord], scope: ReportScope) -> dict[str, VariantSummary]:
    out = {}
    for v in scope.variants:
        recs = [r for r in records if r.variant == v]
        out[v] = VariantSummary(
            v,
            [r for r in recs if r.status == "finished"],
            [r for r in recs if r.status == "diverged"],
            [r for r in recs if not r.complete],
        )
    return out


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def _std(xs: Sequence[float]) -> float | None:
    return float(np.std(xs, ddof=1)) if len(xs) >= 2 else None


def fmt_mean_std(xs: Sequence[float], digits: int = 4) -> str:
    if not xs:
        return DASH
    m, s = _mean(xs), _std(xs)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if s is not None else f"{m:.{digits}f}"


def fmt_num(x: float | None, digits: int = 4) -> str:
    return DASH if x is None else f"{x:.{digits}f}"


def human(n: float | None) -> str:
    """1234567 -> 1.23M."""
    if n is None:
        return DASH
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.4g}"


def fmt_int(x: float | None) -> str:
    return DASH if x is None else f"{round(x):,}"


def fmt_signed(x: float, digits: int = 4) -> str:
    return f"{x:+.{digits}f}"


def fmt_p(p: float) -> str:
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def fmt_duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub-flavoured markdown table. `align` is one character per column: l, r or c."""
    align = align or "l" * len(headers)
    cells = [[str(c).replace("|", "\\|").replace("\n", " ") for c in row] for row in rows]
    widths = [max(3, len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    rule = {
        "l": lambda w: "-" * w,
        "r": lambda w: "-" * (w - 1) + ":",
        "c": lambda w: ":" + "-" * (w - 2) + ":",
    }

    def line(items: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(s.rjust(w) if a == "r" else s.ljust(w) for s, w, a in zip(items, widths, align))
            + " |"
        )

    return "\n".join(
        [line(list(headers)), "| " + " | ".join(rule[a](w) for a, w in zip(align, widths)) + " |"]
        + [line(r) for r in cells]
    )


# ---------------------------------------------------------------------------------------------------------
# The report


def _unique(records: Iterable[RunRecord], get: Callable[[RunRecord], str | None]) -> str:
    vals = sorted({v for r in records if (v := get(r))})
    return ", ".join(vals) if vals else "unknown"


def _budget_text(r: RunRecord) -> str | None:
    parts = []
    for k in ("time", "tokens", "steps", "flops"):
        v = r.params.get(f"budget.{k}")
        if v in (None, "None", ""):
            continue
        try:
            x = float(v)
        except ValueError:
            parts.append(f"{k} {v}")
            continue
        parts.append(f"time {fmt_duration(x)}" if k == "time" else f"{k} {human(x)}")
    return ", ".join(parts) or None


def _commit_text(r: RunRecord) -> str | None:
    c = r.tags.get("git_commit")
    if not c:
        return None
    return c[:12] + (" (dirty)" if r.tags.get("git_dirty") == "true" else "")


def _tokenizer_text(r: RunRecord) -> str | None:
    p = r.params
    if p.get("tokenizer.path") not in (None, "None", ""):
        return f"file {p['tokenizer.path']}"
    if p.get("tokenizer.hf") not in (None, "None", ""):
        return f"pretrained {p['tokenizer.hf']}"
    if "tokenizer.vocab_size" in p:
        return f"byte-level BPE, vocab {p['tokenizer.vocab_size']}"
    return None


def _commands(client: MlflowClient, experiment_id: str, name: str, records: Sequence[RunRecord]) -> list[str]:
    """The commands of the invocations that produced these runs (their parent runs), oldest first."""
    parents = {r.tags.get(k) for r in records for k in ("mlflow.parentRunId", "resumed_by")} - {None, ""}
    found = []
    for pid in parents:
        try:
            run = client.get_run(pid)
        except Exception:  # noqa: BLE001 - a deleted parent only costs the header a line
            continue
        if run.data.tags.get("command"):
            found.append((run.info.start_time or 0, run.data.tags["command"]))
    if not found:  # e.g. runs made by hand: fall back to the latest invocation of this ablation
        latest = client.search_runs(
            [experiment_id],
            filter_string=f"tags.ablation = '{name}' and tags.kind = 'ablation'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        found = [(0, latest[0].data.tags["command"])] if latest and latest[0].data.tags.get("command") else []
    return list(dict.fromkeys(cmd for _, cmd in sorted(found)))


def config_diff(base: RunRecord | None, other: RunRecord | None) -> list[tuple[str, str, str]]:
    """(dotted key, baseline value, variant value) for every config param that differs."""
    if base is None or other is None:
        return []
    from blueberry.config import RunConfig

    sections = set(RunConfig.model_fields) - {"tracking"}  # config keys only, not e.g. params counts
    keys = sorted(set(base.params) | set(other.params))
    return [
        (k, base.params.get(k, DASH), other.params.get(k, DASH))
        for k in keys
        if k.split(".")[0] in sections and k != "train.seed" and base.params.get(k) != other.params.get(k)
    ]


def _representative(s: VariantSummary) -> RunRecord | None:
    for group in (s.finished, s.diverged, s.incomplete):
        for r in group:
            if r.params:
                return r
    return None


LOAD_SPREAD = 1.25  # seeds of one variant do identical work: a larger throughput spread is the machine


def throughput_warning(sums) -> list[str]:
    """A warning when seeds of the same variant ran at very different speeds.

    They do the same computation, so only the machine (other jobs, thermal limits) can explain it; under a
    time budget the slower seeds then see fewer tokens and the comparison measures load, not the variant.
    """
    worst = None
    for name, s in sums.items():
        tps = [v for v in s.per_run(lambda r: r.tokens_per_sec) if v]
        if len(tps) >= 2 and max(tps) / min(tps) > LOAD_SPREAD:
            spread = max(tps) / min(tps)
            if worst is None or spread > worst[1]:
                worst = (name, spread, min(tps), max(tps))
    if worst is None:
        return []
    name, spread, lo, hi = worst
    return [
        f"**Warning: unsteady machine.** Seeds of `{name}` ran at {human(lo)} to {human(hi)} tokens/s "
        f"({spread:.1f}x apart) for the same work. Under a time budget the slower runs saw fewer tokens, so "
        "differences may reflect machine load rather than the variants: re-run on an otherwise idle machine, "
        "or use a token or step budget.",
        "",
    ]


def render_report(
    scope: ReportScope,
    records: Sequence[RunRecord],
    *,
    experiment: str = "",
    commands: Sequence[str] = (),
    figures: Sequence[tuple[str, str]] = (),
    now: datetime | None = None,
) -> str:
    """The markdown text. `figures` are (title, relative path) pairs to embed."""
    sums = summarize(records, scope)
    complete = [r for r in records if r.complete]
    anyrun = complete or list(records)
    now = now or datetime.now(timezone.utc)
    base = sums[scope.baseline]
    primary = "val_bpb" if any(s.values("val_bpb") for s in sums.values()) else "val_loss"

    lines = [f"# Ablation: {scope.name}" + (" (quick, CPU scale)" if scope.quick else ""), ""]
    header = [
        ("date", now.strftime("%Y-%m-%d %H:%M UTC")),
        ("git commit", _unique(anyrun, _commit_text)),
        ("hardware", _unique(anyrun, lambda r: r.tags.get("device"))),
        ("torch / CUDA", _unique(anyrun, lambda r: r.tags.get("torch_version")) + " / "
         + _unique(anyrun, lambda r: r.tags.get("cuda_version"))),
        ("budget (each run)", _unique(anyrun, _budget_text)),
        ("dataset", _unique(anyrun, lambda r: r.params.get("data.source"))),
        ("tokenizer", _unique(anyrun, _tokenizer_text)),
        ("seeds", ", ".join(str(s) for s in sorted({r.seed for r in complete})) or "none finished yet"),
        ("baseline", f"`{scope.baseline}`"),
        ("MLflow experiment", f"`{experiment}`" if experiment else "unknown"),
        ("reproduce", " then ".join(f"`{c}`" for c in commands) if commands else "unknown"),
    ]  # fmt: skip
    lines += [f"- **{k}**: {v}" for k, v in header] + [""]

    lines += ["## Results", ""]
    rows = []
    for name, s in sums.items():
        mfu = s.values("mfu")
        rows.append([
            f"**{name}**" if name == scope.baseline else name,
            f"{len(s.finished)} / {len(s.diverged)}",
            fmt_mean_std(s.values("val_loss")),
            fmt_mean_std(s.values("val_bpb")),
            fmt_num(_mean(s.values("val_ppl")), 2),
            fmt_num(_mean(s.values("val_acc"))),
            human(_mean(s.values("tokens_seen"))),
            human(_mean(s.values("steps"))),
            human(_mean(s.per_run(lambda r: r.tokens_per_sec))),
            f"{100 * _mean(mfu):.1f}%" if mfu else DASH,
            fmt_int(_mean(s.values("params"))),
        ])  # fmt: skip
    lines.append(markdown_table(
        ["variant", "runs (finished / diverged)", "val_loss", "val_bpb", "val_ppl", "val_acc",
         "tokens seen", "steps", "tokens/s", "MFU", "params"],
        rows, "lrrrrrrrrrr",
    ))  # fmt: skip
    lines += ["", "Mean ± sample std over finished seeds (diverged runs counted, not averaged); MFU as a share "
              "of peak, — where not measured.", ""]  # fmt: skip
    lines += throughput_warning(sums)

    floor_bpb, floor_loss = _std(base.values("val_bpb")), _std(base.values("val_loss"))
    lines += [f"## Against the baseline `{scope.baseline}`", ""]
    if floor_bpb is not None or floor_loss is not None:
        lines += [
            f"**Noise floor**: the baseline's seed-to-seed std is {fmt_num(floor_bpb)} in val_bpb "
            f"({fmt_num(floor_loss)} in val_loss); a single-seed difference smaller than that is "
            "indistinguishable from changing the seed.",
            "",
        ]
    else:
        lines += ["**Noise floor**: unknown (the baseline needs >= 2 finished seeds).", ""]
    rows = []
    for name, s in sums.items():
        if name == scope.baseline:
            continue
        row = [name]
        for key in ("val_bpb", "val_loss"):
            cmp = welch(base.values(key), s.values(key))
            if cmp is None:
                row += [DASH, DASH]
            else:
                row += [
                    f"{fmt_signed(cmp.diff)} [{fmt_signed(cmp.ci_low)}, {fmt_signed(cmp.ci_high)}]",
                    fmt_p(cmp.p),
                ]
        row.append(verdict(welch(base.values(primary), s.values(primary))))
        rows.append(row)
    if rows:
        lines.append(markdown_table(
            ["variant", "Δ val_bpb [95% CI]", "p (val_bpb)", "Δ val_loss [95% CI]", "p (val_loss)", f"verdict ({primary})"],
            rows, "lrrrrl",
        ))  # fmt: skip
        lines += ["", f"Δ = variant − baseline (negative is better); Welch's t-test, α = {ALPHA}.", ""]
    else:
        lines += ["(no other variants)", ""]

    if figures:
        lines += ["## Plots", ""]
        lines += [f"![{title}]({path})" for title, path in figures] + [""]

    lines += ["## Config differences from the baseline", ""]
    base_rep = _representative(base)
    diffs = []
    for name, s in sums.items():
        if name != scope.baseline:
            diffs += [[name, f"`{k}`", a, b] for k, a, b in config_diff(base_rep, _representative(s))]
    if diffs:
        lines.append(markdown_table(["variant", "key", "baseline", "variant value"], diffs))
    else:
        lines.append("(no recorded params to compare)" if base_rep is None else "(none)")
    lines.append("")

    lines += ["## Runs", ""]
    rows = [
        [r.variant, r.seed, r.status, fmt_num(r.number("val_loss")), fmt_num(r.number("val_bpb")),
         human(r.number("steps")), human(r.number("tokens_seen")), f"`{r.run_id}`"]
        for r in records
    ]  # fmt: skip
    if rows:
        lines.append(markdown_table(
            ["variant", "seed", "status", "val_loss", "val_bpb", "steps", "tokens seen", "MLflow run"], rows, "lrlrrrrl"
        ))  # fmt: skip
    else:
        lines.append("(no runs recorded yet)")
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Plots


def _save_figure(fig, path: Path) -> None:
    """Save to a temporary name and rename, so a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _mean_curve(curves: list[list[tuple[float, float]]]):
    """Mean and min-max over seeds on a common x grid (interpolated): seeds of a time budget evaluate at
    slightly different times and token counts, so their points do not line up one to one."""
    curves = [sorted(c) for c in curves if c]
    if not curves:
        return None
    if len(curves) == 1:
        x, y = (np.array(v) for v in zip(*curves[0]))
        return x, y, y, y
    lo, hi = max(c[0][0] for c in curves), min(c[-1][0] for c in curves)
    if hi <= lo:  # no common range: align by eval index instead
        n = min(len(c) for c in curves)
        xs = np.array([[p[0] for p in c[:n]] for c in curves]).mean(0)
        ys = np.array([[p[1] for p in c[:n]] for c in curves])
        return xs, ys.mean(0), ys.min(0), ys.max(0)
    grid = np.linspace(lo, hi, 64)
    ys = np.array([np.interp(grid, [p[0] for p in c], [p[1] for p in c]) for c in curves])
    return grid, ys.mean(0), ys.min(0), ys.max(0)


def plot_figures(
    client: MlflowClient, scope: ReportScope, records: Sequence[RunRecord], out_dir: Path
) -> list[tuple[str, Path]]:
    """Validation loss vs training time and vs tokens (mean over seeds, min-max band), final val_bpb."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    sums = summarize(records, scope)
    made: list[tuple[str, Path]] = []
    for x_key, x_label, fname, scale in (
        ("train_time_s", "training time (s)", "val_loss_vs_time.png", 1.0),
        ("tokens_seen", "tokens seen (M)", "val_loss_vs_tokens.png", 1e-6),
    ):
        fig = Figure(figsize=(6.4, 4.2))
        ax = fig.add_subplot()
        drawn = False
        for name, s in sums.items():
            seeds = [eval_curve(client, r.run_id, x_key) for r in s.finished]
            curve = _mean_curve(seeds)
            if curve is None:
                continue
            x, y, lo, hi = curve
            tag = "baseline, " if name == scope.baseline else ""
            (line,) = ax.plot(x * scale, y, label=f"{name} ({tag}n={len(s.finished)})")
            ax.fill_between(x * scale, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
            for c in seeds:  # every seed's own eval points, faintly
                if c:
                    ax.plot(
                        [p[0] * scale for p in c], [p[1] for p in c], ".", color=line.get_color(), alpha=0.5
                    )
            drawn = True
        if not drawn:
            continue
        ax.set_xlabel(x_label)
        ax.set_ylabel("validation loss")
        ax.set_title(f"{scope.name}: validation loss (mean over seeds, band min-max, dots: evals)")
        ax.grid(alpha=0.3)
        ax.legend()
        _save_figure(fig, out_dir / fname)
        made.append((f"validation loss vs {x_label.split(' (')[0]}", out_dir / fname))

    names = [n for n, s in sums.items() if s.values("val_bpb")]
    if names:
        fig = Figure(figsize=(max(4.0, 1.3 * len(names) + 2), 4.2))
        ax = fig.add_subplot()
        for i, name in enumerate(names):
            vals = sums[name].values("val_bpb")
            ax.errorbar([i], [np.mean(vals)], yerr=[_std(vals) or 0.0], fmt="o", capsize=6, markersize=8)
            ax.scatter([i] * len(vals), vals, color="black", s=12, zorder=3)
        labels = [f"{n}\n(baseline)" if n == scope.baseline else n for n in names]
        ax.set_xticks(range(len(names)), labels, rotation=20 if len(names) > 4 else 0)
        ax.set_ylabel("final val_bpb (mean ± std; dots: seeds)")
        ax.set_title(f"{scope.name}: final validation bits per byte")
        ax.grid(alpha=0.3, axis="y")
        _save_figure(fig, out_dir / "final_val_bpb.png")
        made.append(("final val_bpb per variant", out_dir / "final_val_bpb.png"))
    return made


def write_report(
    client: MlflowClient, experiment_id: str, scope: ReportScope, reports_dir: str | Path = "reports"
) -> Path:
    """reports/<name>.md and reports/<name>/*.png from what the tracking store holds."""
    reports_dir = Path(reports_dir)
    records = collect_runs(client, experiment_id, scope)
    figures = plot_figures(client, scope, records, reports_dir / scope.name)
    exp = client.get_experiment(experiment_id)
    text = render_report(
        scope,
        records,
        experiment=exp.name if exp else experiment_id,
        commands=_commands(client, experiment_id, scope.name, [r for r in records if r.complete]),
        figures=[(title, p.relative_to(reports_dir).as_posix()) for title, p in figures],
    )
    path = reports_dir / f"{scope.name}.md"
    atomic_write_text(path, text)
    return path
