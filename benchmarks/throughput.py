"""THANN training throughput against HF transformers' Mixtral at the same shape, in one process.

    python benchmarks/throughput.py                                    # thann_800m, seq 2048, micro-batch 4
    python benchmarks/throughput.py --override model.moe_ffn_hidden_size=768 --micro-batch-size 8
    python benchmarks/throughput.py --max-micro-batch                  # largest that fits at 2048 and 4096
    python benchmarks/throughput.py --rows thann --profile             # + where one THANN step's time goes
    python benchmarks/throughput.py --model thann_tiny --seq-length 64 --micro-batch-size 2 --steps 3 --warmup 1

Rows, each on the same token batches (the first micro-batches of the configured dataset):

- ``THANN``: full training steps exactly as ``pretrain_thann.py`` runs them (the Trainer: forward,
  backward, megatron-core's optimizer with fp32 master weights, clipping, the learnt tokenization);
  one micro-batch per optimizer step.
- ``HF Mixtral, Trainer-style``: ``MixtralForCausalLM`` with ``experts_implementation="grouped_mm"``
  and SDPA, fp32 weights, bf16 autocast, fused AdamW, clipping at 1.0 (what HF Trainer does).
- ``HF Mixtral, bf16 weights``: the same model in bf16 with fused AdamW on the bf16 weights.

Each row: median step time of ``--steps`` steps after ``--warmup`` (synchronized), tokens/s,
model TFLOP/s (thann.models.common.size: 6 per active matmul parameter + 12·L·h·s per token, each
model's own parameters), MFU against
a matmul peak measured at start (bf16 8192³ on GPU; fp32 on CPU, for a smoke run only), and
peak memory. On CPU the "bf16" rows stay fp32 (no autocast, no fused AdamW).

``--profile`` runs one more THANN step under torch.profiler and prints the operators that take
the most self time (GPU kernel time on a GPU, CPU time on CPU), per step.
"""

import argparse
import datetime
import gc
import statistics
import sys
import time
from importlib.metadata import version

import torch
from hydra import compose, initialize_config_dir

