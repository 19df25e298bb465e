"""LR schedules are pure functions that really decay; optimizers route every parameter exactly once."""

import pytest
import torch

from blueberry import build_model
from blueberry.config import OptimConfig, ScheduleConfig
from blueberry.registry import SCHEDULES
from blueberry.train.budget import Budget, Usage
from blueberry.train.optim import build_optimizer, routing_table
from blueberry.train.schedule import end_value, lr_multiplier
from tests.conftest import tiny_model_config


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_schedule_reaches_its_end_value_at_p1(name):
    cfg = ScheduleConfig(name=name, warmup=0.1, min_lr_ratio=0.05)
    assert lr_multiplier(1.0, cfg) == pytest.approx(end_value(cfg))


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_warmup_starts_near_zero_and_reaches_one(name):
    cfg = ScheduleConfig(name=name, warmup=0.1)
    assert lr_multiplier(0.0, cfg) < 0.01
    assert lr_multiplier(0.05, cfg) == pytest.approx(0.5)
    assert lr_multiplier(0.1, cfg) == pytest.approx(1.0)


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_schedules_are_pure_and_monotone_after_warmup(name):
    cfg = ScheduleConfig(name=name, warmup=0.0)
    ps = [i / 100 for i in range(101)]
    values = [lr_multiplier(p, cfg) for p in ps]
    assert values == [lr_multiplier(p, cfg) for p in ps]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:]))


def test_step_schedule_is_the_seeds_intent():
    cfg = ScheduleConfig(name="step", warmup=0.06)
    assert lr_multiplier(0.5, cfg) == 1.0
    assert lr_multiplier(0.85, cfg) == pytest.approx(0.316)
    assert lr_multiplier(0.95, cfg) == pytest.approx(0.1)


def test_wsd_is_stable_then_decays():
    cfg = ScheduleConfig(name="wsd", decay_frac=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(0.79, cfg) == 1.0
    assert lr_multiplier(0.9, cfg) == pytest.approx(0.5)
    assert lr_multiplier(1.0, cfg) == pytest.approx(0.0, abs=1e-12)


def test_budget_progress_whichever_ends_first():
    from blueberry.config import BudgetConfig

    b = Budget(BudgetConfig(time=100, steps=10), tokens_per_step=1000, flops_per_token=6)
    assert b.progress(Usage(steps=5, tokens=5000, train_time_s=10)) == pytest.approx(0.5)
    assert b.progress(Usage(steps=1, tokens=1000, train_time_s=80)) == pytest.approx(0.8)
    assert b.exhausted(Usage(steps=10, tokens=10000, train_time_s=1))
    f = Budget(BudgetConfig(flops=6e6), tokens_per_step=1000, flops_per_token=6)
    assert f.progress(Usage(steps=500, tokens=500_000)) == pytest.approx(0.5)


def _model():
    torch.manual_seed(0)
    return build_model(tiny_model_config(n_layers=2, tie_embeddings=False, attn_gate=True))


@pytest.mark.parametrize("name,head_in_muon", [("adamw", False), ("muon", False), ("muon", True)])
def test_every_parameter_routed_exactly_once(name, head_in_muon):
    model = _model()
    opt = build_optimizer(model, OptimConfig(name=name, head_in_muon=head_in_muon))
    routed = [p for o in opt.optimizers for g in o.param_groups for p in g["params"]]
    assert len(routed) == len({id(p) for p in routed}) == len(list(model.parameters()))
    assert len(opt.routes) == len(routed)
    table = routing_table(opt.routes)
    assert "head.weight" in table and "blocks.0.attn.qkv.weight" in table


def test_muon_routing():
    model = _model()
    opt = build_optimizer(model, OptimConfig(name="muon"))
    where = {r.name: r.optimizer for r in opt.routes}
    assert where["blocks.0.attn.qkv.weight"] == "muon" and where["blocks.1.mlp.w_out.weight"] == "muon"
    assert where["embed.weight"] == "adamw" and where["head.weight"] == "adamw"
    assert where["blocks.0.attn_res.pre.weight"] == "adamw"
    seed_style = build_optimizer(model, OptimConfig(name="muon", head_in_muon=True))
    assert {r.name: r.optimizer for r in seed_style.routes}["head.weight"] == "muon"


def test_no_weight_decay_on_gains_and_embeddings():
    model = _model()
    for name in ("adamw", "muon"):
        routes = {r.name: r for r in build_optimizer(model, OptimConfig(name=name, weight_decay=0.1)).routes}
        assert routes["embed.weight"].weight_decay == 0.0
        assert routes["blocks.0.attn.q_norm.weight"].weight_decay == 0.0
        assert routes["blocks.0.mlp.w_in.weight"].weight_decay == 0.1


def test_adamw_path_matches_plain_torch_adamw():
    torch.manual_seed(0)
    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    cfg = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1, decay_embeddings=True)
    ours = build_optimizer(a, cfg)
    decay = [p for n, p in b.named_parameters() if p.dim() >= 2]
    plain = [p for n, p in b.named_parameters() if p.dim() < 2]
    ref = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95)
    )
    for _ in range(3):
        x = torch.randint(0, 97, (2, 16))
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            model(x, x)[1].backward()
            opt.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_muon_update_is_orthogonal_ish():
    """One Muon step on a matrix moves it by (approximately) an orthogonal matrix: singular values near equal."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(64, 64))
    opt = torch.optim.Muon([w], lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0)
    u, _ = torch.linalg.qr(torch.randn(64, 64))
    v, _ = torch.linalg.qr(torch.randn(64, 64))
    w.grad = u @ torch.diag(torch.logspace(0, 2, 64)) @ v.T  # condition number 100
    opt.step()
    s = torch.linalg.svdvals(w.detach())
    assert s.max() / s.min() < 3.0  # the raw gradient's ratio was 100


def test_lr_multiplier_applies_to_every_group():
    model = _model()
    opt = build_optimizer(model, OptimConfig(name="muon", lr=0.02, adam_lr=0.001))
    opt.set_lr_multiplier(0.5)
    lrs = sorted({round(g["lr"], 8) for g in opt.param_groups})
    assert lrs == [0.0005, 0.01]
