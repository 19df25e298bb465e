"""The model: every registry entry works, and the seed's bugs cannot come back."""

import itertools
import math

import pytest
import torch

from blueberry import MLPS, NORM_PLACEMENTS, NORMS, POSITIONS, build_model
from blueberry.config import load_config
from blueberry.model import analytic_param_count, count_params, flops_per_token, matmul_params
from blueberry.registry import INITS
from tests.conftest import tiny_model_config

AXES = {
    "norm": NORMS.names(),
    "norm_placement": NORM_PLACEMENTS.names(),
    "position": POSITIONS.names(),
    "mlp": MLPS.names(),
    "init": INITS.names(),
}


@pytest.mark.parametrize("axis,value", [(axis, v) for axis, values in AXES.items() for v in values])
def test_every_registry_entry_runs_forward_and_backward(axis, value, seeded):
    cfg = tiny_model_config(**{axis: value})
    model = build_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    logits, loss = model(x, x)
    assert logits.shape == (2, cfg.seq_len, cfg.vocab_size)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize(
    "flag", ["qk_norm", "tie_embeddings", "embed_scale", "zero_init_outputs", "attn_gate", "bias"]
)
def test_boolean_toggles_build_and_run(flag, seeded):
    for value in (True, False):
        cfg = tiny_model_config(**{flag: value})
        model = build_model(cfg)
        _, loss = model(torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16)))
        assert torch.isfinite(loss)
        assert count_params(model)["total"] == analytic_param_count(cfg)


@pytest.mark.parametrize("position", ["rope", "learned", "none"])
@pytest.mark.parametrize("placement", ["pre", "post", "sandwich"])
def test_causal(position, placement, seeded):
    cfg = tiny_model_config(position=position, norm_placement=placement, zero_init_outputs=False)
    model = build_model(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (1, cfg.seq_len))
    j = 9
    y = x.clone()
    y[0, j] = (x[0, j] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[0, :j], b[0, :j], atol=1e-6)
    assert not torch.allclose(a[0, j:], b[0, j:], atol=1e-6)


@pytest.mark.parametrize("position,encodes", [("none", False), ("rope", True), ("learned", True)])
def test_rope_encodes_position(position, encodes, seeded):
    """Permuting the prefix must change the last logits iff the model knows positions (seed bug 1)."""
    cfg = tiny_model_config(n_layers=1, position=position, zero_init_outputs=False, qk_norm=False)
    model = build_model(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (1, cfg.seq_len))
    perm = torch.cat([torch.randperm(cfg.seq_len - 1), torch.tensor([cfg.seq_len - 1])])
    with torch.no_grad():
        a = model(x)[0, -1]
        b = model(x[:, perm])[0, -1]
    changed = not torch.allclose(a, b, atol=1e-5)
    assert changed == encodes


def test_rope_rotates_sequence_axis_not_head_axis(seeded):
    """Position t's query is rotated by angle t * freq: a per-position rotation, equal across heads."""
    from blueberry.model.layers import RotaryPosition

    cfg = tiny_model_config()
    rope = RotaryPosition(cfg)
    q = torch.ones(1, cfg.n_heads, cfg.seq_len, cfg.head_dim)
    rq, _ = rope.rotate(q, q, torch.arange(cfg.seq_len))
    assert torch.allclose(rq[:, 0], rq[:, 1])  # heads identical
    assert not torch.allclose(rq[:, :, 0], rq[:, :, 5])  # positions differ
    assert torch.allclose(rq[0, 0, 0], q[0, 0, 0])  # position 0 is the identity


def test_rope_fraction_leaves_the_rest_unrotated():
    from blueberry.model.layers import RotaryPosition

    cfg = tiny_model_config(d_model=64, n_heads=2, rope_fraction=0.5)  # head_dim 32 -> 16 pairs, 8 rotate
    rope = RotaryPosition(cfg)
    assert (rope.inv_freq[:8] > 0).all() and (rope.inv_freq[8:] == 0).all()


def test_every_parameter_learns(seeded):
    """With zero-init outputs and depth-aware init, 3 AdamW steps move every parameter (seed bug 3)."""
    cfg = tiny_model_config(n_layers=3, init="depth_aware", zero_init_outputs=True, attn_gate=True)
    model = build_model(cfg)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    had_grad = dict.fromkeys(start, False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        x = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len))
        _, loss = model(x, x.roll(-1, dims=1))
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            had_grad[n] |= bool(p.grad is not None and p.grad.abs().sum() > 0)
        opt.step()
    assert all(had_grad.values()), [n for n, g in had_grad.items() if not g]
    moved = {n: not torch.equal(p, start[n]) for n, p in model.named_parameters()}
    assert all(moved.values()), [n for n, m in moved.items() if not m]


@pytest.mark.parametrize("init", ["standard", "depth_aware", "gpt2_scaled"])
def test_layers_differ_at_init(init, seeded):
    """Every layer gets its own draw (seed bug 4: identical weights in every layer)."""
    model = build_model(tiny_model_config(n_layers=3, init=init))
    for a, b in itertools.combinations(model.blocks, 2):
        assert not torch.equal(a.attn.qkv.weight, b.attn.qkv.weight)
        assert not torch.equal(a.mlp.w_in.weight, b.mlp.w_in.weight)


