"""The training loop: one run of one config under a fixed budget, honest numbers, resumable.

Read top to bottom: set up (devices, data, model, optimizer) -> resume or warm up -> train until the
budget is spent, evaluating and checkpointing at fixed points of progress -> final result.
The trainer wires components; it owns none of them (model, data, optimizers, schedules live elsewhere).
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from blueberry.checkpoint import find_checkpoint, save_checkpoint
from blueberry.config import RunConfig, dump_yaml
from blueberry.data import TokenBatcher, prepare, val_windows
from blueberry.errors import BlueberryError
from blueberry.model import build_model, count_params, flops_per_token, matmul_params
from blueberry.runinfo import run_info
from blueberry.track import NullTracker, flatten_params
from blueberry.train import distributed as D
from blueberry.train.budget import Budget, Usage
from blueberry.train.metrics import mfu, peak_flops, peak_memory_mb
from blueberry.train.optim import build_optimizer, routing_table
from blueberry.train.progress import ProgressView
from blueberry.train.schedule import lr_multiplier


@dataclass
class RunResult:
    status: str  # "finished" | "diverged"
    metrics: dict[str, float]
    run_dir: Path
    checkpoint: Path | None  # the best checkpoint (lowest val_loss)
    steps: int
    tokens_seen: int
    train_time_s: float
    wall_time_s: float


@dataclass
class TrainState:
    """Everything besides weights/optimizer that a resumed run needs to continue exactly."""

    used: Usage = field(default_factory=Usage)
    best_val_loss: float = math.inf
    next_eval: int = 1  # index k of the next evaluation point k * eval.every
    status: str = "running"
    final_metrics: dict[str, float] = field(default_factory=dict)
    wall_time_s: float = 0.0  # wall time of earlier processes of this run (resume) up to the last checkpoint


class LocalLog:
    """Every logged metric also goes to `run_dir/metrics.jsonl` (rank 0): a record no tracker outage can lose."""

    def __init__(self, tracker, path: Path | None):
        self.tracker, self.path = tracker, path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.tracker.log_metrics(metrics, step)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")


# ---- choices that depend on the machine -----------------------------------------------------------------


def resolve_device(pref: str, d: D.Dist) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise BlueberryError("train.device: 'cuda' requested but no CUDA device is available")
        return torch.device("cuda", d.local_rank)
    return torch.device(pref)


def resolve_precision(pref: str, device: torch.device) -> str:
    """auto: bf16 on CUDA when supported, fp16 + GradScaler otherwise (T4), fp32 on CPU."""
    if pref != "auto":
        if pref == "fp16" and device.type == "cpu":
            raise BlueberryError("train.precision: fp16 is not supported on CPU; use fp32 or bf16")
        return pref
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def resolve_compile(pref: str | bool, device: torch.device) -> bool:
    return device.type == "cuda" if pref == "auto" else bool(pref)


def autocast_for(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- evaluation -----------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, xs, ys, token_bytes, batch_size, amp, d: D.Dist, device) -> dict[str, float]:
    """Loss, perplexity, top-1 accuracy and bits per byte on the fixed validation windows (sharded by rank)."""
    was_training = model.training
    model.eval()
    nll = correct = count = nbytes = 0.0
    idx = torch.arange(d.rank, xs.size(0), d.world_size)
    for chunk in idx.split(batch_size):
        x = xs[chunk].to(device, non_blocking=True)
        y = ys[chunk].to(device, non_blocking=True)
        with amp:
            logits = model(x)
        logits = logits.float()
        nll += F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += y.numel()
        nbytes += float(token_bytes[ys[chunk]].sum())
    nll, correct, count, nbytes = D.all_reduce_sum(d, [nll, correct, count, nbytes], device)
    model.train(was_training)
    loss = nll / count
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 50.0)),
        "val_acc": correct / count,
        "val_bpb": nll / (math.log(2) * nbytes),
    }


# ---- the run --------------------------------------------------------------------------------------------


def train(cfg: RunConfig, tracker=None, run_dir: str | Path | None = None, progress: bool = True) -> RunResult:
    """Train `cfg` until its budget is spent; resume from `run_dir/checkpoints/last` if it exists."""
    wall_start = time.perf_counter()
    d = D.init_distributed(cfg.train.device)
    tracker = tracker if (tracker is not None and d.is_main) else NullTracker()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device, d)
    run_dir = Path(run_dir or Path(cfg.train.out_dir) / f"{cfg.config_hash}-seed{cfg.train.seed}")
    ckpt_dir = run_dir / "checkpoints"
    log = LocalLog(tracker, run_dir / "metrics.jsonl" if d.is_main else None)

    # Data: rank 0 prepares the cache, the others then read it.
    if d.is_main:
        data = prepare(cfg, progress=progress)
    D.barrier(d)
    if not d.is_main:
        data = prepare(cfg, progress=False)
    if cfg.model.vocab_size is None:
        cfg = cfg.with_vocab(data.vocab_size)
    val_x, val_y = val_windows(data.val_tokens, cfg.model.seq_len)
    token_bytes = torch.from_numpy(data.token_bytes)

    # Model, optimizer, precision.
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    sizes = count_params(model)
    fpt = flops_per_token(cfg.model, matmul_params(model))
    precision = resolve_precision(cfg.train.precision, device)
    amp = autocast_for(device, precision)
    optimizer = build_optimizer(model, cfg.optim, device.type)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    t = cfg.train
    batcher = TokenBatcher(data.train_tokens, cfg.model.seq_len, t.micro_batch, t.seed, d.rank, device, d.world_size)
    budget = Budget(cfg.budget, t.micro_batch * t.grad_accum * cfg.model.seq_len * d.world_size, fpt)
    peak = peak_flops(device, precision, t.cpu_peak_tflops)
    state = TrainState()

    # Resume from the last good checkpoint, if any.
    last = find_checkpoint(ckpt_dir / "last")
    if last is not None:
        if last.meta["config_hash"] != cfg.config_hash:
            raise BlueberryError(f"{run_dir}: holds a checkpoint of a different config; use another run dir")
        if last.meta["world_size"] != d.world_size:
            raise BlueberryError(f"{run_dir}: checkpoint was written by {last.meta['world_size']} processes, not {d.world_size}")
        model.load_state_dict(last.model_state(), strict=False)
        extra = last.optimizer_state()
        optimizer.load_state_dict(extra["optimizer"])
        if scaler is not None and extra.get("scaler"):
            scaler.load_state_dict(extra["scaler"])
        torch.set_rng_state(extra["torch_rng"])
        batcher.load_state_dict(last.meta["batchers"][d.rank])
        s = last.meta["state"]
        state = TrainState(Usage(**s["used"]), s["best_val_loss"], s["next_eval"], s["status"], s["final_metrics"], s["wall_time_s"])
    else:
        tracker.log_params({**flatten_params(cfg.to_dict()), "params": sizes["total"], "params_non_embedding": sizes["non_embedding"]})
        tracker.log_text(dump_yaml(cfg), "config.yaml")
        tracker.log_text(routing_table(optimizer.routes), "routing_table.txt")
    tracker.set_tags({**run_info(device), "precision": precision, "world_size": str(d.world_size)})
    if d.is_main and last is not None:
        print(f"resuming {run_dir} at step {state.used.steps}", file=sys.stderr, flush=True)
    elif d.is_main and progress:
        print(routing_table(optimizer.routes))

    # Compile and DDP wrap the same module; eval always uses the plain one.
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if d.enabled else None
    step_model = ddp or model
    if resolve_compile(t.compile, device):
        step_model = torch.compile(step_model)

    def train_step() -> tuple[torch.Tensor, torch.Tensor]:
        loss_sum = torch.zeros((), device=device)
        for micro in range(t.grad_accum):
            x, y = batcher.next()
            skip_sync = ddp is not None and micro < t.grad_accum - 1
            with ddp.no_sync() if skip_sync else nullcontext(), amp:
                _, loss = step_model(x, y)
            loss_sum += loss.detach()
            scaled = loss / t.grad_accum
            (scaler.scale(scaled) if scaler else scaled).backward()
        if scaler is not None:
            for opt in optimizer.optimizers:
                scaler.unscale_(opt)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler is not None:
            for opt in optimizer.optimizers:
                scaler.step(opt)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum / t.grad_accum, grad_norm

    # With compile, run a few untimed steps to compile, then restore model, optimizer and data state.
    if resolve_compile(t.compile, device) and state.used.steps == 0 and t.compile_warmup_steps > 0:
        snapshot = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), batcher.state_dict())
        scaler_snap = copy.deepcopy(scaler.state_dict()) if scaler else None
        for _ in range(t.compile_warmup_steps):
            train_step()
        _sync(device)
        model.load_state_dict(snapshot[0])
        optimizer.load_state_dict(snapshot[1])
        batcher.load_state_dict(snapshot[2])
        if scaler is not None:
            scaler.load_state_dict(scaler_snap)

    wall_offset = state.wall_time_s

    def checkpoint(metrics: dict[str, float] | None) -> None:
        """Save `last` (and `best` when val_loss improved); collective, rank 0 writes."""
        state.wall_time_s = wall_offset + time.perf_counter() - wall_start
        batchers = D.gather_objects(d, batcher.state_dict())
        if not d.is_main:
            return
        meta = {"state": asdict(state), "batchers": batchers, "world_size": d.world_size, "precision": precision}
        extra = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else {}, "torch_rng": torch.get_rng_state()}
        save_checkpoint(ckpt_dir / "last", model, cfg, meta, extra, data.tokenizer_path)
        if metrics is not None and metrics["val_loss"] <= state.best_val_loss:
            state.best_val_loss = metrics["val_loss"]
            save_checkpoint(ckpt_dir / "best", model, cfg, {**meta, "state": asdict(state)}, None, data.tokenizer_path)

    start_steps = state.used.steps
    view = ProgressView(budget, enabled=progress and d.is_main)
    window_tokens, window_time, last_dt = 0, 0.0, 0.0
    p = budget.progress(state.used)
    model.train()
    try:
        while state.status == "running" and p < 1.0:
            p_next = budget.progress(state.used, extra_time=last_dt, extra_steps=1)
            lr_mult = lr_multiplier(p_next, cfg.schedule)
            optimizer.set_lr_multiplier(lr_mult)
            if cfg.optim.momentum_warmup > 0:
                ramp = min(1.0, p_next / cfg.optim.momentum_warmup)
                optimizer.set_momentum(cfg.optim.momentum_start + ramp * (cfg.optim.momentum - cfg.optim.momentum_start))

            _sync(device)
            t0 = time.perf_counter()
            loss, grad_norm = train_step()
            _sync(device)
            # A synchronous DDP step lasts as long as its slowest rank: every rank books that, so all agree.
            last_dt = D.all_reduce_max(d, time.perf_counter() - t0, device)

            state.used.steps += 1
            state.used.tokens += budget.tokens_per_step
            state.used.train_time_s += last_dt
            window_tokens += budget.tokens_per_step
            window_time += last_dt
            p = budget.progress(state.used)
            at_eval = p >= 1.0 or p >= state.next_eval * cfg.eval.every - 1e-9

            if state.used.steps % t.log_every == 0 or at_eval:  # the only host syncs of the loop
                loss_v = D.all_reduce_sum(d, [loss.item()], device)[0] / d.world_size
                tps = window_tokens / window_time
                m = {
                    "train_loss": loss_v,
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": float(grad_norm),
                    "tokens_per_sec": tps,
                    "peak_mem_mb": peak_memory_mb(device),
                    "tokens_seen": state.used.tokens,
                    "train_time_s": state.used.train_time_s,
                }
                u = mfu(fpt, tps / d.world_size, peak)
                if u is not None:
                    m["mfu"] = u
                log.log_metrics(m, state.used.steps)
                view.update(state.used, loss_v, m["lr"], tps)
                window_tokens, window_time = 0, 0.0
                if not math.isfinite(loss_v) or (t.loss_ceiling is not None and loss_v > t.loss_ceiling):
                    state.status = "diverged"

            if at_eval or state.status == "diverged":
                while state.next_eval * cfg.eval.every <= p + 1e-9:
                    state.next_eval += 1
                metrics = evaluate(model, val_x, val_y, token_bytes, cfg.eval.batch_size, amp, d, device)
                metrics.update(tokens_seen=state.used.tokens, train_time_s=state.used.train_time_s, progress=p)
                log.log_metrics(metrics, state.used.steps)
                view.note_eval(metrics)
                if not math.isfinite(metrics["val_loss"]):
                    state.status = "diverged"
                if p >= 1.0 and state.status == "running":
                    state.status = "finished"
                if state.status != "running":
                    state.final_metrics = _final(metrics, state, sizes, m)
                checkpoint(metrics if math.isfinite(metrics["val_loss"]) else None)
    finally:
        view.close()

    if d.is_main and state.status == "finished" and state.used.steps > start_steps:  # not for a no-op resume
        tracker.log_artifact(data.tokenizer_path)
        tracker.log_text(sample_text(model, data), "sample.txt")
    final = dict(state.final_metrics)
    final["wall_time_s"] = wall_offset + time.perf_counter() - wall_start
    best = ckpt_dir / "best"
    D.cleanup(d)
    return RunResult(
        status=state.status,
        metrics=final,
        run_dir=run_dir,
        checkpoint=best if (best / "meta.json").is_file() else None,
        steps=state.used.steps,
        tokens_seen=state.used.tokens,
        train_time_s=state.used.train_time_s,
        wall_time_s=final["wall_time_s"],
    )


SAMPLE_PROMPT = "Mr. Speaker, the state of the Union"


def sample_text(model, data, prompt: str = SAMPLE_PROMPT, new_tokens: int = 48) -> str:
    """A short sample from the trained model, logged with every run: a sanity check a loss cannot give."""
    from blueberry.generate import generate

    tok = data.load_tokenizer()
    ids = [data.eot_id] + tok.encode(prompt).ids
    was_training = model.training
    model.eval()
    out = generate(model, ids, max_new_tokens=new_tokens, temperature=0.8, top_k=50, seed=0, eot_id=data.eot_id)[0]
    model.train(was_training)
    return prompt + tok.decode(out)


def _final(eval_metrics: dict[str, float], state: TrainState, sizes: dict[str, int], train_metrics: dict[str, float]) -> dict[str, float]:
    out = {k: float(v) for k, v in eval_metrics.items()}
    for k in ("train_loss", "tokens_per_sec", "mfu", "peak_mem_mb"):
        if k in train_metrics:
            out[k] = float(train_metrics[k])
    out.update(
        steps=float(state.used.steps),
        tokens_seen=float(state.used.tokens),
        train_time_s=state.used.train_time_s,
        params=float(sizes["total"]),
        params_non_embedding=float(sizes["non_embedding"]),
    )
    return out
