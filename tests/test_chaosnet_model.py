"""ChaosNet's neuron core and classifiers against references written here from the docstring
equations: a NumPy per-tick loop, the closed form of the parallel-tick collapse, a surrogate
gradient by construction."""

import numpy as np
import pytest
import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.module import Float16Module
from omegaconf import OmegaConf

from thann.config import ConfigError
from thann.models.chaosnet import (
    ChaosNeurons,
    MLPBaselineClassifier,
    build_classifier,
    chaosnet_transformer_config,
    check_layout,
    check_model_config,
    matched_hidden_width,
    mlp_num_parameters,
    num_parameters,
)
from thann.models.chaosnet.neurons import spike

# The seed's sizes (512 neurons, 5 ticks, embedding width 300) and the three sequential datasets.
SEED_CFG = dict(
    arch="chaosnet", neurons=512, ticks=5, sigma=0.05, theta=0.5, rho=0.9, leak=0.02, mode="stateful",
    train_death_rate=0.5, eval_death_rate=0.5, input_width=300,
    text=dict(vocab_size=100277, max_tokens=512), image=dict(channels=1, size=28, conv_channels=[16, 32]),
    heads=dict(newsgroups20=dict(modality="text", num_classes=20), mnist=dict(modality="image", num_classes=10),
               fashion_mnist=dict(modality="image", num_classes=10)),
)


def small_cfg(**fields):
    cfg = OmegaConf.create(SEED_CFG)
    small = dict(neurons=24, ticks=4, input_width=12, text=dict(vocab_size=50, max_tokens=16),
                 image=dict(channels=1, size=8, conv_channels=[3, 4]))
    return OmegaConf.merge(cfg, small, fields)


def active_core(mode: str, dtype=torch.float64, seed: int = 0) -> tuple[ChaosNeurons, torch.Tensor]:
    """A core whose neurons sit near threshold, so that they spike, go refractory and die."""
    torch.manual_seed(seed)
    core = ChaosNeurons(6, 20, ticks=5, sigma=0.3, theta=0.5, rho=0.9, leak=0.1, mode=mode, dtype=dtype)
    with torch.no_grad():
        core.w_rec_raw.mul_(6.0)
    return core, torch.randn(7, 6, dtype=dtype) * 3


def randomness(core: ChaosNeurons, batch: int, death_rate: float = 0.3, seed: int = 1):
    alive, noise = core.draw_randomness(batch, torch.Generator().manual_seed(seed), death_rate)
    return alive.double(), noise.double()


def reference_stateful(core: ChaosNeurons, x, alive, noise) -> np.ndarray:
    """The docstring's equations, one tick and one neuron at a time."""
    w_in, b = core.w_in.weight.detach().numpy(), core.w_in.bias.detach().numpy()
    w_rec = np.abs(core.w_rec_raw.detach().numpy()) * core.sign_N.numpy()[None, :]
    x, alive, noise = x.numpy(), alive.numpy(), noise.numpy()
    B, T, N = alive.shape
    rates = np.zeros((B, N))
    for b_ in range(B):
        v, r, s = np.zeros(N), np.zeros(N), np.zeros(N)
        for t in range(T):
            new_s = np.zeros(N)
            for i in range(N):
                inputs = w_in[i] @ x[b_] + b[i] + w_rec[i] @ s + core.sigma * noise[b_, t, i]
                v[i] = (1 - r[i]) * ((1 - core.leak) * v[i] + inputs)
                new_s[i] = alive[b_, t, i] * (1.0 if v[i] >= core.theta else 0.0)
                r[i] = min(max(core.rho * r[i] + new_s[i], 0.0), 1.0)
            s = new_s
            rates[b_] += s / T
    return rates


def test_stateful_dynamics_equal_a_per_tick_loop():
    core, x = active_core("stateful")
    alive, noise = randomness(core, len(x))
    rates = core(x, alive, noise).detach().numpy()
    np.testing.assert_allclose(rates, reference_stateful(core, x, alive, noise), rtol=0, atol=1e-12)
    # The regime is not trivial: some neurons fire more than once, some never do.
    assert 0 < (rates > 0).mean() < 1 and (rates > 1 / core.ticks).any()


