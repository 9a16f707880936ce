"""THANN's patches of megatron-core (thann.parallel.megatron_patches) live only as long as the process groups."""

import subprocess
import sys

from conftest import ROOT

CHECK = """
import torch, torch.distributed
from torch.overrides import _get_current_function_mode_stack
from omegaconf import OmegaConf
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.transformer.moe import moe_utils
from thann.parallel import state

names = {"type": torch.Tensor.type, "cuda": torch.Tensor.cuda, "current_device": torch.cuda.current_device,
         "get_rng_state": torch.cuda.get_rng_state, "all_to_all_single": torch.distributed.all_to_all_single,
         "Stream": torch.cuda.Stream, "load": DistributedOptimizer._set_main_param_and_optimizer_states}
layout = OmegaConf.create({"tp": 1, "pp": 1, "ep": 1, "etp": 1, "sp": False})
state.initialize(layout, dp=1, seed=0)
assert torch.Tensor.type is not names["type"] and torch.zeros(1, device="cuda").device.type == "cpu"
assert len(_get_current_function_mode_stack()) == 1 and moe_utils.te_general_gemm is None
assert DistributedOptimizer._set_main_param_and_optimizer_states is not names["load"]
state.destroy()
now = {"type": torch.Tensor.type, "cuda": torch.Tensor.cuda, "current_device": torch.cuda.current_device,
       "get_rng_state": torch.cuda.get_rng_state, "all_to_all_single": torch.distributed.all_to_all_single,
       "Stream": torch.cuda.Stream, "load": DistributedOptimizer._set_main_param_and_optimizer_states}
assert all(now[k] is names[k] for k in names), [k for k in names if now[k] is not names[k]]
assert len(_get_current_function_mode_stack()) == 0 and not hasattr(moe_utils, "te_general_gemm")
print("restored")
"""


def test_destroying_the_process_groups_restores_torch(cpu_only):
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "restored" in out.stdout, out.stderr[-3000:]
