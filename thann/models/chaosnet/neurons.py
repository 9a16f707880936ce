"""ChaosNet's neuron core: N noisy, leaky, refractory threshold neurons run for T ticks on one input.

Shapes: B batch, I input width, T ticks, N neurons.

Stateful mode (the default). Per tick t = 1..T, starting from v_0 = r_0 = s_0 = 0, with the same
input x at every tick:

    v_t = (1 - r_{t-1}) ⊙ ((1 - λ)·v_{t-1} + W_in·x + b + W_rec·s_{t-1} + σ·ε_t)   membrane
    s_t = alive_t ⊙ H(v_t - θ)                                                  spikes
    r_t = clip(ρ·r_{t-1} + s_t, 0, 1)                                            refractoriness
    rates = (1/T)·Σ_t s_t                                                        output [B, N]

H(u) = 1 if u >= 0 else 0. Its gradient is replaced by the surrogate max(0, 1 - |v - θ|).
ε_t ~ N(0, 1) and alive_t ~ Bernoulli(1 - death_rate), per sample, per tick, per neuron.
Defaults (the original's): σ .05, θ .5, ρ .9, λ .02, T 5.

This ordering is the original's single tick (add the input and noise, damp by (1 - r), fire,
kill, update r, leak), run with the state carried from tick to tick and with W_rec·s fed back
into the next tick's membrane. Those two changes fix the original's bugs and nothing else
changes. The damping multiplies the new input too, so r is a real refractory period: on the
tick after a spike (r = 1) the neuron ignores all input, and then it recovers as ρ^k decays.
No separate membrane reset is applied because that zero factor already clears the membrane.
A dead neuron's membrane keeps integrating. Only its spike is suppressed, so it does not go
refractory and can fire on a later tick where it is alive.

W_rec = |W_raw| ⊙ sign: the sign belongs to the presynaptic neuron (a column), +1 for 80% of
the neurons and -1 for 20%. It is drawn once at init and kept in a buffer. The optimizer
updates W_raw, so any step leaves every excitatory neuron excitatory and every inhibitory
neuron inhibitory.

parallel_ticks mode is what the original code really computed: the state is reset every
tick, so the output collapses to

    rates = (1/T)·Σ_t alive_t ⊙ H(W_in·x + b + σ·ε_t - θ)

and W_rec is unused (it is kept so that both modes have the same parameters and checkpoints).

The caller draws ε and alive (``draw_randomness`` with a seeded torch.Generator) and passes them
in. A run's randomness then depends on its seeds only, not on how samples are spread over ranks
or on the order modules consume a global RNG.
"""

import math

import torch
import torch.nn.functional as F

MODES = ("stateful", "parallel_ticks")
EXCITATORY_FRACTION = 0.8


class SpikeFunction(torch.autograd.Function):
    """H(u) forward. Backward uses the surrogate max(0, 1 - |u|), because H's own gradient is
    zero almost everywhere."""

    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u)
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        return grad * (1 - u.abs()).clamp(min=0)


def spike(u: torch.Tensor) -> torch.Tensor:
    return SpikeFunction.apply(u)


def check_death_rate(death_rate: float) -> None:
    if not 0 <= death_rate < 1:
        raise ValueError(f"death_rate={death_rate!r} must be in [0, 1) (1 would kill every neuron at every tick)")


class ChaosNeurons(torch.nn.Module):
    def __init__(self, inputs: int, neurons: int, *, ticks: int = 5, sigma: float = 0.05, theta: float = 0.5,
                 rho: float = 0.9, leak: float = 0.02, mode: str = "stateful", dtype=None, device=None):
        super().__init__()
        if ticks < 1:
            raise ValueError(f"ticks={ticks!r} must be >= 1")
        if inputs < 1 or neurons < 1:
            raise ValueError(f"inputs={inputs!r} and neurons={neurons!r} must be >= 1")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} must be one of {list(MODES)}")
        self.neurons, self.ticks, self.mode = neurons, ticks, mode
        self.sigma, self.theta, self.rho, self.leak = sigma, theta, rho, leak
        factory = dict(dtype=dtype, device=device)
        self.w_in = torch.nn.Linear(inputs, neurons, **factory)
        self.w_rec_raw = torch.nn.Parameter(torch.empty(neurons, neurons, **factory))
        inhibitory = torch.randperm(neurons, device=device)[: round((1 - EXCITATORY_FRACTION) * neurons)]
        sign_N = torch.ones(neurons, **factory)
        sign_N[inhibitory] = -1
        self.register_buffer("sign_N", sign_N)
        with torch.no_grad():
            # Half the variance-preserving scale keeps the recurrent input at init comparable to
            # the feed-forward drive. Inhibitory weights are larger by the E/I ratio (4), so the
            # expected recurrent input is zero instead of a runaway excitation.
            self.w_rec_raw.normal_(0.0, 0.5 / math.sqrt(neurons))
            self.w_rec_raw[:, inhibitory] *= EXCITATORY_FRACTION / (1 - EXCITATORY_FRACTION)

    def recurrent_weight(self) -> torch.Tensor:
        """W_rec[i, j]: synapse from neuron j to neuron i, with neuron j's sign."""
        return self.w_rec_raw.abs() * self.sign_N

    def draw_randomness(self, batch: int, generator: torch.Generator, death_rate: float):
        """(alive_BTN, noise_BTN) as float32 on the generator's device. alive is Bernoulli(1 - death_rate)
        and noise is standard normal."""
        check_death_rate(death_rate)
        shape = (batch, self.ticks, self.neurons)
        alive_BTN = (torch.rand(shape, generator=generator, device=generator.device) >= death_rate).float()
        return alive_BTN, torch.randn(shape, generator=generator, device=generator.device)

    def forward(self, x_BI: torch.Tensor, alive_BTN: torch.Tensor, noise_BTN: torch.Tensor) -> torch.Tensor:
        """Firing rates [B, N]: the mean over the T ticks of each neuron's spikes."""
        drive_BN = self.w_in(x_BI)
        expected = (x_BI.shape[0], self.ticks, self.neurons)
        for name, t in (("alive_BTN", alive_BTN), ("noise_BTN", noise_BTN)):
            if tuple(t.shape) != expected:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected (batch, ticks, neurons) = {expected}")
        alive_BTN, noise_BTN = alive_BTN.to(drive_BN), noise_BTN.to(drive_BN)
        if self.mode == "parallel_ticks":
            v_BTN = drive_BN.unsqueeze(1) + self.sigma * noise_BTN
            return (alive_BTN * spike(v_BTN - self.theta)).mean(dim=1)
        w_rec_NN = self.recurrent_weight()
        v_BN = r_BN = s_BN = rates_BN = torch.zeros_like(drive_BN)
        for t in range(self.ticks):
            inputs_BN = drive_BN + self.sigma * noise_BTN[:, t]
            if t > 0:  # s_0 = 0: nothing to feed back on the first tick
                inputs_BN = inputs_BN + F.linear(s_BN, w_rec_NN)
            v_BN = (1 - r_BN) * ((1 - self.leak) * v_BN + inputs_BN)
            s_BN = alive_BTN[:, t] * spike(v_BN - self.theta)
            r_BN = (self.rho * r_BN + s_BN).clamp(0, 1)
            rates_BN = rates_BN + s_BN
        return rates_BN / self.ticks