def test_stateful_gradients_equal_a_straight_through_reference():
    """Same dynamics written with H's surrogate as a straight-through term: forward H(u), and
    backward d/du of F(u) = c - c|c|/2 with c = clip(u, -1, 1), i.e. max(0, 1 - |u|)."""
    core, x = active_core("stateful")
    alive, noise = randomness(core, len(x))
    core(x, alive, noise).pow(2).sum().backward()

    w_in = core.w_in.weight.detach().clone().requires_grad_()
    b = core.w_in.bias.detach().clone().requires_grad_()
    raw = core.w_rec_raw.detach().clone().requires_grad_()
    w_rec = raw.abs() * core.sign_N

    def straight_through(u):
        c = u.clamp(-1, 1)
        smooth = c - c * c.abs() / 2
        return (u >= 0).double() + smooth - smooth.detach()

    v = r = s = total = torch.zeros(len(x), core.neurons, dtype=torch.float64)
    for t in range(core.ticks):
        v = (1 - r) * ((1 - core.leak) * v + x @ w_in.T + b + s @ w_rec.T + core.sigma * noise[:, t])
        s = alive[:, t] * straight_through(v - core.theta)
        r = torch.clamp(core.rho * r + s, 0, 1)
        total = total + s
    (total / core.ticks).pow(2).sum().backward()
    for mine, ref in ((core.w_in.weight, w_in), (core.w_in.bias, b), (core.w_rec_raw, raw)):
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-10, atol=1e-12)


def test_recurrent_weights_learn_only_in_stateful_mode():
    for mode in ("stateful", "parallel_ticks"):
        core, x = active_core(mode)
        core(x, *randomness(core, len(x))).sum().backward()
        if mode == "stateful":
            assert core.w_rec_raw.grad.abs().sum() > 0
        else:  # the original's bug, reproduced on purpose: W_rec never reaches the output
            assert core.w_rec_raw.grad is None


def test_parallel_ticks_equal_their_closed_form():
    core, x = active_core("parallel_ticks")
    alive, noise = randomness(core, len(x), death_rate=0.5)
    drive = x.numpy() @ core.w_in.weight.detach().numpy().T + core.w_in.bias.detach().numpy()
    above = drive[:, None, :] + core.sigma * noise.numpy() - core.theta >= 0
    expected = (alive.numpy() * above).mean(axis=1)
    np.testing.assert_array_equal(core(x, alive, noise).detach().numpy(), expected)


def test_surrogate_gradient_is_the_triangle_around_threshold():
    grid = np.arange(-40, 41) / 20
    u = torch.tensor(grid, requires_grad=True)
    s = spike(u)
    s.backward(torch.ones_like(u))
    np.testing.assert_array_equal(s.detach().numpy(), (grid >= 0).astype(float))
    np.testing.assert_allclose(u.grad.numpy(), np.maximum(0, 1 - np.abs(grid)), atol=1e-12)


def test_excitatory_inhibitory_signs_survive_training():
    core, x = active_core("stateful", dtype=torch.float32)
    sign = core.sign_N.clone()
    assert (sign == -1).sum() == round(0.2 * core.neurons) and (sign == 1).sum() == round(0.8 * core.neurons)
    w_before = core.recurrent_weight().detach()
    optimizer = torch.optim.Adam(core.parameters(), lr=0.5)
    for seed in range(3):
        optimizer.zero_grad()
        # Pushes every recurrent weight towards large negative values: without the rule the
        # excitatory columns would flip sign.
        loss = core.recurrent_weight().sum() - core(x.float(), *randomness(core, len(x), seed=seed)).sum()
        loss.backward()
        optimizer.step()
    w_after = core.recurrent_weight().detach()
    assert not torch.equal(w_after, w_before)
    torch.testing.assert_close(core.sign_N, sign, rtol=0, atol=0)
    assert (w_after * sign[None, :] >= 0).all()
    assert "sign_N" in core.state_dict()


