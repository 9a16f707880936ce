"""NHS-Net and its matched ResNet (thann/models/nhsnet): the Hebbian update against Oja's rule
computed here position by position; the sparse convolution's density; pruning that never
touches a norm or a bias; growth that keeps every weight and starts the new channels as its rule
says; parameter counts; config checks. Through the classification recipe: 2 data-parallel
ranks with Hebbian updates, growth and pruning on hold identical weights, masks, buffers and
optimizer states, and the Hebbian write reaches the fp32 master weights; a run stopped right
after a growth resumes exactly; bad input is one line with exit code 2; the ablation benchmark
runs end to end at tiny size."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from omegaconf import OmegaConf

from conftest import ROOT

HARNESS = os.path.join(ROOT, "tests", "support", "nhsnet_harness.py")
ENTRY = os.path.join(ROOT, "train_classifier.py")
# A small NHS-Net on Fashion-MNIST, fp32, 8 samples per step in 2 micro-batches.
TINY = ["model=nhsnet", "classify.datasets=[fashion_mnist]", "model.stem_width=8", "model.widths=[8,16]",
        "model.blocks=[1,1]", "model.growth.max_widths=[12,24]", "train.precision=fp32",
        "train.global_batch_size=8", "train.micro_batch_size=4", "train.warmup_steps=1", "train.eval_iters=1",
        "classify.eval_samples=16", "logging.wandb.enabled=false", "logging.progress=false"]
TIMING = ("step_time_s", "samples_per_s")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def model_cfg(**fields):
    """configs/model/nhsnet.yaml at a small shape (8/16 channels), one Fashion-MNIST head."""
    from thann.data.classification import heads

    base = OmegaConf.load(os.path.join(ROOT, "configs", "model", "nhsnet.yaml"))
    small = {"stem_width": 8, "widths": [8, 16], "blocks": [1, 1], "growth": {"max_widths": [12, 24]},
             "heads": heads(["fashion_mnist"])}
    return OmegaConf.merge(base, small, fields)


def build(cfg):
    from thann.models.nhsnet import build_classifier, nhsnet_transformer_config

    torch.manual_seed(0)
    return build_classifier(nhsnet_transformer_config(cfg, bf16=False), cfg)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _sum_here(tensor):  # one rank: the data-parallel sum is the tensor itself
    return tensor


# -- the mechanisms, one by one -------------------------------------------------------------------

@pytest.mark.parametrize("stride", [1, 2])
def test_the_hebbian_update_is_ojas_rule_over_every_position_of_the_batch(stride):
    """Two training forwards (two micro-batches) on a masked 3x3 convolution, then the update;
    the expected weight is Oja's rule computed here patch by patch: for every output channel o
    and every position p of every image, y = Σ (W ⊙ M)·patch, and W ← W + η·(mean y·patch −
    mean y²·(W ⊙ M)) ⊙ M."""
    from thann.models.nhsnet.layers import HebbianConv2d

    torch.manual_seed(3)
    conv = HebbianConv2d(2, 3, 3, stride, lr=0.05)
    with torch.no_grad():
        conv.keep[0, 1, 2, 0] = 0  # a pruned weight: no part in y, never updated
    rows = torch.tensor([1, 1, 0], dtype=torch.uint8)  # output channel 2 dormant
    mask = conv.mask(rows=rows)
    x = [torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    w = conv.weight.detach().double().clone()
    conv.train()
    for batch in x:
        conv(batch, mask)

    m = mask.double()
    correlation, power, positions = torch.zeros_like(w), torch.zeros(3, dtype=torch.float64), 0
    for batch in x:
        padded = torch.nn.functional.pad(batch.double(), (1, 1, 1, 1))
        for image in padded:
            for i in range(0, 5, stride):
                for j in range(0, 5, stride):
                    patch = image[:, i:i + 3, j:j + 3]
                    positions += 1
                    for o in range(3):
                        y = (w[o] * m[o] * patch).sum()
                        correlation[o] += y * patch
                        power[o] += y * y
    expected = w + 0.05 * (correlation / positions - (power / positions).view(-1, 1, 1, 1) * w * m) * m

    conv.oja_update(*conv.pending, mask)
    assert conv.pending[2].item() == positions
    torch.testing.assert_close(conv.weight.detach().double(), expected, rtol=1e-5, atol=1e-6)
    assert conv.weight[0, 1, 2, 0] == w[0, 1, 2, 0] and torch.equal(conv.weight[2].double(), w[2])
    assert (conv.weight.detach().double() - w).abs().max() > 1e-3  # the rule did move the weights


@pytest.mark.parametrize("out_channels, in_channels, sparsity", [(16, 24, 0.5), (8, 8, 0.3), (32, 12, 0.75),
                                                                 (5, 7, 0.0), (3, 4, 0.9)])
def test_the_sparse_convolution_leaves_out_the_configured_fraction(out_channels, in_channels, sparsity):
    from thann.models.nhsnet.layers import SparseConv2d

    torch.manual_seed(0)
    conv = SparseConv2d(in_channels, out_channels, 3, sparsity=sparsity)
    effective = conv.weight * conv.mask()
    zero = (effective == 0).float().mean().item()
    kernels = out_channels * in_channels
    assert abs(zero - sparsity) <= 0.5 / kernels + 1e-9, (zero, sparsity)  # up to one kernel's rounding
    assert (effective != 0).sum() == round((1 - sparsity) * kernels) * 9
    per_output = conv.structure.sum(dim=1)
    assert per_output.max() - per_output.min() <= 1  # structured: whole kernels, spread evenly
    x = torch.randn(2, in_channels, 6, 6)
    dense = torch.nn.functional.conv2d(x, conv.weight * conv.structure[:, :, None, None], padding=1)
    torch.testing.assert_close(conv(x), dense)


def test_pruning_removes_the_smallest_weights_of_every_conv_and_linear_layer_and_no_norm_or_bias():
    """Norm gains and biases made smaller than every weight: a prune over "everything called
    weight" (the seed's) would take them first. They stay, and each conv and linear layer loses
    exactly floor(fraction · its existing weights) weights, its smallest in magnitude."""
    cfg = model_cfg()
    model = build(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.fill_(1e-9)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    layers = list(model.masked_layers())
    # what pruning may mask: exactly the conv and linear weights (stem, 2 convs, gate's and SE's
    # 2 linears per block, block 1's shortcut, the head), no norm parameter, no bias
    weights = {name for name, p in model.named_parameters() if p.dim() > 1}
    names = {id(p): name for name, p in model.named_parameters()}
    assert {names[id(layer.weight)] for layer, _ in layers} == weights and len(layers) == 15
    model.prune(0.4)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"pruning wrote {name}"
    for layer, exists in layers:
        weights = layer.weight.detach()[exists.bool()].abs()
        pruned = ((layer.keep == 0) & exists.bool())
        assert pruned.sum() == int(0.4 * exists.sum()), layer
        threshold = weights.sort().values[int(0.4 * exists.sum()) - 1]
        assert (layer.weight.detach().abs()[pruned] <= threshold).all()
        assert (layer.weight.detach().abs()[(layer.keep == 1) & exists.bool()] >= threshold).all()
    assert (model.blocks[0].conv2.keep[model.blocks[0].conv2.available() == 0] == 1).all()  # structure apart
    model.prune(0.2)  # a lower fraction later brings nothing back
    assert all(((layer.keep == 0) & exists.bool()).sum() == int(0.4 * exists.sum()) for layer, exists in layers)


def test_a_grown_channel_starts_as_the_growth_rule_says_and_every_other_weight_is_kept():
    """threshold 1 grows every block at its check. The new inner channels' incoming weights are
    He-normal draws from the generator seeded by (growth_seed, block, growth number), their norm
    gain 1 and bias 0, their outgoing weights 0; everything else is bitwise unchanged, the
    model's output too (up to the summation order), and the next backward reaches the new
    channels' outgoing weights."""
    # the other rules off: the gate's running state would change the output too
    cfg = model_cfg(hebbian={"enabled": False}, pruning={"enabled": False}, gate={"enabled": False},
                    growth={"start": 5, "interval": 5, "threshold": 1.0, "channels": 4})
    model = build(cfg)
    images, labels = _images(6), torch.arange(6) % 10
    model.train()
    model(images, "fashion_mnist")
    assert model.after_step(4, _sum_here) == [] and all(int(b.alive.sum()) == w for b, w in zip(model.blocks, [8, 16]))
    model(images, "fashion_mnist")  # statistics of the step that checks
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.eval()
    logits_before = model(images, "fashion_mnist").detach()
    model.train()
    changed = model.after_step(5, _sum_here)
    assert {id(p) for p in changed} == {id(p) for b in model.blocks for p in
                                         (b.conv1.weight, b.norm1.weight, b.norm1.bias, b.conv2.weight)}
    seed = int(model.growth_seed)
    for i, (block, width) in enumerate(zip(model.blocks, cfg.widths)):
        assert block.alive.tolist() == [1] * (width + 4) + [0] * (len(block.alive) - width - 4)
        new = slice(width, width + 4)
        words = np.random.SeedSequence([seed, i, 0]).generate_state(2, np.uint32)
        generator = torch.Generator().manual_seed((int(words[0]) << 31) ^ int(words[1]))
        fan_in = block.conv1.weight.shape[1] * 9
        expected = torch.randn((4, block.conv1.weight.shape[1], 3, 3), generator=generator) * math.sqrt(2 / fan_in)
        assert torch.equal(block.conv1.weight[new], expected)
        assert (block.norm1.weight[new] == 1).all() and (block.norm1.bias[new] == 0).all()
        assert (block.conv2.weight[:, new] == 0).all()
        prefix = f"blocks.{i}."
        old = before[prefix + "conv1.weight"]
        assert torch.equal(block.conv1.weight[:width], old[:width])
        assert torch.equal(block.conv1.weight[width + 4:], old[width + 4:])  # still dormant
        assert torch.equal(block.conv2.weight[:, :width], before[prefix + "conv2.weight"][:, :width])
    for name, p in model.named_parameters():
        if not re.fullmatch(r"blocks\.\d\.(conv1\.weight|norm1\.(weight|bias)|conv2\.weight)", name):
            assert torch.equal(p, before[name]), name
    model.eval()
    torch.testing.assert_close(model(images, "fashion_mnist").detach(), logits_before, rtol=1e-5, atol=1e-6)
    model.train()
    model(images, "fashion_mnist", labels=labels).sum().backward()
    for block, width in zip(model.blocks, cfg.widths):
        assert block.conv2.weight.grad[:, width:width + 4].abs().sum() > 0
        assert block.conv2.weight.grad[:, width + 4:].abs().sum() == 0  # dormant: no gradient


