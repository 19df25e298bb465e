"""Training-step throughput of the Blueberry Transformer against Hugging Face Llama at the same shapes.

    python -m benchmarks.train_step [--precision fp32|bf16|both] [--preset blueberry-seed] [--batch 16]
    python -m benchmarks.train_step --ours-only                  # no transformers needed
    python -m benchmarks.train_step --preset tiny --batch 2 --rounds 1 --warmup 1     # a smoke run
    python -m benchmarks.train_step --device cuda --compile --precision bf16          # a GPU

A step is forward + cross-entropy, backward, AdamW step (fused, same hyperparameters for every model)
and zero_grad. Three models (`--models` picks some): `hf-llama` (transformers.LlamaForCausalLM, SDPA
attention), `ours-llama` (our model with Llama's choices: pre-RMSNorm, SwiGLU, full RoPE, untied, no
QK-norm, no embedding scale, standard init) and `ours-seed` (the preset's recipe as is). They run
interleaved, A/B/C in every round after warm-up, and every round also times a large matmul, so the
medians, the per-round ratios ours/HF and the MFU (achieved FLOP/s over the measured matmul peak) all
see the same machine load; the share of CPU time other processes took meanwhile is reported too.
Prints a table, then one JSON line {"bench": "train_step", ...}.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from benchmarks.common import OtherLoad, emit, load_average, matmul_gflops, median, sync, table
from blueberry.config import ModelConfig, load_config, preset_names
from blueberry.errors import BlueberryError, run_cli
from blueberry.model import build_model, flops_per_token, matmul_params

# Our model with Llama's architecture choices: the `ours-llama` variant.
LLAMA_TOGGLES = dict(
    norm="rmsnorm",
    norm_placement="pre",
    mlp="swiglu",
    position="rope",
    rope_fraction=1.0,
    tie_embeddings=False,
    qk_norm=False,
    embed_scale=False,
    init="standard",
    zero_init_outputs=False,
    logit_softcap=None,
    attn_gate=False,
    bias=False,
)
ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)  # fused: CPU and CUDA
MODELS = ("hf-llama", "ours-llama", "ours-seed")
SHAPE_FLAGS = {  # flag -> ModelConfig field
    "layers": "n_layers",
    "d_model": "d_model",
    "heads": "n_heads",
    "kv_heads": "n_kv_heads",
    "d_ff": "d_ff",
    "vocab": "vocab_size",
    "seq_len": "seq_len",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.train_step",
        description=__doc__.splitlines()[0],
        epilog="Shapes come from --preset; --layers/--d-model/... override single fields. "
        "Smoke-test size: --preset tiny --batch 2 --rounds 1 --warmup 1 --peak-size 256.",
    )
    p.add_argument(
        "--preset", default="blueberry-seed", help="model shapes and seed recipe (default %(default)s)"
    )
    for flag in SHAPE_FLAGS:
        p.add_argument(f"--{flag.replace('_', '-')}", type=int, default=None, dest=flag)
    p.add_argument("--batch", type=int, default=16, help="sequences per step (default %(default)s)")
    p.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument(
        "--rounds", type=int, default=5, help="timed rounds; medians over them (default %(default)s)"
    )
    p.add_argument(
        "--steps", type=int, default=1, help="timed steps per model per round (default %(default)s)"
    )
    p.add_argument(
        "--warmup", type=int, default=2, help="untimed steps per model first (default %(default)s)"
    )
    p.add_argument(
        "--peak-size", type=int, default=None, help="n of the n^3 peak matmul (CPU 2048, CUDA 8192)"
    )
    p.add_argument(
        "--ours-only", action="store_true", help="skip Hugging Face Llama (no transformers needed)"
    )
    p.add_argument(
        "--models",
        default=",".join(MODELS),
        help="comma-separated subset of %(default)s (fewer models, less memory)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if args.preset not in preset_names():
        raise BlueberryError(
            f"--preset: unknown preset {args.preset!r}; available: {', '.join(preset_names())}"
        )
    for name in ("batch", "rounds", "steps"):
        if getattr(args, name) < 1:
            raise BlueberryError(f"--{name} must be >= 1")
    if args.warmup < 0:
        raise BlueberryError("--warmup must be >= 0")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.ours_only and "hf-llama" in args.models:
        args.models.remove("hf-llama")
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        raise BlueberryError(f"--models: expected a subset of {','.join(MODELS)}, got {unknown or 'nothing'}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BlueberryError("--device cuda: no CUDA device is available")
    return args


def seed_config(args: argparse.Namespace) -> ModelConfig:
    """The preset's model (vocab from its tokenizer) with the shape flags applied."""
    run = load_config(data={"preset": args.preset})
    fields = {**run.model.model_dump(), "vocab_size": run.tokenizer.vocab_size}
    fields.update({SHAPE_FLAGS[k]: getattr(args, k) for k in SHAPE_FLAGS if getattr(args, k) is not None})
    return ModelConfig(**fields)


def hf_llama(cfg: ModelConfig) -> torch.nn.Module:
    """transformers.LlamaForCausalLM with the shapes of `cfg` (SDPA attention, no bias, untied)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
    )
    hf_cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_cfg)


def hf_flops_per_token(model: torch.nn.Module, cfg: ModelConfig) -> int:
    """Our formula (6 N_matmul + attention) with N_matmul = HF's parameters less the embedding table."""
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    return flops_per_token(cfg, n)


