"""Generation speed: THANN with its KV cache, THANN recomputing the whole prefix every token (no
cache), and HF transformers' Mixtral at the same shape generating with its cache, in one process.

    python benchmarks/generation.py [--model thann_tiny] [--prompt 64] [--new 256] [--batch 1 8]

Greedy, random prompts of ``--prompt`` tokens, exactly ``--new`` new tokens (no stop token),
weights as initialised (speed does not depend on what the weights are). Prints new tokens/s per
row and the ratios cache/no cache and THANN/HF.
"""

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf

from thann.cli import CONFIG_DIR
from thann.data.tokenizer import padded_vocab_size
from thann.inference.generator import Generator
from thann.inference.sampling import SamplingParams
from thann.models.thann.model import ThannModel, transformer_config
from thann.parallel import state

REAL_VOCAB = 100277  # cl100k_base


class _NoStopTokenizer:
    """Ids only; its end-of-document id is outside the vocabulary, so generation never stops early."""
    vocab_size, eod, special_ids, unused_ids = REAL_VOCAB, REAL_VOCAB + 1, {}, ()

    def decode(self, ids):
        return ""


def timed(fn, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


@torch.no_grad()
def without_cache(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    tokens = prompts
    for _ in range(new_tokens):
        positions = torch.arange(tokens.size(1), device=tokens.device).expand_as(tokens)
        logits = model(tokens, positions, None)[:, -1, :REAL_VOCAB]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


def mixtral(model_cfg, vocab_size: int, max_positions: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    kwargs = dict(
        vocab_size=vocab_size, hidden_size=model_cfg.hidden_size, intermediate_size=model_cfg.moe_ffn_hidden_size,
        num_hidden_layers=model_cfg.num_layers, num_attention_heads=model_cfg.num_attention_heads,
        num_key_value_heads=model_cfg.num_query_groups, num_local_experts=model_cfg.num_experts,
        num_experts_per_tok=model_cfg.moe_router_topk, max_position_embeddings=max_positions,
        rope_theta=model_cfg.rotary_base, tie_word_embeddings=model_cfg.tie_embeddings, attn_implementation="sdpa",
    )
    for experts in ("grouped_mm", "eager"):  # the fastest HF offers on this device
        try:
            model = MixtralForCausalLM(MixtralConfig(**kwargs, experts_implementation=experts))
            model.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=2, do_sample=False)
            return model.to(state.device()).eval(), experts
        except (RuntimeError, NotImplementedError, ValueError):
            continue
    raise RuntimeError("no HF Mixtral experts implementation runs here")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="thann_tiny")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    layout = OmegaConf.create({"tp": 1, "pp": 1, "ep": 1, "etp": 1, "sp": False})
    state.initialize(layout, dp=1, seed=1234)
    model_cfg = OmegaConf.load(f"{CONFIG_DIR}/model/{args.model}.yaml")
    vocab = padded_vocab_size(REAL_VOCAB, 1)
    length = args.prompt + args.new
    bf16 = torch.cuda.is_available()
    thann = ThannModel(transformer_config(model_cfg, layout, bf16=bf16), model_cfg, vocab, length)
    thann = thann.to(state.device(), torch.bfloat16 if bf16 else torch.float32).eval()
    hf, experts = mixtral(model_cfg, vocab, length)
    hf = hf.to(torch.bfloat16 if bf16 else torch.float32)
    generator = Generator([thann], _NoStopTokenizer(), length)
    params = SamplingParams(max_new_tokens=args.new)

    print(f"{args.model}, prompt {args.prompt} tokens, {args.new} new tokens, greedy, "
          f"{'bf16 on ' + torch.cuda.get_device_name() if bf16 else 'fp32 on CPU'}, torch {torch.__version__}; "
          f"HF Mixtral experts={experts}")
    print(f"{'batch':>5} {'THANN cache':>14} {'THANN no cache':>15} {'HF cache':>12} {'cache/no cache':>15} "
          f"{'THANN/HF':>9}   (new tokens/s, all rows)")
    for batch in args.batch:
        prompts = torch.randint(0, REAL_VOCAB, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        prompts = prompts.to(state.device())
        lists = prompts.tolist()
        cached = timed(lambda: generator.generate(lists, params), args.repeats)
        uncached = timed(lambda: without_cache(thann, prompts, args.new), 1)
        hf_cached = timed(lambda: hf.generate(prompts, max_new_tokens=args.new, min_new_tokens=args.new,
                                              do_sample=False, use_cache=True, pad_token_id=0), args.repeats)
        rate = [batch * args.new / s for s in (cached, uncached, hf_cached)]
        print(f"{batch:>5} {rate[0]:>14.1f} {rate[1]:>15.1f} {rate[2]:>12.1f} {rate[0] / rate[1]:>14.1f}x "
              f"{rate[0] / rate[2]:>8.2f}x")
    state.destroy()


if __name__ == "__main__":
    main()
