"""Initial weights that do not depend on the parallel layout.

megatron-core draws a layer's weights from whatever state the random generator reached on the
rank building it: a pipeline stage that starts at layer 3 draws layer 3 from the state a single
rank used for layer 1, and expert-parallel ranks draw their experts from per-rank streams. With
``use_cpu_initialization`` every tensor-parallel weight is drawn whole and then sliced, so what
remains is to give each part of the model its own stream, derived from the run's seed and the
part's global name (e.g. decoder layer 5). Then the same seed gives the same weights in every
layout, and a layout test can start from a seed instead of from shared weights.
"""

import contextlib
import hashlib

import torch


def _stream_seed(*name) -> int:
    digest = hashlib.sha256(repr((torch.initial_seed(), *name)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


_active = []


@contextlib.contextmanager
def init_stream(*name):
    """Inside, the CPU generator draws from a stream of its own for ``name``; the caller's
    stream is left exactly where it was. (Drawing happens on the CPU: use_cpu_initialization.)
    Streams do not nest: the run's seed is read from the generator, which a stream reseeds."""
    if _active:
        raise RuntimeError(f"init_stream{name} inside init_stream{_active[-1]}")
    seed = _stream_seed(*name)
    _active.append(name)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
    finally:
        _active.pop()
