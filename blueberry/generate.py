"""Autoregressive generation with a KV cache, a sliding context window and the usual samplers.

The cache path and the no-cache path share one windowing rule (`Decoder`), so the no-cache path is an
exact reference for tests and for the benchmark's speedup number.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from blueberry.model import build_model, count_params

# ---- devices and dtypes --------------------------------------------------------------------------------


def pick_device(name: str = "auto") -> torch.device:
    """`auto` prefers CUDA, then MPS, then the CPU; an explicit name is taken as given."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA where the GPU has it, fp16 on older CUDA GPUs (T4), fp32 elsewhere (CPU, MPS)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def cast_for_inference(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """Move the model and cast its floating parameters (not its buffers) to `dtype`; eval mode.

    `model.to(dtype)` would also round fp32 buffers such as the rotary `inv_freq` to bf16/fp16, which shifts
    every rotary angle by up to ~0.4% of its value; parameters alone is what an autocast-trained model saw.
    """
    model.to(device)
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model.eval()


# ---- logit processing ------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already in the context less likely (CTRL): positive logits / penalty, negative * penalty.

    `seen` is a bool mask over the vocabulary (same trailing shape as `logits`). Dividing a negative
    logit would raise it, i.e. favour the repeat; multiplying lowers it.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits (ties at the k-th value kept too); the rest become -inf."""
    if k is None or k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches p.

    The most likely token is always kept, so p -> 0 becomes greedy rather than an empty distribution.
    """
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@dataclass(frozen=True)
class Sampler:
    """How the next token is chosen from logits. temperature 0 is greedy (argmax)."""

    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def process(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """Penalty, temperature, top-k, top-p, in that order (the order HF transformers uses)."""
        logits = logits.float()
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, self.repetition_penalty)
        if self.temperature == 0:
            return logits
        logits = logits / self.temperature
        return top_p_filter(top_k_filter(logits, self.top_k), self.top_p)

    def choose(
        self, logits: torch.Tensor, seen: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> int:
        """One token id from logits [V]."""
        logits = self.process(logits, seen)
        if self.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))


# ---- decoding -------------------------------------------------------------------------------------------


class Decoder:
    """Next-token logits for a growing token sequence, with or without a KV cache.

    The model sees at most `seq_len` positions (learned position tables have no more rows, and RoPE was
    only trained that far). The window is tokens[start:]; when appending a token would make it longer
    than seq_len, it slides: start jumps so that only the last `keep` tokens remain (default seq_len // 2).
    With the cache, a slide re-prefills those `keep` tokens into a fresh cache at positions 0..keep-1;
    between slides each token costs one single-position forward. Without the cache every step recomputes
    the whole window: the reference the cached path is tested against.
    """

    def __init__(self, model: nn.Module, use_cache: bool = True, keep: int | None = None):
        self.model = model
        self.use_cache = use_cache
        self.seq_len = int(model.cfg.seq_len)
        self.keep = keep if keep is not None else max(1, self.seq_len // 2)
        if not 1 <= self.keep <= self.seq_len:
            raise ValueError(f"keep must be in [1, seq_len={self.seq_len}], got {self.keep}")
        ref = next(model.parameters())
        self.device = ref.device
        self.tokens: list[int] = []
        self.start = 0
        self.cache = None
        self.slides = 0

    def _forward(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.model(x, cache=self.cache)[0, -1]

    def _refill(self) -> torch.Tensor:
        if self.use_cache:
            self.cache = self.model.new_cache(1, self.seq_len)
        return self._forward(self.tokens[self.start :])

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Start from `ids` (non-empty); return the logits [V] for the token after them."""
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        self.tokens = list(ids)
        self.start = len(ids) - self.keep if len(ids) > self.seq_len else 0
        return self._refill()

    def push(self, token: int) -> torch.Tensor:
        """Append one token; return the logits [V] for the token after it."""
        self.tokens.append(token)
        if len(self.tokens) - self.start > self.seq_len:
            self.start = len(self.tokens) - self.keep
            self.slides += 1
            return self._refill()
        if not self.use_cache:
            return self._forward(self.tokens[self.start :])
        return self._forward([token])


@dataclass
class Generation:
    """One prompt's result: the new tokens only (the prompt is not repeated) and why it stopped."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    stop: str = "length"  # "length" (max_new_tokens) or "eot"


def _as_prompt_list(prompt_ids) -> list[list[int]]:
    if len(prompt_ids) and isinstance(prompt_ids[0], list | tuple):
        return [list(p) for p in prompt_ids]
    return [list(prompt_ids)]


def generate(
    model: nn.Module,
    prompt_ids: list[int] | list[list[int]],
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eot_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    on_token: Callable[[int], None] | None = None,
    keep: int | None = None,
) -> list[list[int]]:
    """Sample up to `max_new_tokens` new tokens per prompt; returns the new ids, one list per prompt.

    `prompt_ids` is one prompt (list of ids) or a list of prompts. Prompts run one after another (not
    padded into a batch: the model takes no padding mask, and one-by-one is exactly the single-prompt
    result). Each prompt gets its own generator seeded with `seed`, so a prompt's completion does not
    depend on its neighbours; seed None uses torch's global RNG. Generation stops after `eot_id` (which
    is included in the output) or `max_new_tokens`. `on_token(id)` is called as each token is chosen, for
    streaming. Beyond `model.cfg.seq_len` tokens the context slides (see `Decoder`; `keep` sets how many
    tokens survive a slide). The repetition penalty covers every token of prompt and completion so far.
    """
    gens = generate_full(
        model,
        prompt_ids,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        repetition_penalty,
        eot_id,
        seed,
        use_cache,
        on_token,
        keep,
    )
    return [g.tokens for g in gens]


@torch.inference_mode()
def generate_full(
    model: nn.Module,
    prompt_ids: list[int] | list[list[int]],
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eot_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    on_token: Callable[[int], None] | None = None,
    keep: int | None = None,
) -> list[Generation]:
    """`generate`, returning a `Generation` (prompt, new tokens, stop reason) per prompt."""
    prompts = _as_prompt_list(prompt_ids)
    sampler = Sampler(temperature, top_k, top_p, repetition_penalty)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vocab = int(model.cfg.vocab_size)
    out = []
    try:
        for prompt in prompts:
            if any(not 0 <= t < vocab for t in prompt):
                raise ValueError(f"prompt token ids must be in [0, {vocab})")
            gen = Generation(prompt=prompt)
            out.append(gen)
            if max_new_tokens <= 0:
                continue
            generator = None
            if seed is not None:
                generator = torch.Generator(device=device)
                generator.manual_seed(seed)
            seen = None
            if repetition_penalty != 1.0:
                seen = torch.zeros(vocab, dtype=torch.bool, device=device)
                seen[torch.tensor(prompt, device=device)] = True
            decoder = Decoder(model, use_cache=use_cache, keep=keep)
            logits = decoder.prefill(prompt)
            while True:
                token = sampler.choose(logits, seen, generator)
                gen.tokens.append(token)
                if on_token is not None:
                    on_token(token)
                if eot_id is not None and token == eot_id:
                    gen.stop = "eot"
                    break
                if len(gen.tokens) >= max_new_tokens:
                    break
                if seen is not None:
                    seen[token] = True
                logits = decoder.push(token)
    finally:
        model.train(was_training)
    return out


# ---- benchmark --------------------------------------------------------------------------------------------


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _timed_greedy(model: nn.Module, prompt: list[int], new_tokens: int, use_cache: bool) -> dict:
    device = next(model.parameters()).device
    stamps: list[float] = []

    def stamp(_token: int) -> None:
        stamps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    (tokens,) = generate(model, prompt, new_tokens, temperature=0.0, use_cache=use_cache, on_token=stamp)
    decode_s = stamps[-1] - stamps[0]
    return {
        "tokens": tokens,
        "ttft_s": stamps[0] - t0,
        "decode_s": decode_s,
        "decode_tok_s": (len(tokens) - 1) / decode_s if decode_s > 0 else float("inf"),
    }


def benchmark_generation(
    model: nn.Module, prompt_len: int = 16, new_tokens: int = 256, seed: int = 0
) -> dict:
    """Greedy decoding of `new_tokens` after a random `prompt_len`-token prompt, with and without the cache.

    Returns time to first token (the prefill), decode tokens/s both ways (first token excluded), the
    speedup, peak memory, and whether both paths produced the same tokens (they should: same windowing).
    """
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, int(model.cfg.vocab_size), (prompt_len,), generator=g).tolist()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _timed_greedy(model, prompt, min(8, new_tokens), use_cache=True)  # warm-up: allocator, kernels
    _timed_greedy(model, prompt, min(8, new_tokens), use_cache=False)
    cached = _timed_greedy(model, prompt, new_tokens, use_cache=True)
    full = _timed_greedy(model, prompt, new_tokens, use_cache=False)
    return {
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "ttft_s": round(cached["ttft_s"], 5),
        "decode_tok_s_cache": round(cached["decode_tok_s"], 2),
        "decode_tok_s_nocache": round(full["decode_tok_s"], 2),
        "speedup": round(cached["decode_tok_s"] / full["decode_tok_s"], 2),
        "outputs_match": cached["tokens"] == full["tokens"],
        "peak_mem_mb": round(peak_memory_mb(device), 1),
    }


def random_preset_model(preset: str, seed: int = 0) -> nn.Module:
    """A randomly initialised model of a named preset, vocabulary sized like the preset's tokenizer.

    Output projections are not zero-initialised, so the blocks do real work and the cached and uncached
    paths can disagree if something is wrong; speed does not depend on the weights' values.
    """
    from blueberry.config import load_config

    cfg = load_config(data={"preset": preset})
    model_cfg = cfg.model.model_copy(
        update={"vocab_size": cfg.tokenizer.vocab_size, "zero_init_outputs": False}
    )
    torch.manual_seed(seed)
    return build_model(model_cfg)


def inference_benchmark(model: nn.Module, label: str, new_tokens: int = 256, prompt_len: int = 16) -> dict:
    """The record both inference benchmarks print as their last line: {"bench": "inference", ...}."""
    ref = next(model.parameters())
    record = {
        "bench": "inference",
        "model": label,
        "params": count_params(model)["total"],
        "seq_len": int(model.cfg.seq_len),
        "vocab_size": int(model.cfg.vocab_size),
        "device": str(ref.device),
        "dtype": str(ref.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }
    record.update(benchmark_generation(model, prompt_len=prompt_len, new_tokens=new_tokens))
    return record


def format_benchmark(r: dict) -> list[str]:
    """Human-readable lines for an `inference_benchmark` record."""
    return [
        f"model {r['model']}: {r['params']:,} params, seq_len {r['seq_len']}, vocab {r['vocab_size']:,}, "
        f"{r['device']} {r['dtype']}, {r['threads']} threads",
        f"prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new tokens (greedy)",
        f"time to first token (prefill): {r['ttft_s'] * 1000:.1f} ms",
        f"decode with KV cache:          {r['decode_tok_s_cache']:.1f} tokens/s",
        f"decode without cache:          {r['decode_tok_s_nocache']:.1f} tokens/s (full recompute per token)",
        f"speedup:                       {r['speedup']:.2f}x (same tokens: {r['outputs_match']})",
        f"peak memory:                   {r['peak_mem_mb']:.1f} MiB",
    ]
