"""Benchmark scripts run end to end at tiny scale (their figures come from real machines, not here)."""

import re
import subprocess
import sys

from conftest import ROOT


def test_throughput_benchmark_runs_thann_and_hf_mixtral_at_tiny_scale(tiny_corpus):
    out = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--model", "thann_tiny", "--seq-length", "32",
         "--micro-batch-size", "2", "--steps", "1", "--warmup", "1", "--profile", "--override", f"data.paths=[{tiny_corpus}]"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r"^(THANN|HF Mixtral).*?\s([\d.]+)\s+([\d,]+)\s+[\d.]+\s+[\d.]+%", out.stdout, re.MULTILINE)
    assert [r[0] for r in rows] == ["THANN", "HF Mixtral", "HF Mixtral"], out.stdout
    assert all(float(ms) > 0 and int(rate.replace(",", "")) > 0 for _, ms, rate in rows)
    assert re.search(r"THANN / fastest HF row: [\d.]+x", out.stdout)
    profiled = re.findall(r"^(aten::\S+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)%$", out.stdout, re.MULTILINE)
    assert len(profiled) >= 10 and any(op == "aten::_fused_adamw_" for op, *_ in profiled), out.stdout


def test_generation_benchmark_prints_thann_and_hf_rows():
    out = subprocess.run([sys.executable, "benchmarks/generation.py", "--prompt", "8", "--new", "4", "--batch", "1",
                          "--repeats", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    row = re.search(r"^\s+1\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x\s+([\d.]+)x$", out.stdout, re.MULTILINE)
    assert row and all(float(v) > 0 for v in row.groups()), out.stdout


def test_cpu_accommodations_benchmark_counts_calls_through_the_mode(tiny_corpus, cpu_only):
    out = subprocess.run([sys.executable, "benchmarks/cpu_accommodations.py", "--steps", "1", f"data.paths=[{tiny_corpus}]",
                          "train.micro_batch_size=2", "train.global_batch_size=2", "train.seq_length=32"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    calls = re.search(r"torch calls through the mode\s+(\d+) per step", out.stdout)
    assert calls and int(calls.group(1)) > 100, out.stdout


def test_contrastive_memory_benchmark_prints_a_row_per_global_batch(pairs_with_negatives):
    out = subprocess.run([sys.executable, "benchmarks/contrastive_memory.py", "--global-batches", "4", "--micro-batch",
                          "2", "--steps", "1", "--data", pairs_with_negatives], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    row = re.search(r"^\s+4\s+(\d+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)$", out.stdout, re.MULTILINE)
    assert row and all(float(v) > 0 for v in row.groups()), out.stdout