def test_depth_aware_std_never_reaches_zero(seeded):
    from blueberry.model.init import depth_aware_std

    stds = [depth_aware_std(0.02, layer) for layer in range(64)]
    assert all(s > 0 for s in stds) and stds == sorted(stds, reverse=True)
    model = build_model(
        tiny_model_config(n_layers=4, d_model=64, init="depth_aware", zero_init_outputs=False)
    )
    measured = [b.mlp.w_in.weight.std().item() for b in model.blocks]
    for layer, s in enumerate(measured):
        assert s == pytest.approx(depth_aware_std(0.02, layer), rel=0.15)


def test_gpt2_scaled_shrinks_residual_outputs(seeded):
    cfg = tiny_model_config(n_layers=8, d_model=64, init="gpt2_scaled", zero_init_outputs=False)
    model = build_model(cfg)
    out = model.blocks[0].attn.out.weight.std().item()
    assert out == pytest.approx(0.02 / math.sqrt(16), rel=0.15)


def test_zero_init_outputs_gives_uniform_first_loss(seeded):
    cfg = tiny_model_config(zero_init_outputs=True)
    model = build_model(cfg)
    for b in model.blocks:
        assert b.attn.out.weight.abs().sum() == 0 and b.mlp.w_out.weight.abs().sum() == 0
    x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    _, loss = model(x, x)
    assert loss.item() == pytest.approx(math.log(cfg.vocab_size), abs=1e-5)


def test_tied_embeddings_share_storage(seeded):
    model = build_model(tiny_model_config(tie_embeddings=True))
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()
    untied = build_model(tiny_model_config(tie_embeddings=False))
    assert untied.head.weight.data_ptr() != untied.embed.weight.data_ptr()
    assert count_params(untied)["total"] - count_params(model)["total"] == 97 * 32


def test_embed_scale_multiplies_by_sqrt_d():
    assert build_model(tiny_model_config(embed_scale=True)).embed_mult == pytest.approx(math.sqrt(32))
    assert build_model(tiny_model_config(embed_scale=False)).embed_mult == 1.0


@pytest.mark.parametrize("kv", [1, 2, 4])
def test_gqa_parameter_counts(kv):
    cfg = tiny_model_config(n_kv_heads=kv)
    model = build_model(cfg)
    assert model.blocks[0].attn.qkv.weight.shape == (32 + 2 * kv * 8, 32)
    assert count_params(model)["total"] == analytic_param_count(cfg)


def test_gqa_equals_repeated_kv_attention(seeded):
    """enable_gqa must mean: each KV head serves n_heads / n_kv_heads query heads."""
    import torch.nn.functional as F

    q = torch.randn(2, 4, 8, 16)
    k, v = torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    b = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    )
    assert torch.allclose(a, b, atol=1e-6)


def test_qk_norm_normalises_queries(seeded):
    cfg = tiny_model_config(qk_norm=True)
    attn = build_model(cfg).blocks[0].attn
    q = torch.randn(1, 4, 5, 8) * 30
    assert attn.q_norm(q).pow(2).mean(-1).sqrt().allclose(torch.ones(1, 4, 5), atol=1e-3)
    assert isinstance(build_model(tiny_model_config(qk_norm=False)).blocks[0].attn.q_norm, torch.nn.Identity)


def test_norm_placements_compute_what_they_say(seeded):
    """pre: x + f(N(x)); post: N(x + f(x)); sandwich: x + N2(f(N1(x)))."""
    from blueberry.model.layers import PostNorm, PreNorm, RMSNorm, SandwichNorm

    x = torch.randn(2, 3, 8)
    f = torch.nn.Linear(8, 8)
    n = RMSNorm(8)
    assert torch.allclose(PreNorm(lambda: RMSNorm(8))(x, f), x + f(n(x)))
    assert torch.allclose(PostNorm(lambda: RMSNorm(8))(x, f), n(x + f(x)))
    assert torch.allclose(SandwichNorm(lambda: RMSNorm(8))(x, f), x + n(f(n(x))))
    assert isinstance(build_model(tiny_model_config(norm_placement="post")).final_norm, torch.nn.Identity)


def test_logit_softcap_bounds_logits(seeded):
    cfg = tiny_model_config(logit_softcap=2.0, zero_init_outputs=False, init_std=1.0)
    logits = build_model(cfg)(torch.randint(0, 97, (1, 16)))
    assert logits.abs().max() <= 2.0


def test_blueberry_seed_param_count_matches_formula():
    cfg = load_config(data={"preset": "blueberry-seed"})
    mcfg = cfg.model.model_copy(update={"vocab_size": cfg.tokenizer.vocab_size})
    model = build_model(mcfg)
    V, d, L, f, kv = 24576, 256, 8, 896, 2 * 32
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * f + 2 * 32 + 4 * d
    expected = 2 * V * d + L * per_layer + d
    assert count_params(model)["total"] == expected == analytic_param_count(mcfg)


def test_flops_per_token_formula():
    cfg = tiny_model_config()
    model = build_model(cfg)
    n = matmul_params(model)
    assert flops_per_token(cfg, n) == 6 * n + 12 * cfg.n_layers * cfg.seq_len * cfg.d_model
