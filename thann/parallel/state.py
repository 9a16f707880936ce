"""Process groups for a parallel layout: torch.distributed + megatron-core parallel_state.

One process per device. Launched by torchrun (or Slurm through torchrun) the rendezvous comes
from the environment; started as plain ``python`` it is a world of one. NCCL on GPUs, gloo on CPU.
"""

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from thann.parallel import megatron_patches


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    ep: int
    etp: int
    sp: bool
    dp: int

    def describe(self) -> str:
        return f"tp{self.tp}·pp{self.pp}·ep{self.ep}·etp{self.etp}·dp{self.dp}" + ("·sp" if self.sp else "")

    def num_microbatches(self, global_batch_size: int, micro_batch_size: int) -> int:
        """Micro-batches per step on each data-parallel rank (thann.config.check_train checks that
        the global batch divides)."""
        return global_batch_size // (micro_batch_size * self.dp)

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel replicas (process groups must exist)."""
        return parallel_state.get_data_parallel_rank()


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(parallel_cfg, dp: int, seed: int) -> Layout:
    """Joins the process group, builds megatron-core's groups and seeds every RNG stream.
    ``parallel_cfg.timeout_minutes`` bounds every collective: how long a rank waits for a peer that
    stopped answering (its node hangs, or lost its network) before it fails; a peer whose process
    ended is noticed at once (its connections close)."""
    timeout_minutes = parallel_cfg.get("timeout_minutes", 10)
    megatron_patches.install()
    if not dist.is_initialized():
        options = {"timeout": datetime.timedelta(minutes=timeout_minutes), "backend": "gloo"}
        if torch.cuda.is_available():
            local_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(local_device)
            options.update(backend="nccl", device_id=local_device)
        if "RANK" in os.environ:  # torchrun / srun: rendezvous from the environment
            store, rank, world_size = next(dist.rendezvous("env://", timeout=options["timeout"]))
            # After a failure torchrun (--max-restarts) starts new ranks on the same store; keys
            # left by the dead attempt (peers' addresses) would be read as current. One key
            # space per attempt.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"thann/attempt_{attempt}", store)
            dist.init_process_group(**options, store=store, rank=rank, world_size=world_size)
        else:  # plain `python`: a world of one
            dist.init_process_group(**options, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel_cfg.tp,
        pipeline_model_parallel_size=parallel_cfg.pp,
        expert_model_parallel_size=parallel_cfg.ep,
        expert_tensor_parallel_size=parallel_cfg.etp,
        distributed_timeout_minutes=timeout_minutes,
    )
    # Same seed on every rank: megatron-core derives the per-rank streams (tensor-, expert- and
    # data-parallel) from it, so results do not depend on how ranks are numbered.
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return Layout(parallel_cfg.tp, parallel_cfg.pp, parallel_cfg.ep, parallel_cfg.etp, bool(parallel_cfg.sp), dp)


def destroy() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    megatron_patches.uninstall()
