"""Checkpoints never run code when loaded: no pickle is written, none is read (resume, tools),
and checkpoints of the older pickled format are converted once, on request."""

import io
import json
import os
import pickle
import pickletools
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, read_metrics, run_pretrain, tiny_run_overrides
from thann.checkpoint import plain


def looks_pickled(data: bytes) -> bool:
    """A file is a pickle if it parses as one (protocol 2+), or is torch.save's zip of one."""
    if data[:4] == b"PK\x03\x04":
        return True
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        try:
            pickletools.dis(io.BytesIO(data), out=io.StringIO())
        except Exception:  # noqa: BLE001 - random bytes (an array chunk) that merely start like a pickle
            return False
        return True
    return False


class CreatesAFileWhenUnpickled:
    marker = None

    def __reduce__(self):
        return open, (self.marker, "w")


def _evil_pickle(marker) -> bytes:
    payload = CreatesAFileWhenUnpickled()
    payload.marker = str(marker)
    return pickle.dumps(payload)


def _files(root):
    return [p for p in root.rglob("*") if p.is_file()]


def _tool(*args):
    return subprocess.run([sys.executable, "-m", "thann.checkpoint", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_the_detector_sees_pickles(tmp_path):
    torch.save({"a": 1}, tmp_path / "t.pt")
    assert looks_pickled((tmp_path / "t.pt").read_bytes())
    assert looks_pickled(_evil_pickle(tmp_path / "never"))
    assert not looks_pickled(json.dumps({"a": 1}).encode())
    assert not (tmp_path / "never").exists()


def test_no_file_of_a_fresh_checkpoint_is_a_pickle(tiny_checkpoint):
    checkpoint = tiny_checkpoint / "iter_0000002"
    files = _files(checkpoint)
    assert len(files) > 50
    pickled = [str(p.relative_to(checkpoint)) for p in files if looks_pickled(p.read_bytes())]
    assert pickled == []
    for name in ("common.json", "thann.json", "manifest.json", "rng/rank_00000.json"):
        json.loads((checkpoint / name).read_text())  # plain JSON, strict


def test_plain_encoding_round_trips_checkpoint_state_and_refuses_objects():
    state = {"betas": (0.9, 0.95), 0: {"lr": float("nan")}, "rng": torch.get_rng_state(),
             "bf16": torch.ones(3, dtype=torch.bfloat16), "none": None}
    back = plain.decode(json.loads(json.dumps(plain.encode(state))))
    assert back["betas"] == (0.9, 0.95) and back[0]["lr"] != back[0]["lr"]  # NaN
    assert torch.equal(back["rng"], state["rng"]) and back["bf16"].dtype == torch.bfloat16
    with pytest.raises(plain.NotPlainData, match=r"common\.sched: _io\.BytesIO is not plain data"):
        plain.encode({"sched": io.BytesIO(b"x")}, "common")


def test_pickles_beside_or_instead_of_the_side_files_never_run(tiny_corpus, tiny_checkpoint, tmp_path):
    marker = tmp_path / "code_ran"
    evil = _evil_pickle(marker)

    beside = tmp_path / "beside"
    shutil.copytree(tiny_checkpoint, beside)
    checkpoint = beside / "iter_0000002"
    for name in ("common.pt", "rng/rank_00000.pt", "objects/learnt_tokenization.attention.linear_qkv._extra_state/0.pt"):
        (checkpoint / name).parent.mkdir(parents=True, exist_ok=True)
        (checkpoint / name).write_bytes(evil)
    resumed = run_pretrain(tiny_run_overrides(tiny_corpus, beside, steps=3))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    for args in (("inspect", beside / "iter_0000002"), ("verify", beside / "iter_0000002"),
                 ("export", beside / "iter_0000002", tmp_path / "w.safetensors")):
        assert _tool(*args).returncode == 0
    generated = subprocess.run([sys.executable, "generate_thann.py", f"load={beside / 'iter_0000002'}", "prompt=Hi",
                                "max_new_tokens=2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert not marker.exists()

    instead = tmp_path / "instead"
    shutil.copytree(tiny_checkpoint, instead)
    (instead / "iter_0000002" / "common.json").write_bytes(evil)
    (instead / "iter_0000002" / "rng" / "rank_00000.json").write_bytes(evil)
    refused = run_pretrain(tiny_run_overrides(tiny_corpus, instead, steps=3))
    assert refused.returncode == 1
    assert "file 'common.json'" in refused.stderr.strip().splitlines()[-1]
    verify = _tool("verify", instead)
    assert verify.returncode == 1 and "file 'common.json'" in verify.stderr
    assert _tool("inspect", instead).returncode == 1
    generated = subprocess.run([sys.executable, "generate_thann.py", f"load={instead}", "prompt=Hi"], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
    assert generated.returncode == 1 and "file 'common.json'" in generated.stderr
    assert not marker.exists()


def _downgrade(checkpoint):
    """Rewrites a checkpoint in the format THANN wrote before this one: side files pickled with
    torch.save (common.pt, objects/*.pt, rng/rank_*.pt), object files in the manifest."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())["files"]
    for path in sorted(checkpoint.rglob("*.json")):
        relative = str(path.relative_to(checkpoint))
        if relative == "common.json" or relative.startswith(("objects/", "rng/")):
            old = path.with_suffix(".pt")
            torch.save(plain.load(str(path)), old)
            path.unlink()
            manifest.pop(relative)
            if relative.startswith("objects/"):
                import hashlib
                manifest[str(old.relative_to(checkpoint))] = hashlib.sha256(old.read_bytes()).hexdigest()
    (checkpoint / "manifest.json").write_text(json.dumps({"files": manifest}))


@pytest.mark.slow
def test_an_old_pickled_checkpoint_is_refused_until_upgraded_then_resumes_exactly(tiny_corpus, tmp_path):
    def losses(run_dir):
        return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r["split"] == "train"]

    assert run_pretrain(tiny_run_overrides(tiny_corpus, tmp_path / "straight", steps=4)).returncode == 0
    split = tiny_run_overrides(tiny_corpus, tmp_path / "run", steps=4)
    assert run_pretrain(split + ["train.stop_after_step=2"]).returncode == 0
    _downgrade(tmp_path / "run" / "iter_0000002")

    refused = run_pretrain(split)
    assert refused.returncode == 2
    assert "written by an older THANN whose side files are pickles" in refused.stderr
    assert "python -m thann.checkpoint upgrade" in refused.stderr
    inspect = _tool("inspect", tmp_path / "run")
    assert inspect.returncode == 2 and "python -m thann.checkpoint upgrade" in inspect.stderr

    upgraded = _tool("upgrade", tmp_path / "run")
    assert upgraded.returncode == 0, upgraded.stderr
    assert not list((tmp_path / "run" / "iter_0000002").rglob("*.pt"))
    assert _tool("verify", tmp_path / "run").returncode == 0
    resumed = run_pretrain(split)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")
    assert os.path.exists(tmp_path / "run" / "iter_0000004" / "common.json")
