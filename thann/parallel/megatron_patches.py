"""Every change THANN makes to megatron-core's behaviour, in one place, with one lifecycle:
``install()`` when the process groups are created (thann.parallel.state.initialize) and
``uninstall()`` when they are destroyed, which puts every replaced attribute back, so the process
is left as it was found. Each item names the failure it prevents (docs/cpu.md).

On any machine (megatron-core 0.16 to 0.19):
  A. the MoE router without transformer-engine computes its logits through an undefined name
     (``NameError: te_general_gemm``); the name set to None selects its plain-torch branch.
  B. the distributed optimizer, loading a model-space ("fully_reshardable") checkpoint of a
     torch Adam, copies every state tensor it finds, the step included, from a source that has
     none (``KeyError: 'step'``): the step is set aside during that copy (thann.training.optimizer).

Without CUDA (CPU + gloo), items 1 to 7: megatron-core is written for GPUs: it creates tensors
on ``torch.cuda.current_device()``, forks CUDA RNG states, builds CUDA streams and checks
parameter type names; exactly those calls are redirected to their CPU equivalents. With CUDA
present none of them is installed.

Cost: the function mode of item 1 sees every torch call. ``benchmarks/cpu_accommodations.py``
measures it on a training step (docs/cpu.md).
"""

import contextlib
import logging

import torch
import torch.distributed
from torch.overrides import TorchFunctionMode

_undo: list = []  # how to put back what install() replaced, newest last


class _NoStream:
    """Stands in for ``torch.cuda.Stream`` and the events it records: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return _NoStream()


class CudaAllocationsToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if isinstance(device, int) or (device is not None and torch.device(device).type == "cuda"):
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


class _RngWarningFilter(logging.Filter):
    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _replace(owner, name: str, value) -> None:
    original = getattr(owner, name)
    setattr(owner, name, value)
    _undo.append(lambda: setattr(owner, name, original))


def _load_states_without_step(set_states):
    def load(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            set_states(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    return load


def install() -> None:
    """Apply every patch (once)."""
    if _undo:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.transformer.moe import moe_utils

    # A. (an attribute the module lacks: put back by deleting it)
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
        _undo.append(lambda: delattr(moe_utils, "te_general_gemm"))
    # B.
    _replace(DistributedOptimizer, "_set_main_param_and_optimizer_states",
             _load_states_without_step(DistributedOptimizer._set_main_param_and_optimizer_states))
    if not torch.cuda.is_available():
        _install_cpu()


def _install_cpu() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    # 1. Devices. megatron-core allocates with device="cuda" (e.g. FP32Optimizer: "Torch not
    #    compiled with CUDA enabled"; the schedules' token counters) and with
    #    device=torch.cuda.current_device(), an integer meaning "cuda:N". A TorchFunctionMode sends
    #    both to the CPU; it does not reach code run by the autograd engine's threads (e.g.
    #    ColumnParallelLinear's backward), so current_device() itself answers "cpu" too.
    _replace(torch.cuda, "current_device", lambda: torch.device("cpu"))
    mode = CudaAllocationsToCpu()
    mode.__enter__()
    _undo.append(lambda: mode.__exit__(None, None, None))
    # 2. Host/device synchronisation is meaningless on CPU.
    _replace(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    # 3. Streams: the alltoall token dispatcher creates a torch.cuda.Stream in __init__
    #    ("torch.cuda.Stream requires CUDA support") and enters torch.cuda.stream(...).
    _replace(torch.cuda, "Stream", _NoStream)
    _replace(torch.cuda, "current_stream", lambda *args, **kwargs: _NoStream())
    _replace(torch.cuda, "stream", lambda *args, **kwargs: contextlib.nullcontext())
    # 4. RNG: the model-parallel RNG tracker seeds and forks the CUDA generator
    #    (model_parallel_cuda_manual_seed asserts CUDA). On CPU the CPU generator plays that
    #    role; the tracker already saves and restores it around every fork.
    #    (torch.manual_seed itself calls torch.cuda.manual_seed_all, which stays as it is.)
    _replace(torch.cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    _replace(torch.cuda, "get_rng_state", lambda *args, **kwargs: torch.get_rng_state())
    _replace(torch.cuda, "set_rng_state", lambda state, *args, **kwargs: torch.set_rng_state(state))
    _replace(mp_random, "_get_cuda_rng_state", lambda *args, **kwargs: torch.get_rng_state())
    _replace(mp_random, "_set_cuda_rng_state", lambda state, *args, **kwargs: torch.set_rng_state(state))
    #    The tracker then warns "CPU RNG state changed within GPU RNG context" on every fork,
    #    which is by construction here (and the state is restored): drop that one message.
    logger, quiet = logging.getLogger(mp_random.__name__), _RngWarningFilter()
    logger.addFilter(quiet)
    _undo.append(lambda: logger.removeFilter(quiet))
    # 5. Type names: the optimizers and gradient clipping accept only 'torch.cuda.FloatTensor'
    #    and friends ("Wrapped parameters must be one of torch.cuda.FloatTensor ...", an assert
    #    in clip_grad_by_total_norm_fp32). Without CUDA every tensor is a CPU tensor, so
    #    Tensor.type() answers with the CUDA name of the same dtype.
    original_type = torch.Tensor.type

    def cuda_named_type(self, *args, **kwargs):
        if args or kwargs:
            return original_type(self, *args, **kwargs)
        name = original_type(self)
        return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)

    _replace(torch.Tensor, "type", cuda_named_type)
    # 6. Tensor.cuda(): with tied embeddings the first and last pipeline stages synchronise the
    #    shared weight via weight.data.cuda() ("Torch not compiled with CUDA enabled").
    _replace(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    # 7. Expert-parallel all-to-all: the dispatcher turns its split sizes into numpy arrays only
    #    when they live on a GPU; CPU tensors reach all_to_all_single, whose binding takes plain
    #    sequences ("all_to_all_single(): incompatible function arguments").
    original_all_to_all_single = torch.distributed.all_to_all_single

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        as_list = lambda sizes: sizes.tolist() if torch.is_tensor(sizes) else sizes  # noqa: E731
        return original_all_to_all_single(output, input, as_list(output_split_sizes),
                                          as_list(input_split_sizes), *args, **kwargs)

    _replace(torch.distributed, "all_to_all_single", all_to_all_single)


@contextlib.contextmanager
def function_mode_suspended():
    """Torch calls inside are not intercepted by item 1 (~1 µs each saved): for code that allocates
    only through current_device(), such as generation's forward passes on one pipeline stage
    (megatron-core's pipeline schedule allocates on "cuda"), where the mode's overhead is a
    measurable share of a one-token step. Nothing changes when the mode is not the innermost one
    (or not installed)."""
    from torch.overrides import _get_current_function_mode_stack, _pop_mode_temporarily

    stack = _get_current_function_mode_stack()
    if not stack or not isinstance(stack[-1], CudaAllocationsToCpu):
        yield
        return
    with _pop_mode_temporarily():
        yield


def uninstall() -> None:
    """Undo ``install()`` in reverse order."""
    while _undo:
        _undo.pop()()
