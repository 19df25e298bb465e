"""Generation: the KV cache changes speed, never tokens; samplers keep the right candidates."""

import math

import pytest
import torch

from blueberry import build_model
from blueberry.generate import (
    Decoder,
    Sampler,
    apply_repetition_penalty,
    cast_for_inference,
    generate,
    generate_full,
    pick_device,
    pick_dtype,
    top_k_filter,
    top_p_filter,
)
from tests.conftest import tiny_model_config


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and an OpenMP barrier stalls when other processes share the CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_model(**over):
    """A tiny model whose blocks do real work (zero-initialised outputs would hide cache bugs)."""
    torch.manual_seed(0)
    return build_model(tiny_model_config(zero_init_outputs=False, **over)).eval()


# ---- the cache is exact ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("position", ["rope", "learned", "none"])
def test_cached_logits_match_full_recompute_across_window_slides(position, n_kv_heads):
    model = random_model(position=position, n_kv_heads=n_kv_heads)
    seq_len = model.cfg.seq_len
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 97, (5,), generator=g).tolist()
    forced = torch.randint(0, 97, (3 * seq_len,), generator=g).tolist()  # several slides
    cached, full = Decoder(model, use_cache=True), Decoder(model, use_cache=False)
    with torch.inference_mode():
        a, b = cached.prefill(prompt), full.prefill(prompt)
        for step, token in enumerate(forced):
            assert torch.allclose(a, b, atol=1e-4, rtol=0), f"step {step}: {(a - b).abs().max():.2e}"
            if len(cached.tokens) <= seq_len:  # before the first slide: the plain forward pass is the truth
                assert torch.allclose(a, model(torch.tensor([cached.tokens]))[0, -1], atol=1e-4, rtol=0)
            a, b = cached.push(token), full.push(token)
            assert cached.start == full.start and len(cached.tokens) - cached.start <= seq_len
    assert cached.slides >= 4


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("position", ["rope", "learned", "none"])
def test_greedy_tokens_identical_with_and_without_cache(position, n_kv_heads):
    model = random_model(position=position, n_kv_heads=n_kv_heads)
    prompts = [[3, 1, 4, 1, 5], list(range(20, 20 + model.cfg.seq_len + 3))]  # the second starts past seq_len
    n = 2 * model.cfg.seq_len + 5  # crosses the window-slide boundary
    with_cache = generate(model, prompts, n, temperature=0, use_cache=True)
    without = generate(model, prompts, n, temperature=0, use_cache=False)
    assert with_cache == without
    assert [len(t) for t in with_cache] == [n, n]


def test_chunked_prefill_into_the_cache_matches_one_forward():
    """The model's cache mask for several new tokens after a cached prefix (not used by Decoder)."""
    model = random_model()
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = model(x)
        cache = model.new_cache(2)
        chunks = [model(x[:, a:b], cache=cache) for a, b in ((0, 5), (5, 6), (6, 13), (13, 16))]
    assert torch.allclose(torch.cat(chunks, 1), full, atol=1e-5, rtol=0)


def test_cache_holds_kv_heads_only():
    model = random_model(n_kv_heads=1)
    cache = model.new_cache(1)
    assert cache.k[0].shape == (1, 1, model.cfg.seq_len, model.cfg.head_dim)


def test_low_precision_generation_runs_and_keeps_rotary_frequencies_fp32():
    model = cast_for_inference(random_model(), "cpu", torch.bfloat16)
    assert model.head.weight.dtype == torch.bfloat16
    assert model.position.inv_freq.dtype == torch.float32
    (tokens,) = generate(model, [1, 2, 3], 20, temperature=0)
    assert len(tokens) == 20


# ---- sampling -----------------------------------------------------------------------------------------------


def test_same_seed_same_output_different_seed_different_output():
    model = random_model()
    kw = dict(max_new_tokens=24, temperature=1.0)
    a = generate(model, [1, 2, 3], seed=0, **kw)
    b = generate(model, [1, 2, 3], seed=0, **kw)
    c = generate(model, [1, 2, 3], seed=1, **kw)
    assert a == b
    assert a != c


def test_each_prompt_is_independent_of_its_neighbours():
    model = random_model()
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=7)
    batch = generate(model, [[5, 6], [7, 8, 9]], **kw)
    assert batch == [generate(model, [5, 6], **kw)[0], generate(model, [7, 8, 9], **kw)[0]]


def test_generation_stops_at_eot_and_streams_every_token():
    model = random_model()
    (greedy,) = generate(model, [1, 2, 3], 10, temperature=0)
    streamed = []
    (gen,) = generate_full(model, [1, 2, 3], 10, temperature=0, eot_id=greedy[3], on_token=streamed.append)
    assert gen.tokens == greedy[: greedy.index(greedy[3]) + 1] and gen.stop == "eot"
    assert streamed == gen.tokens
    (gen,) = generate_full(model, [1, 2, 3], 4, temperature=0, eot_id=None)
    assert gen.stop == "length" and len(gen.tokens) == 4


def test_repetition_penalty_lowers_positive_and_negative_logits_of_seen_tokens():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.0])
    seen = torch.tensor([True, True, False, False, True])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, -1.0, 0.0]
    assert (out[seen] <= logits[seen]).all()
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_repetition_penalty_applies_before_greedy_choice():
    sampler = Sampler(temperature=0, repetition_penalty=3.0)
    logits = torch.tensor([3.0, 2.0, -1.0])
    assert sampler.choose(logits) == 0
    assert sampler.choose(logits, seen=torch.tensor([True, False, False])) == 1  # 3/3 = 1 < 2


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    kept = torch.isfinite(top_k_filter(logits, 2))
    assert kept.tolist() == [False, True, False, True, False]
    assert torch.equal(top_k_filter(logits, None), logits) and torch.equal(top_k_filter(logits, 10), logits)


@pytest.mark.parametrize(
    "p,kept",
    [
        (0.3, [0]),  # the most likely token is always kept
        (0.5, [0]),  # 0.5 alone reaches p
        (0.7, [0, 1]),
        (0.81, [0, 1, 2]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(p, kept):
    probs = [0.5, 0.3, 0.15, 0.05]
    order = [2, 0, 3, 1]  # scramble positions: token order[i] has probability probs[i]
    logits = torch.empty(4)
    for i, tok in enumerate(order):
        logits[tok] = math.log(probs[i])
    mask = torch.isfinite(top_p_filter(logits, p))
    assert sorted(torch.nonzero(mask).flatten().tolist()) == sorted(order[i] for i in kept)


def test_sampling_never_picks_filtered_tokens():
    sampler = Sampler(temperature=1.5, top_k=2)
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])
    g = torch.Generator().manual_seed(0)
    assert {sampler.choose(logits, generator=g) for _ in range(200)} == {1, 2}


def test_pick_device_and_dtype_on_cpu():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_device("auto").type in ("cuda", "mps", "cpu")
