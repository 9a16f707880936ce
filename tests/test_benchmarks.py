"""Benchmark scripts run end to end at tiny scale (their figures come from real machines, not here)."""

import re
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_throughput_benchmark_runs_thann_and_hf_mixtral_at_tiny_scale(tiny_corpus):
    out = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--model", "thann_tiny", "--seq-length", "32",
         "--micro-batch-size", "2", "--steps", "1", "--warmup", "1", "--profile", "--override", f"data.paths=[{tiny_corpus}]"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    peak = float(re.search(r"matmul peak ([\d.e+-]+) TFLOP/s", out.stdout).group(1)) * 1e12
    rows = re.findall(r"^(THANN|HF Mixtral).*?\s([\d.]+)\s+([\d.]+)\s+([\d.e+]+)\s+[\d.e+-]+\s+([\d.]+)%",
                      out.stdout, re.MULTILINE)
    assert [r[0] for r in rows] == ["THANN", "HF Mixtral", "HF Mixtral"], out.stdout
    for _, ms, rate, flops_per_token, mfu in rows:
        tokens_per_s = float(rate)
        assert tokens_per_s == pytest.approx(2 * 32 / (float(ms) / 1e3), rel=2e-3)  # micro-batch 2 x 32 tokens
        # MFU: the model's FLOPs per second over the measured peak (printed values, rounded)
        assert float(mfu) / 100 == pytest.approx(float(flops_per_token) * tokens_per_s / peak, rel=2e-2, abs=1e-4)
    assert re.search(r"THANN / fastest HF row: [\d.]+x", out.stdout)
    profiled = re.findall(r"^(aten::\S+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)%$", out.stdout, re.MULTILINE)
    assert len(profiled) >= 10 and any(op == "aten::_fused_adamw_" for op, *_ in profiled), out.stdout


@pytest.mark.slow
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