def test_the_gate_relaxes_its_state_toward_the_batch_and_not_in_evaluation():
    from thann.models.nhsnet.layers import HodgkinHuxleyGate

    torch.manual_seed(0)
    gate = HodgkinHuxleyGate(4, 2, rate=0.25, leak=0.1)
    x = torch.randn(3, 4, 5, 5)
    gate.eval()
    gate(x)
    assert gate.pending is None
    gate.train()
    y = gate(x)
    steady = torch.sigmoid(gate.gates(torch.relu(gate.hidden(x.mean(dim=(2, 3)))))).view(3, 3, 4)  # [B, (n, m, h), C]
    n, m, h = (0.5 + 0.25 * (steady - 0.5)).unbind(dim=1)
    expected = x * (m ** 3 * h / (m ** 3 * h + n ** 4 + 0.1))[:, :, None, None]
    torch.testing.assert_close(y, expected)
    gate.relax(*gate.pending)
    torch.testing.assert_close(gate.state, 0.5 + 0.25 * (steady.mean(dim=0) - 0.5))


def test_parameter_counts_the_matched_resnet_and_alive_parameters():
    from thann.models.nhsnet import matched_inner_widths, nhsnet_parameters, resnet_parameters

    for fields in ({}, {"growth": {"enabled": False}}, {"gate": {"enabled": False}, "se": {"enabled": False}},
                   {"pool": "mean"}):
        cfg = model_cfg(**fields)
        nhsnet = build(cfg)
        resnet = build(OmegaConf.merge(cfg, {"arch": "resnet", "inner_widths": None}))
        count = sum(p.numel() for p in nhsnet.parameters())
        assert count == nhsnet_parameters(cfg)
        inner = matched_inner_widths(cfg)
        assert [b.conv1.out_channels for b in resnet.blocks] == inner
        assert sum(p.numel() for p in resnet.parameters()) == resnet_parameters(cfg, inner)
        assert abs(resnet_parameters(cfg, inner) - count) <= 0.01 * count
    # alive: every parameter but dormant channels' (weights in, out, norm) and absent (structure) weights
    model = build(model_cfg())
    absent = 0
    for block, width, capacity in zip(model.blocks, [8, 16], [12, 24]):
        c_in = block.conv1.weight.shape[1]
        dormant = capacity - width
        absent += dormant * c_in * 9 + 2 * dormant  # conv1 rows and norm1 of dormant channels
        structure = block.conv2.structure
        absent += int((structure[:, :width] == 0).sum()) * 9 + int(structure[:, width:].numel()) * 9
    assert model.alive_parameters() == sum(p.numel() for p in model.parameters()) - absent