def test_randomness_is_reproducible_from_the_seed():
    cfg = small_cfg()
    model = build_classifier(chaosnet_transformer_config(cfg, bf16=False), cfg)
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)

    def run(seed: int):
        alive, noise = model.draw_randomness(5, torch.Generator().manual_seed(seed), 0.5)
        return alive, model(images, "mnist", alive, noise)

    (alive_a, logits_a), (alive_b, logits_b), (alive_c, logits_c) = run(11), run(11), run(12)
    assert torch.equal(alive_a, alive_b) and torch.equal(logits_a, logits_b)
    assert not torch.equal(alive_a, alive_c) and not torch.equal(logits_a, logits_c)
    many, _ = ChaosNeurons(2, 1000, ticks=10).draw_randomness(20, torch.Generator().manual_seed(0), 0.3)
    assert set(many.unique().tolist()) == {0.0, 1.0} and abs(many.mean().item() - 0.7) < 0.01


def test_death_rate_and_ticks_are_validated():
    core = ChaosNeurons(2, 4)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="death_rate"):
            core.draw_randomness(1, torch.Generator(), bad)
    with pytest.raises(ValueError, match="ticks"):
        ChaosNeurons(2, 4, ticks=0)
    with pytest.raises(ValueError, match="alive_BTN"):
        core(torch.zeros(3, 2), torch.ones(3, 4, 4), torch.zeros(3, 5, 4))


def test_text_front_end_is_the_mean_of_the_unpadded_embeddings():
    cfg = small_cfg()
    model = build_classifier(chaosnet_transformer_config(cfg, bf16=False), cfg)
    pad = cfg.text.vocab_size
    tokens = torch.tensor([[3, 7, 7, pad, pad], [49, pad, pad, pad, pad], [1, 2, 3, 4, 5]])
    table = model.frontends["text"].bag.weight.detach().numpy()
    expected = np.stack([table[[3, 7, 7]].mean(0), table[[49]].mean(0), table[[1, 2, 3, 4, 5]].mean(0)])
    np.testing.assert_allclose(model.features(tokens, "newsgroups20").detach().numpy(), expected, rtol=1e-6)


def test_per_sample_losses_and_logits_for_every_head():
    cfg = small_cfg()
    for arch in ("chaosnet", "mlp_baseline"):
        model = build_classifier(chaosnet_transformer_config(cfg, bf16=False), OmegaConf.merge(cfg, {"arch": arch}))
        inputs = {"newsgroups20": torch.randint(0, 50, (4, 9)), "mnist": torch.randint(0, 256, (4, 1, 8, 8)),
                  "fashion_mnist": torch.randint(0, 256, (4, 1, 8, 8))}
        for head, x in inputs.items():
            randomness_ = model.draw_randomness(4, torch.Generator().manual_seed(0), 0.5)
            logits = model(x, head, *randomness_)
            labels = torch.arange(4) % cfg.heads[head].num_classes
            losses = model(x, head, *randomness_, labels=labels)
            assert logits.shape == (4, cfg.heads[head].num_classes) and losses.shape == (4,)
            z = logits.detach().double().numpy()
            shifted = z - z.max(1, keepdims=True)
            log_softmax = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
            np.testing.assert_allclose(losses.detach().numpy(), -log_softmax[np.arange(4), labels.numpy()], rtol=1e-5)
        with pytest.raises(ValueError, match="unknown head"):
            model(inputs["mnist"], "cifar", *randomness_)


def test_mlp_dropout_is_seeded_and_stays_on():
    cfg = small_cfg(ticks=1)
    config = chaosnet_transformer_config(cfg, bf16=False)
    model = build_classifier(config, OmegaConf.merge(cfg, {"arch": "mlp_baseline"}))
    assert isinstance(model, MLPBaselineClassifier)
    model.eval()
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    keep, noise = model.draw_randomness(3, torch.Generator().manual_seed(5), 0.75)
    assert noise is None and set(keep.unique().tolist()) <= {0.0, 4.0}
    hidden = torch.relu(model.hidden(model.features(images, "mnist")))
    expected = model.heads["mnist"](hidden * keep[:, 0])
    torch.testing.assert_close(model(images, "mnist", keep, None), expected)


