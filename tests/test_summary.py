"""python -m thann.summary prints every model config's parameter counts, equal to counts written
here from the architectures; bad input is one line with exit code 2."""

import glob
import math
import os
import re
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import ROOT, slow_case

CONFIG_DIR = os.path.join(ROOT, "configs")
MODELS = sorted(os.path.basename(p).removesuffix(".yaml")
                for p in glob.glob(os.path.join(CONFIG_DIR, "model", "*.yaml")))
VOCAB = 100352  # cl100k_base's 100,277 tokens padded for tensor parallelism
CLASSES = {"mnist": ("image", 10), "fashion_mnist": ("image", 10), "newsgroups20": ("text", 20)}


def _summary(*args):
    return subprocess.run([sys.executable, "-m", "thann.summary", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def _attention(m) -> int:
    """Query, key, value and output projections, no biases."""
    h, kv = m.hidden_size, m.num_query_groups * (m.hidden_size // m.num_attention_heads)
    return h * h + 2 * h * kv + h * h


def _embeddings(m) -> int:
    return VOCAB * m.hidden_size * (1 if m.tie_embeddings else 2)


def _thann(m) -> tuple[int, int]:
    h, widths, expert = m.hidden_size, list(m.tokenization.conv_widths), 3 * m.hidden_size * m.moe_ffn_hidden_size
    # depthwise convolutions, their mix, a norm and an attention
    tokenization = sum(widths) * h + len(widths) * h * h + h + _attention(m)
    layer = h + _attention(m) + h + m.num_experts * h + m.num_experts * expert  # norms, router, SwiGLU experts
    total = _embeddings(m) + tokenization + m.num_layers * layer + h
    return total, total - m.num_layers * (m.num_experts - m.moe_router_topk) * expert


def _gpt(m) -> tuple[int, int]:
    h = m.hidden_size
    total = _embeddings(m) + m.num_layers * (2 * h + _attention(m) + 3 * h * m.ffn_hidden_size) + h
    return total, total


def _nnn(m) -> tuple[int, int]:
    assert not m.cross_node_attention
    d = m.hidden_size
    inner = m.intermediate_size or 256 * math.ceil(8 * d // 3 / 256)

    def bitlinear(fan_in, fan_out):  # a ternary weight and the RMSNorm of its input
        return fan_in * fan_out + fan_in

    token_mixer = 4 * bitlinear(d, d) + d
    channel_mixer = bitlinear(d, 2 * inner) + bitlinear(inner, d)
    node = d + token_mixer + d + channel_mixer + d  # two norms and a global weight
    total = 2 * VOCAB * d + m.num_nodes * (node + d) + d  # + a lower bound per node, the final norm
    return total, total


def _chaosnet_parts(m):
    """(front-ends, classes over all heads) for the default datasets of configs/classify.yaml."""
    datasets = OmegaConf.load(os.path.join(CONFIG_DIR, "classify.yaml")).classify.datasets
    frontends = 0
    if any(CLASSES[d][0] == "image" for d in datasets):
        channels, size = m.image.channels, m.image.size
        for out in m.image.conv_channels:
            frontends += out * channels * 9 + out
            channels, size = out, size // 2
        frontends += channels * size * size * m.input_width + m.input_width
    if any(CLASSES[d][0] == "text" for d in datasets):
        frontends += (m.text.vocab_size + 1) * m.input_width  # a padding row
    return frontends, sum(CLASSES[d][1] for d in datasets)


def _chaosnet(m) -> tuple[int, None]:
    frontends, classes = _chaosnet_parts(m)
    n, i = m.neurons, m.input_width
    return frontends + n * i + n + n * n + (n + 1) * classes, None


def _mlp_baseline(m) -> tuple[int, None]:
    frontends, classes = _chaosnet_parts(m)

    def mlp(width):
        return frontends + width * (m.input_width + 1) + (width + 1) * classes

    chaosnet, _ = _chaosnet(m)
    width = m.hidden_width or min(range(1, 100_000), key=lambda w: abs(mlp(w) - chaosnet))
    return mlp(width), None


def _nhsnet(m) -> tuple[int, None]:
    """Every tensor as allocated (dormant growth capacity included); the heads read the last
    feature map, flattened or mean-pooled."""
    datasets = OmegaConf.load(os.path.join(CONFIG_DIR, "classify.yaml")).classify.datasets
    assert all(CLASSES[d][0] == "image" for d in datasets)

    def norm(c):  # GroupNorm: a gain and a bias per channel
        return 2 * c

    capacity = m.growth.max_widths if m.growth.enabled else m.widths
    total, channels, size = m.image.channels * m.stem_width * 9 + norm(m.stem_width), m.stem_width, m.image.size
    for stage, (width, blocks) in enumerate(zip(m.widths, m.blocks)):
        hidden = max(1, width // m.reduction)
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            size = -(-size // stride)
            total += channels * capacity[stage] * 9 + norm(capacity[stage]) + capacity[stage] * width * 9 + norm(width)
            if stride != 1 or channels != width:
                total += channels * width + norm(width)  # 1×1 shortcut
            if m.gate.enabled:  # width -> hidden -> (n, m, h) per channel
                total += width * hidden + hidden + hidden * 3 * width + 3 * width
            if m.se.enabled:
                total += width * hidden + hidden + hidden * width + width
            channels = width
    features = channels * (size * size if m.pool == "flatten" else 1)
    return total + sum((features + 1) * CLASSES[d][1] for d in datasets), None


def _vit(m) -> tuple[int, int]:
    h, patches = m.hidden_size, (m.image_size // m.patch_size) ** 2
    norm = 2 * h  # LayerNorm: a gain and a bias
    layer = norm + _attention(m) + norm + 3 * h * m.ffn_hidden_size  # SwiGLU: gate, up, down
    # patch convolution (no bias), position embeddings, the norms before and after the layers, projection
    total = 3 * m.patch_size ** 2 * h + patches * h + norm + m.num_layers * layer + norm + (m.projection_dim or 0) * h
    return total, None


def _vit_classifier(m) -> tuple[int, None]:
    """The encoder without a projection, and a linear head per dataset on its pooled states."""
    datasets = OmegaConf.load(os.path.join(CONFIG_DIR, "classify.yaml")).classify.datasets
    return _vit(m)[0] + sum((m.hidden_size + 1) * CLASSES[d][1] for d in datasets), None


# The ResNet is matched to the NHS-Net of the same fields (size.matched_inner_widths: within 0.2%).
COUNTS = {"thann": _thann, "gpt": _gpt, "nnn": _nnn, "chaosnet": _chaosnet, "mlp_baseline": _mlp_baseline,
          "nhsnet": _nhsnet, "resnet": _nhsnet, "vit": _vit, "vit_classifier": _vit_classifier}
TOLERANCE = {"resnet": 2e-3}


# One config per architecture by default; the larger shapes of the same architectures are slow.
LARGER = ("thann_800m", "nhsnet_full", "nnn_small")


@pytest.mark.parametrize("name", [slow_case(m) if m in LARGER else m for m in MODELS])
def test_summary_prints_the_counts_of_every_model_config(name):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        model_cfg = compose(config_name="config", overrides=[f"model={name}"]).model
    total, active = COUNTS[model_cfg.arch](model_cfg)
    out = _summary(f"model={name}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(re.search(r"total_params=(\d+)", out.stdout).group(1)) == pytest.approx(
        total, rel=TOLERANCE.get(model_cfg.arch, 0))
    printed_active = re.search(r"active_params=(\d+)", out.stdout)
    if active is None:
        assert printed_active is None
        assert ("classify.datasets=['mnist']" in out.stdout) == (model_cfg.arch != "vit")
    else:
        assert int(printed_active.group(1)) == active


def test_an_untied_thann_counts_its_head():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        model_cfg = compose(config_name="config", overrides=["model.tie_embeddings=false"]).model
    out = _summary("model.tie_embeddings=false")
    assert out.returncode == 0, out.stderr[-3000:]
    total, active = _thann(model_cfg)
    assert f"total_params={total} active_params={active}\n" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["model=thann_9b"], "invalid config: model=thann_9b: no such option (available: chaosnet,"),
    slow_case(["model.hiden_size=64"],
              "invalid config: model.hiden_size: no such field (did you mean model.hidden_size?)"),
    slow_case(["model=gpt_tiny", "model.num_attention_heads=3"],
              "invalid config: model.num_attention_heads=3: must divide"),
])
def test_bad_input_is_one_line_with_exit_2(args, message):
    out = _summary(*args)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr[-3000:]


def test_help_lists_the_model_configs():
    out = _summary("--help")
    assert out.returncode == 0
    assert all(name in out.stdout for name in MODELS) and "python -m thann.summary model=" in out.stdout