class Runner:
    """One model, its AdamW and a fixed batch; `step()` is one full training step."""

    def __init__(self, name, model, fpt, is_hf, x, y, compile_model):
        self.name, self.fpt, self.is_hf, self.x, self.y = name, fpt, is_hf, x, y
        self.model = model.to(x.device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), **ADAMW)
        self.fwd = torch.compile(self.model) if compile_model else self.model

    def loss(self) -> torch.Tensor:
        if self.is_hf:  # HF's own loss path (float upcast + cross-entropy); shift_labels: no internal shift
            return self.fwd(input_ids=self.x, labels=self.y, shift_labels=self.y).loss
        return self.fwd(self.x, self.y)[1]

    def step(self, amp) -> None:
        with amp:
            loss = self.loss()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with_hf = "hf-llama" in args.models
    if with_hf:
        try:
            import transformers
        except ImportError:
            raise BlueberryError(
                "transformers is not installed: pip install -e '.[bench]', or run with --ours-only"
            ) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    peak_n = args.peak_size or (8192 if device.type == "cuda" else 2048)
    load_before = load_average()

    seed_cfg = seed_config(args)
    llama_cfg = ModelConfig(**{**seed_cfg.model_dump(), **LLAMA_TOGGLES})
    B, T = args.batch, seed_cfg.seq_len
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, seed_cfg.vocab_size, (B, T), generator=gen).to(device)
    y = torch.randint(0, seed_cfg.vocab_size, (B, T), generator=gen).to(device)

    torch.manual_seed(0)
    runners = []
    if with_hf:
        hf = hf_llama(llama_cfg)
        runners.append(Runner("hf-llama", hf, hf_flops_per_token(hf, llama_cfg), True, x, y, args.compile))
    for name, cfg in (("ours-llama", llama_cfg), ("ours-seed", seed_cfg)):
        if name not in args.models:
            continue
        model = build_model(cfg)
        runners.append(
            Runner(name, model, flops_per_token(cfg, matmul_params(model)), False, x, y, args.compile)
        )

    for precision in precisions:
        for r in runners:
            for _ in range(args.warmup):
                r.step(autocast(device, precision))
    sync(device)

    times = {(r.name, p): [] for r in runners for p in precisions}  # seconds per step, one per round
    peaks = {p: [] for p in precisions}
    with OtherLoad() as other:
        for _ in range(args.rounds):
            for precision in precisions:
                peaks[precision].append(
                    matmul_gflops(peak_n, torch.float32 if precision == "fp32" else torch.bfloat16, device)
                )
                for r in runners:
                    amp = autocast(device, precision)
                    sync(device)
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        r.step(amp)
                    sync(device)
                    times[r.name, precision].append((time.perf_counter() - t0) / args.steps)
    load_after = load_average()

    results, rows = [], []
    for precision in precisions:
        peak = median(peaks[precision])
        for r in runners:
            ts = times[r.name, precision]
            tps = B * T / median(ts)
            res = {
                "model": r.name,
                "precision": precision,
                "tokens_per_s": round(tps, 1),
                "tokens_per_s_min": round(B * T / max(ts), 1),
                "tokens_per_s_max": round(B * T / min(ts), 1),
                "step_ms": round(1e3 * median(ts), 1),
                "gflops": round(r.fpt * tps / 1e9, 1),
                "mfu": round(r.fpt * tps / 1e9 / peak, 4),
                "ratio_vs_hf": None,
            }
            if with_hf and r.name != "hf-llama":  # paired per round: both saw the same load
                hf_ts = times["hf-llama", precision]
                res["ratio_vs_hf"] = round(median([h / o for h, o in zip(hf_ts, ts)]), 3)
            results.append(res)
            rows.append(
                [
                    r.name,
                    precision,
                    f"{res['tokens_per_s']:,.0f}",
                    f"{res['tokens_per_s_min']:,.0f}-{res['tokens_per_s_max']:,.0f}",
                    f"{res['step_ms']:,.0f}",
                    f"{res['gflops']:.1f}",
                    f"{peak:.0f}",
                    f"{100 * res['mfu']:.1f}%",
                    "-" if res["ratio_vs_hf"] is None else f"{res['ratio_vs_hf']:.3f}",
                ]
            )

    c = seed_cfg
    print(
        f"{args.preset}: {c.n_layers} layers, d {c.d_model}, heads {c.n_heads}/{c.n_kv_heads}, ffn {c.ffn_dim}, "
        f"vocab {c.vocab_size:,}, batch {B} x {T}; {device.type}, {torch.get_num_threads()} threads, "
        f"compile {args.compile}; {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up"
    )
    headers = ["model", "prec", "tok/s", "min-max", "step ms", "GFLOP/s", "peak", "MFU", "ours/HF"]
    print(table(headers, rows))
    share = "n/a" if other.share is None else f"{100 * other.share:.0f}%"
    print(
        f"load average before {load_before}, after {load_after}; other processes' CPU share while timing {share}"
    )
    emit(
        {
            "bench": "train_step",
            "preset": args.preset,
            "shape": {
                "n_layers": c.n_layers,
                "d_model": c.d_model,
                "n_heads": c.n_heads,
                "n_kv_heads": c.n_kv_heads,
                "d_ff": c.ffn_dim,
                "vocab_size": c.vocab_size,
                "seq_len": T,
                "batch": B,
            },
            "device": device.type,
            "threads": torch.get_num_threads(),
            "compile": args.compile,
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "torch": torch.__version__,
            "transformers": transformers.__version__ if with_hf else None,
            "peak_gflops": {p: round(median(v), 1) for p, v in peaks.items()},
            "results": results,
            "load_avg_before": load_before,
            "load_avg_after": load_after,
            "other_cpu_share": other.share,
        }
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
