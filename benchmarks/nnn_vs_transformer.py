"""NNN against a dense transformer with the same parameter count, on the same tokens.

    python benchmarks/nnn_vs_transformer.py [--steps 300] [--seeds 1 2 3] [--contexts 1024 4096]

Training: ``pretrain_thann.py`` with ``model=nnn_tiny`` and ``model=gpt_tiny`` (both 26,745,984
parameters), ``data=sharegpt_chat`` (ChatML, loss on assistant tokens only: real next-token
targets), the same steps, batch and learning rate, for each seed; the held-out loss is the last
validation of each run. Generation: each model (as initialised: speed does not depend on the
weights) continues a prompt of each context length by 32 greedy tokens with the generation
package (KV cache for the transformer, recurrent state for NNN); the table gives decode tokens/s
and the size of the cache or state. Prints markdown tables.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("nnn_tiny", "gpt_tiny")
CHAT = os.path.join(ROOT, "data", "sharegpt_chat")


def train(model: str, seed: int, args) -> dict:
    run_dir = os.path.join(args.work_dir, f"{model}_seed{seed}")
    overrides = [f"model={model}", "data=sharegpt_chat", f"data.paths=[{args.data}]", f"train.seed={seed}",
                 f"train.steps={args.steps}", f"train.eval_interval={max(1, args.steps // 4)}", "train.eval_iters=8",
                 f"train.warmup_steps={max(1, args.steps // 10)}", "train.sample.new_tokens=0",
                 f"checkpoint.dir={run_dir}", "checkpoint.resume=false", "checkpoint.save=false",
                 "logging.wandb.enabled=false", "logging.progress=false", *args.override]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_thann.py"), *overrides], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if out.returncode != 0:
        raise RuntimeError(f"{model} seed {seed} failed:\n{out.stderr[-3000:]}")
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    valid = {r["step"]: r["lm_loss"] for r in records if r["split"] == "valid"}
    speeds = [r["tokens_per_s"] for r in records if r["split"] == "train" and r["step"] > 2]
    return {"valid": valid, "tokens_per_s": statistics.median(speeds)}


def _tensor_bytes(context) -> int:
    """Bytes of the tensors a generation context (or a part of it) holds."""
    seen, total = set(), 0

    def visit(value):
        nonlocal total
        if isinstance(value, torch.Tensor):
            if value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
        elif hasattr(value, "__dict__"):
            visit(vars(value))

    visit(context)
    return total


def generation(contexts: list[int], new_tokens: int) -> dict:
    from thann.inference.generator import Generator
    from thann.inference.sampling import SamplingParams
    from thann.models import registry
    from thann.parallel import state

    class NoStop:
        vocab_size, eod, special_ids, unused_ids = 100277, 100278, {}, ()

        def decode(self, ids):
            return ""

    layout = OmegaConf.create({"tp": 1, "pp": 1, "ep": 1, "etp": 1, "sp": False})
    state.initialize(layout, dp=1, seed=0)
    results = {}
    for name in MODELS:
        model_cfg = OmegaConf.load(os.path.join(ROOT, "configs", "model", f"{name}.yaml"))
        model, _ = registry.build(model_cfg, layout, vocab_size=100277, max_sequence_length=max(contexts) + new_tokens,
                                  bf16=False)
        model.eval()
        for context in contexts:
            prompt = torch.randint(0, 100000, (context,), generator=torch.Generator().manual_seed(context)).tolist()
            generator = Generator([model], NoStop(), context + new_tokens)
            captured = {}
            original = model.new_inference_context

            def keep(*a, **k):
                captured["context"] = original(*a, **k)
                return captured["context"]

            model.new_inference_context = keep
            start = time.perf_counter()
            generator.generate([prompt], SamplingParams(max_new_tokens=1))  # the prefill (and one token)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            generator.generate([prompt], SamplingParams(max_new_tokens=new_tokens))
            total = time.perf_counter() - start
            model.new_inference_context = original
            # NNN's context also holds its BitLinear weights quantised once for the generation:
            # model weights, not state (fixed whatever the batch or the context length).
            weights = _tensor_bytes(getattr(captured["context"], "weights", {}))
            results[(name, context)] = {"decode_tokens_per_s": (new_tokens - 1) / max(total - prefill, 1e-9),
                                        "state_mib": (_tensor_bytes(captured["context"]) - weights) / 2**20,
                                        "weights_mib": weights / 2**20}
    state.destroy()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--data", default=CHAT, help="a chat dataset with its assistant loss mask")
    parser.add_argument("--work-dir", default="/tmp/thann_nnn_vs_transformer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--override", nargs="*", default=[], help="more Hydra overrides for both models' runs")
    args = parser.parse_args()
    if not os.path.exists(args.data + ".idx"):
        subprocess.run([sys.executable, "-m", "thann.data.preprocess", "--corpus", "sharegpt_chat", "--loss-mask",
                        "--output-prefix", args.data], cwd=ROOT, check=True)
    start = time.perf_counter()
    runs = {(m, s): train(m, s, args) for m in MODELS for s in args.seeds}
    speed = generation(args.contexts, args.new_tokens)
    minutes = (time.perf_counter() - start) / 60

    def mean_std(values):
        return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)

    steps = sorted(runs[(MODELS[0], args.seeds[0])]["valid"])
    print(f"{args.steps} steps, seeds {args.seeds}, data {os.path.relpath(args.data, ROOT)} (assistant tokens), "
          f"{minutes:.1f} min; {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| model | parameters | held-out loss (mean ± std) | " + " | ".join(f"loss @ step {s}" for s in steps)
          + " | train tokens/s |")
    print("|---|---|---|" + "---|" * len(steps) + "---|")
    from thann.models import registry

    for m in MODELS:
        cfg = OmegaConf.load(os.path.join(ROOT, "configs", "model", f"{m}.yaml"))
        params = registry.size(cfg, 100277).total
        final = mean_std([runs[(m, s)]["valid"][steps[-1]] for s in args.seeds])
        curve = " | ".join(f"{statistics.mean(runs[(m, s)]['valid'][step] for s in args.seeds):.3f}" for step in steps)
        tokens = statistics.mean(runs[(m, s)]["tokens_per_s"] for s in args.seeds)
        print(f"| {m} | {params:,} | {final[0]:.3f} ± {final[1]:.3f} | {curve} | {tokens:,.0f} |")
    print("\n| model | " + " | ".join(f"decode tokens/s @ {c}" for c in args.contexts) + " | "
          + " | ".join(f"cache/state MiB @ {c}" for c in args.contexts) + " | quantised weights held MiB |")
    print("|---|" + "---|" * (2 * len(args.contexts) + 1))
    for m in MODELS:
        print(f"| {m} | " + " | ".join(f"{speed[(m, c)]['decode_tokens_per_s']:.1f}" for c in args.contexts) + " | "
              + " | ".join(f"{speed[(m, c)]['state_mib']:.4f}" for c in args.contexts)
              + f" | {speed[(m, args.contexts[-1])]['weights_mib']:.3f} |")


if __name__ == "__main__":
    main()