def test_parameter_counts_follow_from_the_config_and_the_baseline_matches():
    for modalities in (("text",), ("image",), ("text", "image")):
        cfg = OmegaConf.create(SEED_CFG)
        cfg.heads = {n: t for n, t in SEED_CFG["heads"].items() if t["modality"] in modalities}
        config = chaosnet_transformer_config(cfg, bf16=False)
        with torch.device("meta"):  # the 100k-token embedding is never allocated
            chaosnet = build_classifier(config, cfg)
            mlp = build_classifier(config, OmegaConf.merge(cfg, {"arch": "mlp_baseline"}))
        count = sum(p.numel() for p in chaosnet.parameters())
        mlp_count = sum(p.numel() for p in mlp.parameters())
        assert count == num_parameters(cfg)
        assert mlp_count == mlp_num_parameters(cfg, matched_hidden_width(cfg))
        # Within 1% of ChaosNet's core and heads alone, which is stricter than within 1% of the
        # total, whose front-ends the two models share.
        shared = sum(p.numel() for p in chaosnet.frontends.parameters())
        assert abs(mlp_count - count) <= 0.01 * (count - shared)
    with torch.device("meta"):  # an explicit width (e.g. a tenth of the core) replaces the matched one
        narrow = build_classifier(config, OmegaConf.merge(cfg, {"arch": "mlp_baseline", "hidden_width": 40}))
    assert narrow.hidden_width == 40 and sum(p.numel() for p in narrow.parameters()) == mlp_num_parameters(cfg, 40)


@pytest.mark.parametrize("field, value", [
    ("ticks", 0), ("neurons", 0), ("input_width", -3), ("train_death_rate", 1.0), ("eval_death_rate", -0.1),
    ("mode", "sleepy"), ("arch", "resnet"), ("sigma", -1.0), ("rho", 1.5), ("text.vocab_size", 0),
    ("text.max_tokens", 0), ("image.channels", 0), ("image.size", 2), ("image.conv_channels", [16, 0]),
    ("heads.mnist.modality", "audio"), ("heads.mnist.num_classes", 1), ("ticks", 2.5), ("neurons", True),
    ("hidden_width", 0),
])
def test_bad_config_values_name_their_field(field, value):
    cfg = OmegaConf.create(SEED_CFG)
    check_model_config(cfg)
    OmegaConf.update(cfg, field, value)
    with pytest.raises(ConfigError) as error:
        check_model_config(cfg)
    assert error.value.field == f"model.{field}"


def test_layout_must_be_data_parallel_only():
    check_layout(OmegaConf.create({"tp": 1, "pp": 1, "ep": 1, "etp": 1, "sp": False}))
    for field in ("tp", "pp", "ep", "etp"):
        layout = OmegaConf.create({"tp": 1, "pp": 1, "ep": 1, "etp": 1, "sp": False, field: 2})
        with pytest.raises(ConfigError) as error:
            check_layout(layout)
        assert error.value.field == f"parallel.{field}"


def test_megatron_ddp_trains_the_recurrent_weights(single_rank):
    cfg = small_cfg()
    config = chaosnet_transformer_config(cfg, bf16=False)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                    build_classifier(config, cfg))
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    alive, noise = model.module.draw_randomness(6, torch.Generator().manual_seed(0), 0.2)
    # Noise of std 1 (not .05) makes the untrained neurons cross the threshold, so spikes reach W_rec.
    model(images, "mnist", alive, noise * 20, labels=torch.arange(6) % 10).sum().backward()
    model.finish_grad_sync()
    assert model.module.core.w_rec_raw.main_grad.abs().sum() > 0


def test_bf16_wrapper_runs_a_text_head(single_rank):
    cfg = small_cfg()
    config = chaosnet_transformer_config(cfg, bf16=True)
    model = Float16Module(config, build_classifier(config, cfg))
    alive, noise = model.module.draw_randomness(2, torch.Generator().manual_seed(0), 0.5)
    losses = model(torch.randint(0, 50, (2, 5)), "newsgroups20", alive, noise, labels=torch.tensor([0, 3]))
    assert losses.dtype == torch.float32 and losses.shape == (2,) and torch.isfinite(losses).all()
