"""The model registry: every model is counted and its training FLOPs predicted from its shape
alone (thann.models.common.size), and torch's FlopCounterMode, counting the matrix products a
forward and backward actually run, agrees."""

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from conftest import ROOT

aten = torch.ops.aten


def _conv(x_shape, w_shape, out_shape, groups: int) -> int:
    # every output element: a multiply and an add per input channel of its group and kernel tap
    return 2 * out_shape[0] * out_shape[1] * out_shape[2] * (x_shape[1] // groups) * w_shape[2]


def _raw(formula):
    formula._get_raw = True
    return formula


@_raw
def _convolution(x, w, bias, stride, padding, dilation, transposed, output_padding, groups, out_val=None, **kwargs):
    return _conv(x.shape, w.shape, out_val.shape, groups)


@_raw
def _convolution_backward(grad_out, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding, groups,
                          output_mask, out_val=None, **kwargs):
    # torch's own formula ignores groups (a depthwise convolution counted as a dense one)
    return _conv(x.shape, w.shape, grad_out.shape, groups) * (int(output_mask[0]) + int(output_mask[1]))


@_raw
def _grouped_mm(a, b, offs=None, bias=None, out_dtype=None, out_val=None, **kwargs):
    if a.dim() == 2 and b.dim() == 3:  # tokens [T, K] through their experts' [G, K, N]
        return 2 * a.shape[0] * a.shape[1] * b.shape[2]
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]  # [K, T] x [T, N] grouped along T: the weight gradients


def _sdpa(query, key, value, *args, out_val=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def _sdpa_backward(grad_out, query, key, value, *args, out_val=None, **kwargs):
    # Model FLOPs: the gradients of both products (twice the forward); torch's own count adds the
    # scores a flash kernel recomputes in backward, which is the kernel's work, not the model's.
    return 2 * sdpa_flop_count(query, key, value)


# The operators torch's counter misses or miscounts on this CPU path.
MAPPING = {aten.convolution: _convolution, aten.convolution_backward: _convolution_backward,
           aten._grouped_mm: _grouped_mm, aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
           aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward}


def _args(name: str, **fields):
    return OmegaConf.merge(OmegaConf.load(f"{ROOT}/configs/model/{name}.yaml"), fields)


@pytest.mark.parametrize("args", [
    _args("thann_tiny"), _args("thann_tiny", tie_embeddings=False),
    _args("thann_tiny", tokenization={"enabled": False}),
    _args("gpt_tiny"), _args("nnn_tiny"),
    _args("thann_tiny", arch="thann_encoder", pooling="mean", projection_dim=64, learnt_temperature=0.05),
    _args("thann_tiny", arch="thann_value"),
], ids=["thann", "thann_untied", "thann_no_tokenization", "gpt", "nnn", "thann_encoder", "thann_value"])
def test_the_flop_formula_is_what_a_forward_and_backward_compute(single_rank, args):
    from thann.models import registry

    B, S, V = 2, 32, 512  # a small vocabulary: the head does not hide the rest
    model, _ = registry.build(args, single_rank, vocab_size=V, max_sequence_length=S, bf16=False)
    tokens = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(S).expand(B, S)
    with FlopCounterMode(display=False, custom_mapping=MAPPING) as counter:
        if args.arch == "thann_encoder":
            output = model(tokens, positions, torch.full((B,), S))
        elif args.arch == "thann_value":
            output = model(tokens, positions)
        else:
            output = model(tokens, positions, None, labels=tokens)
        output.float().sum().backward()
    size = registry.size(args, V)
    assert sum(p.numel() for p in model.parameters()) == size.total
    assert counter.get_total_flops() == pytest.approx(size.flops_per_token(S) * B * S, rel=1e-3), \
        counter.get_flop_counts()["Global"]


def test_every_model_config_is_built_and_counted_through_the_registry(single_rank):
    import glob
    import os

    from thann.data.classification import heads
    from thann.models import registry

    for path in sorted(glob.glob(f"{ROOT}/configs/model/*.yaml")):
        args = OmegaConf.load(path)
        if "defaults" in args:  # chaosnet_mlp extends chaosnet
            base = OmegaConf.load(os.path.join(os.path.dirname(path), f"{args.defaults[0]}.yaml"))
            args = OmegaConf.merge(base, {k: v for k, v in args.items() if k != "defaults"})
        spec = registry.spec_of(args)
        if not spec.reads_tokens:
            args = OmegaConf.merge(args, {"heads": heads(["mnist", "newsgroups20"])})
        with torch.device("meta"):
            model, _ = registry.build(args, single_rank, vocab_size=100277, max_sequence_length=64, bf16=False,
                                      perform_initialization=False)
        assert sum(p.numel() for p in model.parameters()) == registry.size(args, 100277).total, path
