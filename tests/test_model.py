"""The THANN model: causality, routing and size."""

import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from thann.parallel import state

VOCAB = 100352


def _thann(model_cfg, seed=0, recompute="none"):
    from omegaconf import OmegaConf

    from thann.models.thann.model import ThannModel, transformer_config

    torch.manual_seed(seed)
    layout = OmegaConf.create({"tp": 1, "pp": 1, "ep": 1, "etp": 1, "sp": False})
    config = transformer_config(model_cfg, layout, bf16=False, recompute=recompute)
    return ThannModel(config, model_cfg, VOCAB, max_sequence_length=64).to(state.device()).eval()


def _assert_causal(outputs_before, outputs_after, t):
    """Positions <= t unchanged; position t+1 changed (so the test can see a leak)."""
    torch.testing.assert_close(outputs_after[:, : t + 1], outputs_before[:, : t + 1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outputs_after[:, t + 1], outputs_before[:, t + 1], atol=1e-4)


def test_learnt_tokenization_is_causal(single_rank, tiny_model_cfg):
    tokenization = _thann(tiny_model_cfg).learnt_tokenization
    x_SBD = torch.randn(32, 2, tiny_model_cfg.hidden_size, device=state.device())
    for t in (0, 5, 30):
        perturbed = x_SBD.clone()
        perturbed[t + 1] += torch.randn_like(perturbed[t + 1])
        with torch.no_grad():
            before, after = tokenization(x_SBD), tokenization(perturbed)
        _assert_causal(before.transpose(0, 1), after.transpose(0, 1), t)


def test_whole_model_is_causal(single_rank, tiny_model_cfg):
    model = _thann(tiny_model_cfg)
    tokens = torch.randint(0, 100_000, (2, 48), device=state.device())
    positions = torch.arange(48, device=state.device()).expand(2, 48)
    for t in (0, 10, 46):
        perturbed = tokens.clone()
        perturbed[:, t + 1] = (perturbed[:, t + 1] + 12345) % 100_000
        with torch.no_grad():
            before, after = model(tokens, positions, None), model(perturbed, positions, None)
        _assert_causal(before, after, t)


def test_router_picks_4_of_16_experts_with_weights_summing_to_1(single_rank, tiny_model_cfg):
    model = _thann(tiny_model_cfg)
    router = model.decoder.layers[0].mlp.router
    assert router.config.num_moe_experts == 16 and router.topk == 4
    hidden = torch.randn(64, 2, tiny_model_cfg.hidden_size, device=state.device())
    with torch.no_grad():
        probs, routing_map = router(hidden)
    assert routing_map.shape == (128, 16)
    assert (routing_map.sum(dim=-1) == 4).all()
    assert (probs[~routing_map] == 0).all()
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones_like(probs[:, 0]), rtol=0, atol=1e-6)


def test_thann_800m_has_800m_parameters_within_5_percent():
    out = subprocess.run([sys.executable, "-m", "thann.summary", "model=thann_800m"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith("total_params="))
    counts = dict(part.split("=") for part in line.split())
    total, active = int(counts["total_params"]), int(counts["active_params"])
    assert 760e6 <= total <= 840e6
    assert active < total


@pytest.mark.parametrize("counts", [[0, 5, 3, 0], [0, 0, 0, 9], [7, 1, 0, 64]])
@pytest.mark.parametrize("kernel", [True, False], ids=["grouped_mm_kernel", "per_expert_loop"])
def test_grouped_matmul_matches_a_loop_over_experts(counts, kernel):
    from thann.models.common.experts import _has_grouped_mm_kernel, grouped_matmul

    counts = torch.tensor(counts)
    width = 16 if kernel else 5  # rows of 16 floats are the kernel's 16-byte units; 5 are not
    x = torch.randn(int(counts.sum()), width, requires_grad=True)
    w = torch.randn(4, width, 8 if kernel else 3, requires_grad=True)
    assert _has_grouped_mm_kernel(x, w) == kernel
    out = grouped_matmul(x, w, counts)
    grad_out = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), grad_out)
    expected, start = [], 0
    for e, n in enumerate(counts.tolist()):  # expert e multiplies its own rows, zero rows included
        expected.append(x[start:start + n] @ w[e])
        start += n
    expected = torch.cat(expected)
    ex, ew = torch.autograd.grad(expected, (x, w), grad_out)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gw, ew)  # experts with no tokens get a zero gradient


@pytest.mark.parametrize("recompute, recomputed", [("selective", "core_attention"), ("full", "self_attention")])
def test_activation_recompute_reruns_in_backward_with_equal_gradients(single_rank, tiny_model_cfg, recompute,
                                                                       recomputed):
    tokens = torch.randint(0, 100_000, (2, 32), device=state.device())
    positions = torch.arange(32, device=state.device()).expand(2, 32)
    gradients, calls, weights = {}, {}, None
    for mode in ("none", recompute):
        model = _thann(tiny_model_cfg, recompute=mode).train()
        weights = weights or model.state_dict()
        model.load_state_dict(weights)
        model.learnt_tokenization.dropout.p = 0.0  # same numbers in both runs
        calls[mode] = 0

        def count(*_):
            calls[mode] += 1

        for layer in model.decoder.layers:
            getattr(layer.self_attention, "core_attention" if recomputed == "core_attention" else "linear_qkv") \
                .register_forward_hook(count)
        model(tokens, positions, None, labels=tokens).sum().backward()
        gradients[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    layers = tiny_model_cfg.num_layers
    assert calls["none"] == layers and calls[recompute] == 2 * layers  # ran again in backward
    for name, grad in gradients["none"].items():
        torch.testing.assert_close(gradients[recompute][name], grad, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")