# -- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("sparse.sparsity", 1.0), ("sparse.sparsity", -0.1), ("growth.max_widths", [4, 24]), ("growth.max_widths", [12]),
    ("pruning.amount", 1.0), ("pruning.amount", -0.5), ("growth.channels", 3), ("widths", [8, 15]),
    ("blocks", [1]), ("group_size", 0), ("pool", "max"), ("gate.rate", 0), ("hebbian.enabled", "yes"),
    ("pruning.ramp", 0), ("image.size", 1), ("heads.fashion_mnist.modality", "text"),
])
def test_bad_config_values_name_their_field(field, value):
    from thann.config import ConfigError
    from thann.models.nhsnet import check_model_config

    cfg = model_cfg()
    check_model_config(cfg)
    OmegaConf.update(cfg, field, value)
    with pytest.raises(ConfigError) as error:
        check_model_config(cfg)
    assert error.value.field == f"model.{field}", str(error.value)


def test_the_recipe_refuses_what_an_image_model_cannot_do():
    from thann.cli import load_config
    from thann.config import ConfigError
    from thann.recipes.classify import Classify

    for overrides, field in ((["classify.datasets=[newsgroups20]"], "model.heads.newsgroups20.modality"),
                             (["classify.eval_death_rates=[0.5]"], "classify.eval_death_rates"),
                             (["parallel.tp=2"], "parallel.tp")):
        with pytest.raises(ConfigError) as error:
            Classify.check(load_config("classify", ["model=nhsnet", *overrides]), 1)
        assert error.value.field == field, str(error.value)
    for model in ("nhsnet", "nhsnet_full", "resnet"):
        Classify.check(load_config("classify", [f"model={model}", "classify.datasets=[fashion_mnist,mnist]"]), 1)