from thann.cli import CONFIG_DIR
from thann.data.datasets import build_datasets, micro_batches
from thann.data.order import SampleOrder
from thann.data.tokenizer import build_tokenizer, padded_vocab_size
from thann.models import registry
from thann.models.common.size import Size
from thann.parallel import state
from thann.recipes.pretrain import Pretrain
from thann.training.trainer import Trainer


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak(repeats: int = 20) -> float:
    """Measured matmul FLOP/s: bf16 8192³ on GPU, fp32 1024³ on CPU."""
    cuda = torch.cuda.is_available()
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    a = torch.randn(n, n, dtype=dtype, device="cuda" if cuda else "cpu")
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def timed_steps(step, warmup: int, steps: int) -> float:
    """Median seconds of ``steps`` calls of ``step`` after ``warmup`` calls."""
    times = []
    for i in range(warmup + steps):
        synchronize()
        start = time.perf_counter()
        step(i)
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def peak_memory_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def thann_config(args, micro_batch_size: int, seq_length: int):
    overrides = [f"model={args.model}", f"train.seq_length={seq_length}", f"train.micro_batch_size={micro_batch_size}",
                 f"train.global_batch_size={micro_batch_size}", f"train.steps={args.warmup + args.steps + 1}",
                 "train.warmup_steps=1", "train.eval_iters=1", f"train.recompute={args.recompute}",
                 "checkpoint.save=false", "checkpoint.resume=false", "checkpoint.dir=/tmp/thann_throughput",
                 "logging.wandb.enabled=false", "logging.progress=false", *args.override]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def print_profile(step, top: int = 20) -> None:
    """Operators by self time in one call of ``step``: device (kernel) time on GPU, CPU time on CPU."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3
    # Operators only (kernels are counted in the operator that launched them).
    ops = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
    self_us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total_ms = sum(self_us(e) for e in ops) / 1e3
    print(f"one THANN step under the profiler: {wall_ms:.1f} ms wall, {total_ms:.1f} ms "
          f"{'of GPU kernels' if cuda else 'of CPU operator self time'}")
    print(f"{'operator':60} {'calls':>6} {'ms':>8} {'share':>6}")
    for e in sorted(ops, key=self_us, reverse=True)[:top]:
        print(f"{e.key[:60]:60} {e.count:6d} {self_us(e) / 1e3:8.2f} {self_us(e) / 1e3 / total_ms:6.1%}")


def run_thann(cfg, warmup: int, steps: int, profile: bool = False) -> dict:
    trainer = batches = None
    try:
        trainer = Trainer(cfg, Pretrain)
        batches = trainer.recipe.train_batches(0)
        seconds = timed_steps(lambda i: trainer.train_step(batches), warmup, steps)
        if profile:
            print_profile(lambda: trainer.train_step(batches))
        spec = trainer.specs["model"]
        flops = registry.size(spec.args, spec.vocab_size).flops_per_token(spec.seq_length)
        return {"seconds": seconds, "flops_per_token": flops, "memory": peak_memory_gib()}
    finally:
        trainer = batches = None  # frees the model before the next row
        state.destroy()
        release()


def token_batches(cfg, count: int) -> tuple[list[torch.Tensor], int]:
    """The token ids of the first ``count`` micro-batches THANN trains on (one rank), and the
    padded vocabulary size."""
    train = cfg.train
    tokenizer = build_tokenizer(cfg.data.tokenizer.type, cfg.data.tokenizer.model)
    dataset, _ = build_datasets(cfg.data, tokenizer, train.seq_length, train.seed,
                                train_samples=train.steps * train.global_batch_size,
                                valid_samples=train.global_batch_size)
    batches = micro_batches(dataset, SampleOrder(train.global_batch_size, train.micro_batch_size, 1, 0))
    return [next(batches)["tokens"] for _ in range(count)], padded_vocab_size(tokenizer.vocab_size, 1)


def mixtral(cfg, vocab_size: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    m = cfg.model
    config = MixtralConfig(
        vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.moe_ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, num_local_experts=m.num_experts,
        num_experts_per_tok=m.moe_router_topk, max_position_embeddings=cfg.train.seq_length,
        rope_theta=m.rotary_base, tie_word_embeddings=m.tie_embeddings, output_router_logits=True,
        router_aux_loss_coef=m.moe_aux_loss_coeff, attn_implementation="sdpa",
        experts_implementation="grouped_mm" if torch.cuda.is_available() else "eager",
    )
    model = MixtralForCausalLM(config)
    h, L, s = m.hidden_size, m.num_layers, cfg.train.seq_length
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    embedding = model.model.embed_tokens.weight.numel()
    active = total - experts + experts * m.moe_router_topk // m.num_experts
    # The one FLOP formula (thann.models.common.size): the LM head multiplies (a tied one is the
    # embedding table), an untied embedding table is only looked up.
    matmul = active if m.tie_embeddings else active - embedding
    return model, Size(total, active, matmul, attention_layers=L, attention_width=h).flops_per_token(s)


def run_mixtral(cfg, tokens: list[torch.Tensor], vocab_size: int, bf16_weights: bool, args) -> dict:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model, flops_per_token = mixtral(cfg, vocab_size)
    model = model.to(device, dtype=torch.bfloat16 if bf16_weights and cuda else torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=cuda)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and not bf16_weights)
    batches = [t.to(device) for t in tokens]

    def step(i: int) -> None:
        ids = batches[i]
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss  # includes the router's auxiliary loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        seconds = timed_steps(step, args.warmup, args.steps)
        return {"seconds": seconds, "flops_per_token": flops_per_token, "memory": peak_memory_gib()}
    finally:
        del model, optimizer, batches
        release()


def fits(args, micro_batch_size: int, seq_length: int) -> bool:
    try:
        run_thann(thann_config(args, micro_batch_size, seq_length), warmup=1, steps=1)
        return True
    except torch.OutOfMemoryError:
        return False


def max_micro_batch(args) -> None:
    for seq_length in (2048, 4096):
        best, size = None, 1
        while size <= 64 and fits(args, size, seq_length):
            best, size = size, size * 2
        print(f"largest power-of-two micro-batch (up to 64) at sequence {seq_length}, "
              f"recompute {args.recompute}: {best}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="thann_800m")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="measured steps (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    parser.add_argument("--rows", nargs="+", choices=["thann", "hf_trainer", "hf_bf16"],
                        default=["thann", "hf_trainer", "hf_bf16"])
    parser.add_argument("--override", nargs="*", default=[], help="Hydra overrides for THANN (and the HF shape)")
    parser.add_argument("--max-micro-batch", action="store_true", help="only search the largest micro-batch")
    parser.add_argument("--profile", action="store_true", help="also profile one THANN step (operators by time)")
    args = parser.parse_args()
    if args.max_micro_batch:
        max_micro_batch(args)
        return
    cfg = thann_config(args, args.micro_batch_size, args.seq_length)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    peak = matmul_peak()
    print(f"{datetime.date.today()} on {device}: torch {torch.__version__}, megatron-core {version('megatron-core')}, "
          f"matmul peak {peak / 1e12:.4g} TFLOP/s; model={args.model} {' '.join(args.override)} "
          f"seq {args.seq_length} micro-batch {args.micro_batch_size} recompute {args.recompute}")
    results = {}
    if "thann" in args.rows:
        results["THANN (fp32 master, bf16 compute)"] = run_thann(cfg, args.warmup, args.steps, args.profile)
    hf_rows = {"hf_trainer": ("HF Mixtral, Trainer-style (fp32 + autocast)", False),
               "hf_bf16": ("HF Mixtral, bf16 weights", True)}
    if any(r in args.rows for r in hf_rows):
        tokens, vocab_size = token_batches(cfg, args.warmup + args.steps)
        for row, (name, bf16_weights) in hf_rows.items():
            if row in args.rows:
                results[name] = run_mixtral(cfg, tokens, vocab_size, bf16_weights, args)
    tokens_per_step = args.micro_batch_size * args.seq_length
    print(f"{'row':45} {'step ms':>8} {'tokens/s':>10} {'FLOP/token':>10} {'TFLOP/s':>8} {'MFU':>7} {'peak GiB':>8}")
    for name, r in results.items():
        rate = tokens_per_step / r["seconds"]
        flops = r["flops_per_token"] * rate
        memory = f"{r['memory']:8.1f}" if r["memory"] is not None else f"{'-':>8}"
        print(f"{name:45} {r['seconds'] * 1e3:8.1f} {rate:10.1f} {r['flops_per_token']:10.4g} {flops / 1e12:8.4g} "
              f"{flops / peak:7.2%} {memory}")
    thann = next((r for n, r in results.items() if n.startswith("THANN")), None)
    hf = [r for n, r in results.items() if n.startswith("HF")]
    if thann and hf:
        print(f"THANN / fastest HF row: {min(r['seconds'] for r in hf) / thann['seconds']:.2f}x tokens/s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
