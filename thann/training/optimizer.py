"""megatron-core's optimizer (Adam, fp32 master weights under bf16, optional ZeRO-1 distributed
optimizer, gradient clipping) and its warmup + decay learning-rate schedule.

Without transformer-engine or apex megatron-core falls back to torch's AdamW, built with torch's
default implementation (foreach: about ten passes over every fp32 tensor); it is switched to the
fused one, a single pass, on CPU and GPU alike. torch's Adam keeps a per-parameter state (with its
"step") that appears only at the first update. Two consequences in megatron-core's
distributed optimizer (0.16 to 0.19) are handled here: its state_dict() asserts on a fresh
optimizer, so the state is created up front (exactly what Adam's first step would create), and
loading the model-space ("fully_reshardable") checkpoint form copies every state tensor it finds,
the step included, from a source that has none (KeyError: 'step'), so the step is set aside
during that copy (item B of thann.parallel.megatron_patches); megatron-core then restores the
step from the param groups as one tensor shared by every parameter, which torch's foreach Adam
would increment once per parameter, so each parameter gets its own copy back
(``unshare_adam_steps``, after loading).
"""

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def build_optimizer(optim_cfg, steps: int, distributed_optimizer: bool, model_chunks, bf16: bool):
    """``optim_cfg``: lr, min_lr, weight_decay, adam_beta1, adam_beta2, clip_grad, warmup_steps and
    schedule (train.* for a recipe's main model); ``steps``: the iterations the schedule spans."""
    config = OptimizerConfig(
        optimizer="adam",
        lr=optim_cfg.lr,
        min_lr=optim_cfg.min_lr,
        weight_decay=optim_cfg.weight_decay,
        adam_beta1=optim_cfg.adam_beta1,
        adam_beta2=optim_cfg.adam_beta2,
        adam_eps=1e-8,
        clip_grad=optim_cfg.clip_grad,
        bf16=bf16,
        use_distributed_optimizer=distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, model_chunks)
    for adam in _torch_adams(optimizer):
        _use_fused_kernel(adam)
        _create_state(adam)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim_cfg.lr,
        min_lr=optim_cfg.min_lr,
        lr_warmup_steps=optim_cfg.warmup_steps,
        lr_decay_steps=steps,
        lr_decay_style=optim_cfg.schedule,
        start_wd=optim_cfg.weight_decay,
        end_wd=optim_cfg.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
        # On resume the schedule follows this run's config; only the step count is restored.
        override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
    )
    return optimizer, scheduler


def _inner_optimizers(optimizer) -> list:
    """The torch-level optimizers inside a megatron-core optimizer (chained or not)."""
    return [m.optimizer for m in getattr(optimizer, "chained_optimizers", [optimizer])]


def _torch_adams(optimizer) -> list:
    """The torch Adam instances inside a megatron-core optimizer; none where megatron-core found
    transformer-engine's or apex's FusedAdam."""
    return [adam for adam in _inner_optimizers(optimizer) if isinstance(adam, (torch.optim.Adam, torch.optim.AdamW))]


def reset_adam_state(optimizer) -> None:
    """Zeroes the Adam state inside a megatron-core optimizer (distributed or not): moments and
    step, the step wherever it is kept (per parameter in torch's Adam, per parameter group in
    transformer-engine's and apex's FusedAdam), so the next update is a first one."""
    for inner in _inner_optimizers(optimizer):
        for param_state in inner.state.values():
            for value in param_state.values():
                if torch.is_tensor(value):
                    value.zero_()
        for group in inner.param_groups:
            if "step" in group:
                group["step"] = 0


def _use_fused_kernel(adam) -> None:
    for options in (adam.defaults, *adam.param_groups):
        options["foreach"] = False
        options["fused"] = True


def _create_state(adam) -> None:
    for group in adam.param_groups:
        for p in group["params"]:
            if not adam.state[p]:
                # The fused kernel wants the step as float32 on the parameter's device.
                adam.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                 "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def unshare_adam_steps(optimizer) -> None:
    for adam in _torch_adams(optimizer):
        for state in adam.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()


def main_params_follow_model(optimizer) -> None:
    """Carries writes made to the model's bf16 parameters outside the optimizer into its fp32 main
    copies (distributed or not): the elements a write changed take the new value, the others keep
    their fp32 bits (megatron-core's reload_model_params would round every main weight to bf16).
    With fp32 parameters the optimizer steps the model's own tensors: nothing to carry."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(inner, "_get_model_and_main_params_data_float16"):
            continue
        for model, main in zip(*inner._get_model_and_main_params_data_float16()):
            if main is not None:
                changed = main.to(model.dtype) != model
                main.copy_(torch.where(changed, model.float(), main))
