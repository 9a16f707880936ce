"""Time one training step of thann_tiny against megatron-core's stock local GPT MoE spec at the
same shape (same hidden size, layers, heads, 16 experts top-4, expert FFN, vocabulary).

    python benchmarks/step_vs_gpt.py [--steps 10] [--micro-batch 8] [--seq 128]

A step is forward + backward + AdamW update on one micro-batch; the table shows the median of
``--steps`` timed steps after warm-up. Runs on CPU (or the GPU if there is one).
"""

import argparse
import statistics
import time

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from omegaconf import OmegaConf

from thann.cli import CONFIG_DIR
from thann.data.tokenizer import padded_vocab_size
from thann.models import registry
from thann.parallel import state


def time_steps(model, tokens, steps: int) -> float:
    positions = torch.arange(tokens.size(1), device=tokens.device).expand_as(tokens)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seconds = []
    for i in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        loss = model(tokens, positions, None, labels=tokens).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= 2:
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()

    layout = OmegaConf.create({"tp": 1, "pp": 1, "ep": 1, "etp": 1, "sp": False})
    state.initialize(layout, dp=1, seed=1234)
    model_cfg = OmegaConf.load(f"{CONFIG_DIR}/model/thann_tiny.yaml")
    tokens = torch.randint(0, 100277, (args.micro_batch, args.seq), device=state.device())
    thann, config = registry.build(model_cfg, layout, vocab_size=100277, max_sequence_length=args.seq, bf16=False)
    models = {
        "THANN (learnt tokenization, SDPA, grouped experts)": thann,
        "megatron-core local GPT spec (SequentialMLP)": GPTModel(
            config, get_gpt_layer_local_spec(num_experts=model_cfg.num_experts, moe_grouped_gemm=False),
            padded_vocab_size(100277, 1), args.seq, share_embeddings_and_output_weights=True,
            position_embedding_type="rope"),
    }
    rows = []
    for name, model in models.items():
        model = model.to(state.device())
        seconds = time_steps(model, tokens, args.steps)
        rows.append((name, sum(p.numel() for p in model.parameters()), seconds))

    tokens_per_step = args.micro_batch * args.seq
    print(f"\ndevice: {state.device()}, threads: {torch.get_num_threads()}, micro-batch {args.micro_batch} x seq {args.seq}, "
          f"median of {args.steps} steps")
    print("| model | params | step (ms) | tokens/s |\n|---|---|---|---|")
    for name, params, seconds in rows:
        print(f"| {name} | {params / 1e6:.2f}M | {seconds * 1e3:.1f} | {tokens_per_step / seconds:,.0f} |")
    print(f"THANN / stock step-time ratio: {rows[0][2] / rows[1][2]:.3f}")
    state.destroy()


if __name__ == "__main__":
    main()