def test_bad_input_is_one_line_naming_the_field_with_exit_2(tmp_path):
    cases = {
        "model.sparse.sparsity": ["model.sparse.sparsity=1.0"],
        "model.growth.max_widths": ["model.growth.max_widths=[4,24]"],
        "model.pruning.amount": ["model.pruning.amount=1.5"],
    }
    procs = {field: subprocess.Popen([sys.executable, ENTRY, *TINY, *overrides, f"checkpoint.dir={tmp_path / 'run'}"],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for field, overrides in cases.items()}
    for field, proc in procs.items():
        _, stderr = proc.communicate(timeout=180)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, (field, stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith(f"invalid config: {field}="), (field, stderr[-2000:])


# -- through the recipe ---------------------------------------------------------------------------

def test_dp2_ranks_stay_identical_with_hebbian_growth_and_pruning_and_the_hebbian_write_survives(tmp_path):
    """6 steps of 2 data-parallel ranks in bf16 (fp32 master weights, each rank its own samples)
    with every mechanism on: growth checked every 2 steps (threshold 1: it grows), pruning every
    step from step 3. After every step each rank's weights, buffers (masks, alive channels, gate
    state), fp32 master weights and Adam state equal the other's bitwise. The Hebbian write is
    in the master weights and the next step starts from it: the next update moves the weight by
    less than a tenth of what the rule wrote."""
    out = tmp_path / "dp2.pt"
    overrides = TINY + ["train.precision=bf16", "train.global_batch_size=16", "train.steps=6", "train.lr=1e-3",
                        "train.warmup_steps=0", "train.schedule=constant", "model.hebbian.lr=0.05",
                        "model.growth.start=2", "model.growth.interval=2", "model.growth.threshold=1.0",
                        "model.pruning.start=3", "model.pruning.interval=1", "model.pruning.ramp=2",
                        "model.pruning.amount=0.3", "checkpoint.save=false", f"checkpoint.dir={tmp_path / 'run'}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", HARNESS, str(out),
           *overrides]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert run.returncode == 0, run.stderr[-4000:]
    r = torch.load(out)
    for step, ranks in enumerate(r["state"], start=1):
        assert sorted(ranks[0]) == sorted(ranks[1])
        for name in ranks[0]:
            assert torch.equal(ranks[0][name], ranks[1][name]), (step, name)
    last = r["state"][-1][0]
    assert any(".exp_avg" in n for n in last) and any(n.startswith("main.") for n in last)
    assert int(last["buffer.blocks.1.alive"].sum()) > 16  # grew
    assert (last["buffer.blocks.1.conv2.keep"] == 0).any() and (last["buffer.heads.fashion_mnist.keep"] == 0).any()
    assert not torch.equal(last["buffer.blocks.0.gate.state"], torch.full_like(last["buffer.blocks.0.gate.state"], .5))
    for step in r["hebbian"]:
        written = step["after_rules"] - step["after_update"]  # what the rules wrote (bf16 weights)
        assert written.abs().max() > 0.05
        assert torch.equal(step["main"].to(torch.bfloat16), step["after_rules"].to(torch.bfloat16))
    for before, after in zip(r["hebbian"], r["hebbian"][1:]):
        moved = after["after_update"] - before["after_rules"]  # the next optimizer update alone
        assert moved.abs().max() < 0.1 * (before["after_rules"] - before["after_update"]).abs().max()


def test_dp2_trains_what_one_rank_trains_on_the_same_global_batch(tmp_path):
    """The same 6 steps (fp32, every mechanism on, growth and pruning as above) on one rank and on
    2 data-parallel ranks: the local rules read statistics summed over the ranks, so the grown
    channels, pruning masks and gate state are the one rank's exactly, and the weights and Adam
    state equal it up to the order of the gradient sums."""
    overrides = TINY + ["train.global_batch_size=16", "train.steps=6", "train.lr=1e-3", "train.warmup_steps=0",
                        "train.schedule=constant", "model.hebbian.lr=0.05", "model.growth.start=2",
                        "model.growth.interval=2", "model.growth.threshold=1.0", "model.pruning.start=3",
                        "model.pruning.interval=1", "model.pruning.ramp=2", "model.pruning.amount=0.3",
                        "checkpoint.save=false", f"checkpoint.dir={tmp_path / 'run'}"]
    finals = []
    for ranks in (1, 2):
        out = tmp_path / f"dp{ranks}.pt"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--standalone", HARNESS,
               str(out), *overrides]
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
        assert run.returncode == 0, run.stderr[-4000:]
        finals.append(torch.load(out)["state"][-1][0])  # rank 0 after the last step
    one, two = finals
    assert sorted(one) == sorted(two)
    assert int(one["buffer.blocks.1.alive"].sum()) > 16 and (one["buffer.blocks.1.conv1.keep"] == 0).any()
    for name in one:
        if name.startswith("buffer.") and one[name].dtype == torch.uint8:  # masks: the same decisions
            assert torch.equal(one[name], two[name]), name
        else:
            torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _train(overrides, timeout=240):
    return subprocess.run([sys.executable, ENTRY, *TINY, *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=_env())


def test_a_run_stopped_right_after_a_growth_resumes_exactly(tmp_path):
    """Growth at step 3 (and 6), pruning at steps 2, 4, 6: one run straight through 6 steps, one
    stopped after step 3 (its checkpoint holds the grown channels and the pruned weights) and
    resumed. Both log the same numbers and end with the same arrays, optimizer state included."""
    common = ["train.steps=6", "train.eval_interval=3", "checkpoint.interval=3", "model.growth.start=3",
              "model.growth.interval=3", "model.growth.threshold=1.0", "model.pruning.start=2",
              "model.pruning.interval=2", "model.pruning.amount=0.3", "train.seed=5"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    for run in (_train(common + [f"checkpoint.dir={straight}"]),
                _train(common + [f"checkpoint.dir={split}", "train.stop_after_step=3"]),
                _train(common + [f"checkpoint.dir={split}"])):
        assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed from" in run.stdout
    stopped = zarr.open(str(split / "iter_0000003"), mode="r")
    assert stopped["blocks.0.alive"][...].sum() == 12 and stopped["blocks.1.alive"][...].sum() == 20  # grown
    assert (stopped["blocks.1.conv1.keep"][...] == 0).any()  # pruned
    assert _metrics(split) == _metrics(straight)
    a, b = zarr.open(str(straight / "iter_0000006"), mode="r"), zarr.open(str(split / "iter_0000006"), mode="r")
    names = sorted(k for k, _ in a.arrays())
    assert names == sorted(k for k, _ in b.arrays()) and any("exp_avg" in n for n in names)
    assert {"blocks.0.alive", "blocks.0.gate.state", "blocks.0.conv2.structure", "growth_seed"} <= set(names)
    for name in names:
        assert (a[name][...] == b[name][...]).all(), name


@pytest.mark.slow
def test_the_ablation_benchmark_writes_its_table_and_plot(tmp_path):
    out = subprocess.run(
        [sys.executable, "benchmarks/nhsnet_ablation.py", "--steps", "2", "--seeds", "2", "--variants",
         "all,no_hebbian,resnet", "--eval-samples", "16", "--batch", "8", "--jobs", "1", "--out", str(tmp_path),
         "--plot", str(tmp_path / "ablation.png"), "--override", "model.stem_width=8", "--override",
         "model.widths=[8,16]", "--override", "model.blocks=[1,1]", "--override", "model.growth.max_widths=[12,24]"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for label in ("NHS-Net, all mechanisms", "without Hebbian", "ResNet (matched)"):
        assert re.search(rf"^\| {re.escape(label)} \| [\d.]+ ± [\d.]+ \| [\d,]+ \| [\d,]+ \|", text, re.MULTILINE), text
    assert re.search(r"6 runs in [\d.]+ minutes", text)
    with open(tmp_path / "ablation.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "nhsnet_ablation.json").read_text())
    assert len(results["runs"]) == 6