@pytest.mark.slow
def test_contrastive_memory_benchmark_prints_a_row_per_global_batch(pairs_with_negatives):
    out = subprocess.run([sys.executable, "benchmarks/contrastive_memory.py", "--global-batches", "4", "--micro-batch",
                          "2", "--steps", "1", "--data", pairs_with_negatives], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    row = re.search(r"^\s+4\s+(\d+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)$", out.stdout, re.MULTILINE)
    assert row and all(float(v) > 0 for v in row.groups()), out.stdout


@pytest.mark.slow
def test_checkpoint_io_benchmark_reports_the_size_on_disk_and_its_rates(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/checkpoint_io.py", "--model", "thann_tiny", "--layers", "2",
                          "--repeats", "1", "--disk-gib", "0.0625", "--dir", str(tmp_path / "bench"), "--keep"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    disk_write, disk_read = map(float, re.search(r"^disk: write ([\d.]+) GB/s .*, read ([\d.]+) GB/s", out.stdout,
                                                 re.MULTILINE).groups())
    def columns(n: int) -> str:
        return r" \| ".join([r"([\d.]+)"] * n)

    saves = re.findall(r"^\| (zarr|torch_dist) \| (sync|async|unflushed) \| " + columns(9) + r" \|$", out.stdout,
                       re.MULTILINE)
    loads = re.findall(r"^\| (zarr|torch_dist) \| " + columns(4) + r" \|$", out.stdout, re.MULTILINE)
    assert [r[:2] for r in saves] == [("zarr", "sync"), ("zarr", "async"), ("zarr", "unflushed"),
                                      ("torch_dist", "sync"), ("torch_dist", "async")], out.stdout
    assert [r[0] for r in loads] == ["zarr", "torch_dist"], out.stdout
    sync = {r[0]: float(r[3]) for r in saves if r[1] == "sync"}
    for fmt, mode, size, save, save_rate, of_disk, blocked, of_sync, polls, steps, step in saves:
        checkpoint = next((tmp_path / "bench" / fmt).glob("iter_*"))
        on_disk = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
        assert float(size) == pytest.approx(on_disk / 1e9, abs=1e-4)  # measured here, walking the directory
        # weights and two Adam moments of 14.7M fp32 parameters, and little else
        assert 3 * 14_670_464 * 4 <= on_disk <= 1.05 * 3 * 14_670_464 * 4
        # rates are printed to 3 decimals (a slow disk's tiny checkpoint: 0.006 GB/s)
        assert float(save_rate) == pytest.approx(float(size) / float(save), rel=0.02, abs=5e-4)
        assert float(of_disk) == pytest.approx(float(save_rate) / disk_write, rel=0.02, abs=0.006)
        assert float(of_sync) == pytest.approx(float(blocked) / sync[fmt], rel=0.02, abs=0.002)
        if mode != "async":
            assert blocked == save and steps == "0" and float(polls) == 0
        else:  # the loop trained until the checkpoint was published, each poll counted as blocked
            assert int(steps) >= 1 and float(polls) <= float(blocked) <= float(save)
    for fmt, size, load, load_rate, of_disk in loads:
        assert float(load_rate) == pytest.approx(float(size) / float(load), rel=0.02, abs=5e-4)
        assert float(of_disk) == pytest.approx(float(load_rate) / disk_read, rel=0.02, abs=0.006)


def test_preprocess_benchmark_counts_the_tokens_tiktoken_makes():
    from thann.data.corpora import sharegpt_text
    from thann.data.tokenizer import build_tokenizer

    out = subprocess.run([sys.executable, "benchmarks/preprocess_throughput.py", "--documents", "40", "--workers", "1",
                          "--repeats", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    documents, tokens = re.search(r"^\s+1\s+(\d+)\s+([\d,]+)\s", out.stdout, re.MULTILINE).groups()
    encoding = build_tokenizer("tiktoken", "cl100k_base")
    texts = [d.text for _, d in zip(range(40), sharegpt_text())]
    assert int(documents) == 40
    assert int(tokens.replace(",", "")) == sum(len(encoding.encode(t)) + 1 for t in texts)  # + end-of-document


@pytest.mark.slow
def test_step_benchmark_times_thann_beside_the_stock_spec_at_the_same_shape():
    out = subprocess.run([sys.executable, "benchmarks/step_vs_gpt.py", "--steps", "1", "--micro-batch", "2",
                          "--seq", "32"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r"^\| (.+?) \| ([\d.]+)M \| ([\d.]+) \| ([\d,]+) \|$", out.stdout, re.MULTILINE)
    assert len(rows) == 2, out.stdout
    (_, thann_params, thann_ms, thann_rate), (_, stock_params, _, _) = rows
    assert float(thann_params) == pytest.approx(14.67, abs=0.005)  # thann_tiny: 14,670,464
    # the stock spec has no learnt tokenization (3 depthwise convolutions, a mix, an attention, a norm)
    h = 128
    assert float(thann_params) - float(stock_params) == pytest.approx((15 * h + 3 * h * h + h + 4 * h * h) / 1e6,
                                                                      abs=0.01)
    assert int(thann_rate.replace(",", "")) == pytest.approx(2 * 32 / (float(thann_ms) / 1e3), rel=0.01)


@pytest.mark.slow
def test_nnn_benchmark_compares_models_of_the_same_size(tiny_chat_corpus, tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/nnn_vs_transformer.py", "--steps", "4", "--seeds", "1",
                          "--contexts", "64", "--new-tokens", "4", "--data", tiny_chat_corpus, "--work-dir",
                          str(tmp_path), "--override", "train.eval_iters=1", "train.global_batch_size=2",
                          "train.micro_batch_size=2", "train.seq_length=64"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    params = dict(re.findall(r"^\| (nnn_tiny|gpt_tiny) \| ([\d,]+) \|", out.stdout, re.MULTILINE))
    assert params == {"nnn_tiny": "26,745,984", "gpt_tiny": "26,745,984"}, out.stdout
    # gpt_tiny's KV cache for one sequence of 64 + 4 positions: keys and values of 4 layers, 128 floats each
    cache = re.search(r"^\| gpt_tiny \| [\d.]+ \| ([\d.]+) \|", out.stdout, re.MULTILINE).group(1)
    assert float(cache) == pytest.approx(2 * 4 * (64 + 4) * 128 * 4 / 2**20, abs=0.005)


@pytest.mark.slow
def test_pooling_layers_benchmark_prints_each_pooling_of_a_pretraining_checkpoint(tiny_checkpoint):
    out = subprocess.run([sys.executable, "benchmarks/pooling_layers.py", "--load", str(tiny_checkpoint),
                          "--train", "40", "--test", "20", "--k", "3"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r"^\| ([^|]+?) \| " + r" \| ".join([r"([\d.]+)"] * 6) + r" \|$", out.stdout, re.MULTILINE)
    names = [r[0] for r in rows]
    assert names[0] == "token embeddings" and names[-2:] == ["final states (mean pooling)", "first-last"], out.stdout
    assert names[1:-2] == [f"decoder layer {i + 1}" for i in range(len(names) - 3)] and len(names) > 3
    assert all(0 <= float(v) <= 1 for r in rows for v in r[1:])
    missing = subprocess.run([sys.executable, "benchmarks/pooling_layers.py", "--load", str(tiny_checkpoint) + "_none"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("invalid config: load=")
    assert missing.stderr.count("\n") == 1
