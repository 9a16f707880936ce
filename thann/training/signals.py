"""Graceful stop: SIGTERM or SIGUSR1 (Slurm's warning before the time limit, a preemption,
torchrun shutting down) asks the run to finish its current step, save a checkpoint and exit
(thann.cli.EXIT_STOPPED), so that the next start resumes where it stopped."""

import signal

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, device: torch.device):
        self.signal = None
        self._flag = torch.zeros(1, device=device)
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name

    def agreed(self) -> bool:
        """True on every rank once any rank got a signal (one tiny all-reduce per step), so the
        ranks stop after the same step and save one consistent checkpoint."""
        self._flag.fill_(1.0 if self.signal else 0.0)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        return bool(self._flag.item())
