"""Graceful stop: SIGTERM, SIGUSR1 (Slurm's warning before the time limit, a preemption,
torchrun shutting down) or SIGINT (Ctrl-C) asks the run to finish its current step, save a
checkpoint and exit (thann.cli.EXIT_STOPPED), so that the next start resumes where it stopped.
A second Ctrl-C aborts at once, without saving.

The handlers are installed first thing, so a signal that arrives while the run is still
starting (building the model, loading a checkpoint) stops it cleanly before its first step.
"""

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    def __init__(self):
        self.signal = None
        self._flag = None
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal == "SIGINT":
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        if signum == signal.SIGINT:
            print("stopping after this step and saving; press Ctrl-C again to abort without saving", flush=True)

    def agreed(self, device) -> bool:
        """True on every rank once any rank got a signal (one tiny all-reduce per step), so the
        ranks stop after the same step and save one consistent checkpoint."""
        import torch  # here, not at the top: the handlers are installed before torch is imported
        import torch.distributed as dist

        if self._flag is None:
            self._flag = torch.zeros(1, device=device)
        self._flag.fill_(1.0 if self.signal else 0.0)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        return bool(self._flag.item())
