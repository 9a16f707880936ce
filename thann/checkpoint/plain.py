"""Plain data to and from strict JSON: every non-tensor part of a checkpoint, never pickled.

JSON has no tuples, no non-string keys, no NaN and no bytes, and checkpoints hold all four
(optimizer ``betas``, chained-optimizer indices, RNG states). Each such value is written as a
one-key object naming its kind, so it comes back as exactly what was saved:

    (0.9, 0.95)              {"__tuple__": [0.9, 0.95]}
    {0: {...}}               {"__dict__": [[0, {...}]]}
    float("nan")             {"__float__": "nan"}
    torch.tensor([1, 2])     {"__tensor__": {"dtype": "int64", "shape": [2], "data": "<base64>"}}
    numpy array              {"__ndarray__": {...same...}}

Anything else (a class instance, a buffer, a function) raises ``NotPlainData`` naming where it
sits, so a new kind of state is converted deliberately rather than smuggled in through pickle.
"""

import base64
import json
import math

import numpy as np
import torch

_TORCH_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}
_TAGS = ("__tuple__", "__dict__", "__float__", "__tensor__", "__ndarray__")


class NotPlainData(TypeError):
    pass


def _array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode("ascii")}


def encode(value, where: str = "state"):
    """A JSON-ready copy of ``value``; ``where`` names it in errors (e.g. ``common.optimizer``)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        if t.dtype not in _TORCH_DTYPES.values():
            raise NotPlainData(f"{where}: tensor of dtype {t.dtype} has no plain encoding")
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        return {"__tensor__": {**_array(raw.numpy()), "torch_dtype": str(t.dtype).removeprefix("torch.")}}
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise NotPlainData(f"{where}: numpy array of Python objects")
        return {"__ndarray__": _array(value)}
    if isinstance(value, np.generic):
        return encode(value.item(), where)
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value)) in _TAGS):
            return {k: encode(v, f"{where}.{k}") for k, v in value.items()}
        for k in value:
            if not isinstance(k, (str, int, bool, type(None))):
                raise NotPlainData(f"{where}: dictionary key {k!r} of type {type(k).__name__}")
        return {"__dict__": [[k, encode(v, f"{where}.{k}")] for k, v in value.items()]}
    raise NotPlainData(f"{where}: {type(value).__module__}.{type(value).__qualname__} is not plain data; "
                       "give it an explicit conversion in thann.checkpoint.plain")


def _from_array(spec: dict) -> np.ndarray:
    data = base64.b64decode(spec["data"])
    return np.frombuffer(data, dtype=np.dtype(spec["dtype"])).reshape(spec["shape"]).copy()


def decode(value):
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        tag, body = next(iter(value.items()))
        if tag == "__tuple__":
            return tuple(decode(v) for v in body)
        if tag == "__dict__":
            return {k: decode(v) for k, v in body}
        if tag == "__float__":
            return float(body)
        if tag == "__ndarray__":
            return _from_array(body)
        if tag == "__tensor__":
            t = torch.from_numpy(_from_array(body))
            dtype = _TORCH_DTYPES[body["torch_dtype"]]
            return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t.to(dtype)
    return {k: decode(v) for k, v in value.items()}


def dump(value, path: str, where: str) -> None:
    with open(path, "w") as f:
        json.dump(encode(value, where), f, allow_nan=False)


def load(path: str):
    """Reads a file written by ``dump``; anything that is not JSON fails here, unexecuted."""
    with open(path, "rb") as f:
        return loads(f.read(), path)


def loads(data: bytes, path: str):
    """The value of a file's bytes (``path`` names it in errors)."""
    try:
        return decode(json.loads(data.decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e.__class__.__name__}); the checkpoint is damaged") from None
