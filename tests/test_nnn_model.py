"""The NNN model: BitLinear, the recurrence, recurrent decoding, the ternary export, causality,
size, config checks and the pipeline split."""

import os
import re
import subprocess
import sys

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica
from omegaconf import OmegaConf

from conftest import ROOT
from thann.config import ConfigError
from thann.models.nnn import (
    BitLinear,
    NNNModel,
    check_model_config,
    export_packed,
    load_packed,
    nnn_transformer_config,
    num_parameters,
    stage_nodes,
)
from thann.models.nnn.node import linear_recurrence
from thann.models.nnn.pack import pack_ternary, unpack_ternary

VOCAB = 97


def _cfg(**fields):
    base = {"arch": "nnn", "name": "nnn_test", "hidden_size": 32, "num_nodes": 3, "intermediate_size": 48,
            "cross_node_attention": False, "cross_attention_heads": 4, "init_method_std": 0.02}
    return OmegaConf.create({**base, **fields})


def _fresh(model_cfg, pp=1, pre_process=True, post_process=True, bf16=False):
    torch.manual_seed(0)
    config = nnn_transformer_config(model_cfg, OmegaConf.create({"tp": 1, "pp": pp}), bf16=bf16)
    return NNNModel(config, model_cfg, VOCAB, pre_process=pre_process, post_process=post_process)


def _nnn(model_cfg, **build):
    """A model whose lower_bounds and global weights (zero when fresh) have values, so that the
    tests see the lower bounds and the global path at work."""
    model = _fresh(model_cfg, **build)
    with torch.no_grad():
        model.lower_bounds.normal_()
        for node in model.nodes.values():
            node.global_weight.normal_(std=0.5)
    return model.eval()


def _tokens(batch=3, length=20, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, tokens, inference_context=None):
    with torch.no_grad():
        return model(tokens, None, None, inference_context=inference_context)


def _assert_close_relative(actual, expected, rtol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


# BitLinear ---------------------------------------------------------------------------------------

def _reference_bitlinear_parts(layer, x):
    """Quantised activations and weight of a BitLinear, by hand, one token at a time."""
    w = layer.weight.detach()
    s = 1.0 / w.abs().mean()
    w_q = torch.clamp(torch.round(w * s), -1, 1) / s
    tokens = x.reshape(-1, x.shape[-1])
    quantised = []
    for t in tokens:
        n = t / torch.sqrt((t * t).mean() + 1e-8) * layer.norm.weight.detach()
        m = n.abs().max()
        quantised.append(torch.clamp(torch.round(n * 127.0 / m), -128, 127) * m / 127.0)
    return torch.stack(quantised).reshape(x.shape), w_q


def test_bitlinear_matches_hand_quantisation():
    torch.manual_seed(0)
    layer = BitLinear(24, 10)
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(5, 7, 24)
    a_ref, w_ref = _reference_bitlinear_parts(layer, x)
    torch.testing.assert_close(layer(x), a_ref @ w_ref.T, rtol=1e-5, atol=1e-5)
    ternary, scale = layer.ternary_weight()
    assert ternary.dtype == torch.int8 and set(ternary.unique().tolist()) <= {-1, 0, 1}
    torch.testing.assert_close(ternary.float() / scale, w_ref)


def test_bitlinear_gradients_are_straight_through():
    """Weight gradient: the plain linear's on the quantised input; input gradient: the plain
    linear's on the dequantised weight, through the RMSNorm as if quantisation were identity."""
    torch.manual_seed(0)
    layer = BitLinear(24, 10)
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(6, 24, requires_grad=True)
    grad_out = torch.randn(6, 10)
    layer(x).backward(grad_out)

    a_ref, w_ref = _reference_bitlinear_parts(layer, x.detach())
    a_ref.requires_grad_(True)
    w_ref.requires_grad_(True)
    torch.nn.functional.linear(a_ref, w_ref).backward(grad_out)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad, rtol=1e-5, atol=1e-6)

    x_ref = x.detach().clone().requires_grad_(True)
    normed = x_ref / torch.sqrt((x_ref * x_ref).mean(-1, keepdim=True) + 1e-8) * layer.norm.weight.detach()
    normed.backward(a_ref.grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_pack_ternary_layout_and_round_trip():
    ternary = torch.tensor([[-1, 0, 1, 1, 0]], dtype=torch.int8)
    # codes ternary + 1 = 0 1 2 2 1, padded with code 1; two bits each, first weight lowest
    assert pack_ternary(ternary).tolist() == [[0 | 1 << 2 | 2 << 4 | 2 << 6, 1 | 1 << 2 | 1 << 4 | 1 << 6]]
    many = torch.randint(-1, 2, (9, 13), dtype=torch.int8)
    assert torch.equal(unpack_ternary(pack_ternary(many), 13), many)


# The recurrence ----------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [1, 5, 64, 130])
def test_chunked_scan_equals_the_loop(length):
    torch.manual_seed(length)
    f = torch.sigmoid(torch.randn(length, 2, 8)).requires_grad_(True)
    i = torch.randn(length, 2, 8, requires_grad=True)
    h0 = torch.randn(2, 8, requires_grad=True)
    h, hs = h0, []
    for t in range(length):
        h = f[t] * h + i[t]
        hs.append(h)
    expected = torch.stack(hs)
    actual = linear_recurrence(f, i, h0)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (f, i, h0), grad)
    for a, e in zip(torch.autograd.grad(actual, (f, i, h0), grad), expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


# The model ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cross", [False, True])
def test_every_parameter_gets_a_gradient(single_rank, cross):
    model = _fresh(_cfg(cross_node_attention=cross))
    tokens = _tokens(2, 16)
    model(tokens, None, None, labels=torch.roll(tokens, -1, 1)).mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cross", [False, True])
def test_recurrent_decoding_matches_the_full_forward(single_rank, cross):
    # float64: the two paths round differently in the last bit, and where an activation sits at
    # a boundary of the 8-bit quantisation, float32 rounding can move it a whole level.
    model = _nnn(_cfg(hidden_size=64, cross_node_attention=cross)).double()
    tokens = _tokens(3, 20)
    expected = _logits(model, tokens)
    state = model.new_inference_context(batch_size=3)
    pieces, start = [], 0
    for size in [7, 4] + [1] * 9:  # prefill, a second chunk, then one token at a time
        pieces.append(_logits(model, tokens[:, start:start + size], state))
        start += size
    _assert_close_relative(torch.cat(pieces, dim=1), expected)
    for i, node_state in state.nodes.items():
        assert node_state.hidden_BD.shape == (3, 64)
        # node 0 has no previous node to attend to
        assert node_state.keys_BHTE is None if not cross or i == 0 else node_state.keys_BHTE.shape == (3, 4, 20, 16)


@pytest.mark.parametrize("cross", [False, True])
def test_model_is_causal(single_rank, cross):
    model = _nnn(_cfg(cross_node_attention=cross))
    tokens = _tokens(2, 24)
    before = _logits(model, tokens)
    for t in (0, 9, 22):
        perturbed = tokens.clone()
        perturbed[:, t + 1] = (perturbed[:, t + 1] + 1 + torch.arange(2)) % VOCAB
        after = _logits(model, perturbed)
        torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(after[:, t + 1], before[:, t + 1], atol=1e-4)


def test_loss_is_per_token_cross_entropy(single_rank):
    model = _nnn(_cfg())
    tokens, labels = _tokens(2, 10), _tokens(2, 10, seed=2)
    logits = _logits(model, tokens)
    with torch.no_grad():
        losses = model(tokens, None, None, labels=labels)
    expected = torch.stack([torch.stack([torch.logsumexp(logits[b, s], 0) - logits[b, s, labels[b, s]]
                                         for s in range(10)]) for b in range(2)])
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-5)


def test_bf16_model_trains(single_rank):
    model = _nnn(_cfg(), bf16=True).train()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tokens = _tokens(2, 12)
    losses = model(tokens, None, None, labels=tokens)
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all()
    losses.mean().backward()


# The ternary export ------------------------------------------------------------------------------

def test_packed_export_reproduces_the_model(single_rank, tmp_path):
    model = _nnn(_cfg(hidden_size=64, intermediate_size=128, cross_node_attention=True))
    path = str(tmp_path / "nnn.safetensors")
    export_packed(model, path)
    loaded = load_packed(path)
    tokens = _tokens(2, 16)
    _assert_close_relative(_logits(loaded, tokens), _logits(model, tokens))

    bitlinear = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, BitLinear)}
    state = model.state_dict()
    bitlinear_bytes = sum(state[k].numel() * 4 for k in bitlinear)
    rest_bytes = sum(t.numel() * 4 for k, t in state.items() if k not in bitlinear)
    assert os.path.getsize(path) < bitlinear_bytes / 8 + rest_bytes


# Size and config ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fields", [{}, {"cross_node_attention": True}, {"intermediate_size": None}])
def test_num_parameters_matches_the_built_model(single_rank, fields):
    cfg = _cfg(**fields)
    model = _fresh(cfg)
    assert num_parameters(cfg, VOCAB) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["nnn_tiny", "nnn_small"])
def test_config_files_build_and_state_their_size(single_rank, name):
    path = os.path.join(ROOT, "configs", "model", f"{name}.yaml")
    cfg = OmegaConf.load(path)
    check_model_config(cfg)
    assert cfg.name == name
    config = nnn_transformer_config(cfg, OmegaConf.create({"tp": 1, "pp": 1}), bf16=False)
    with torch.device("meta"):
        model = NNNModel(config, cfg, 100352)
    total = sum(p.numel() for p in model.parameters())
    assert num_parameters(cfg, 100352) == total
    with open(path) as f:
        stated = int(re.search(r"([\d,]+) parameters", f.readline()).group(1).replace(",", ""))
    assert stated == total


@pytest.mark.parametrize("fields, field", [
    ({"hidden_size": 0}, "model.hidden_size"),
    ({"num_nodes": -1}, "model.num_nodes"),
    ({"intermediate_size": 0}, "model.intermediate_size"),
    ({"cross_node_attention": True, "cross_attention_heads": 5}, "model.cross_attention_heads"),
    ({"cross_node_attention": "yes"}, "model.cross_node_attention"),
    ({"init_method_std": 0.0}, "model.init_method_std"),
    ({"arch": "thann"}, "model.arch"),
])
def test_check_model_config_names_the_bad_field(fields, field):
    check_model_config(_cfg())
    with pytest.raises(ConfigError) as error:
        check_model_config(_cfg(**fields))
    assert error.value.field == field


@pytest.mark.parametrize("parallel, field", [({"tp": 2, "pp": 1}, "parallel.tp"), ({"tp": 1, "pp": 4}, "parallel.pp")])
def test_transformer_config_rejects_unbuilt_layouts(parallel, field):
    with pytest.raises(ConfigError) as error:
        nnn_transformer_config(_cfg(), OmegaConf.create(parallel), bf16=False)
    assert error.value.field == field


# The pipeline split ------------------------------------------------------------------------------

def test_stage_nodes_partition_the_nodes():
    for nodes in range(1, 10):
        for stages in range(1, nodes + 1):
            ranges = [stage_nodes(nodes, p, stages) for p in range(stages)]
            assert [i for r in ranges for i in r] == list(range(nodes))
            sizes = [len(r) for r in ranges]
            assert sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1 and sizes[-1] >= 1


def _sharded_tensors(model):
    return {k: v for k, v in model.sharded_state_dict().items() if isinstance(v, ShardedTensor)}


def test_two_stages_hold_the_single_model_partitioned_and_compute_the_same(single_rank):
    """Stage 0 of 2 and stage 1 of 2 (3 nodes: 2 + 1), fed by hand as the schedules would: same
    initial weights and checkpoint keys as the single model, same losses, same gradients
    (lower_bounds' summed)."""
    cfg = _cfg(cross_node_attention=True)
    single = _nnn(cfg).train()
    tokens, labels = _tokens(2, 12), _tokens(2, 12, seed=2)
    single(tokens, None, None, labels=labels).sum().backward()
    single_keys = set(_sharded_tensors(single))
    assert {k.split(".")[1] for k in single_keys if k.startswith("nodes.")} == {"0", "1", "2"}

    fresh = _fresh(cfg).state_dict()
    stages = []
    try:
        parallel_state.set_pipeline_model_parallel_world_size(2)
        for rank in range(2):
            parallel_state.set_pipeline_model_parallel_rank(rank)
            stage = _fresh(cfg, pp=2, pre_process=rank == 0, post_process=rank == 1).train()
            for name, tensor in stage.state_dict().items():  # the same seed, the same initial weights
                assert torch.equal(tensor, fresh[name]), name
            stage.load_state_dict({k: v for k, v in single.state_dict().items() if k in stage.state_dict()})
            stages.append((stage, _sharded_tensors(stage)))
    finally:
        parallel_state.set_pipeline_model_parallel_rank(None)
        parallel_state.set_pipeline_model_parallel_world_size(None)

    (first, first_keys), (last, last_keys) = stages
    assert set(first_keys) | set(last_keys) == single_keys
    assert set(first_keys) & set(last_keys) == {"lower_bounds"}
    first_nodes = {k for k in first_keys if k.startswith("nodes.")}
    assert first_nodes == {k for k in single_keys if k.startswith(("nodes.0.", "nodes.1."))}
    assert is_main_replica(first_keys["lower_bounds"].replica_id)
    assert not is_main_replica(last_keys["lower_bounds"].replica_id)

    payload = first(tokens, None, None)
    assert payload.shape == (12, 2, first.config.hidden_size) == (12, 2, 2 * cfg.hidden_size)
    received = payload.detach().requires_grad_(True)
    last.set_input_tensor([received])
    losses = last(tokens, None, None, labels=labels)
    torch.testing.assert_close(losses, single(tokens, None, None, labels=labels), rtol=1e-5, atol=1e-6)
    losses.sum().backward()
    payload.backward(received.grad)
    single_grads = dict(single.named_parameters())
    for stage in (first, last):
        for name, param in stage.named_parameters():
            if name != "lower_bounds":
                torch.testing.assert_close(param.grad, single_grads[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(first.lower_bounds.grad + last.lower_bounds.grad, single.lower_bounds.grad,
                               rtol=1e-5, atol=1e-7)


def _pipeline_worker():
    """One rank of ``torchrun --nproc-per-node=2 tests/test_nnn_model.py``: stage ``rank`` of 2
    under megatron-core's 1F1B schedule, DDP (distributed optimizer) and finalize_model_grads,
    checked against the whole model built on every rank."""
    import torch.distributed as dist
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from thann.parallel import state

    state.initialize(OmegaConf.create({"tp": 1, "pp": 2, "ep": 1, "etp": 1, "sp": False}), dp=1, seed=0)
    cfg = _cfg(cross_node_attention=True)
    rank = parallel_state.get_pipeline_model_parallel_rank()
    parallel_state.set_pipeline_model_parallel_world_size(1)
    parallel_state.set_pipeline_model_parallel_rank(0)
    whole = _nnn(cfg).train()
    whole_keys = set(_sharded_tensors(whole))
    parallel_state.set_pipeline_model_parallel_world_size(None)
    parallel_state.set_pipeline_model_parallel_rank(None)

    stage = _nnn(cfg, pp=2, pre_process=rank == 0, post_process=rank == 1).train()
    stage.load_state_dict({k: v for k, v in whole.state_dict().items() if k in stage.state_dict()})
    config = stage.config
    model = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True), stage
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    batches = [(_tokens(2, 16, seed=s), _tokens(2, 16, seed=s + 100)) for s in range(4)]

    def forward_step(data_iterator, m):
        tokens, labels = next(data_iterator)
        losses = m(tokens, None, None, labels=labels)
        return losses, lambda out: (out.sum(), torch.tensor(out.numel()), {})

    model.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
                                num_microbatches=4, seq_length=16, micro_batch_size=2, forward_only=False)
    # What the schedule optimises: each micro-batch's token mean, averaged over micro-batches.
    (sum(whole(t, None, None, labels=l).mean() for t, l in batches) / 4).backward()
    whole_params = dict(whole.named_parameters())
    for name, param in stage.named_parameters():
        expected = whole_params[name].grad
        error = ((param.main_grad - expected).abs().max() / expected.abs().max()).item()
        assert error < 1e-5, f"rank {rank} {name}: relative gradient error {error:.2e}"

    mains = [None, None]
    dist.all_gather_object(mains, [k for k, t in _sharded_tensors(stage).items() if is_main_replica(t.replica_id)])
    assert sorted(mains[0] + mains[1]) == sorted(whole_keys), "every key saved exactly once"
    print(f"rank {rank}: ok", flush=True)
    state.destroy()


def test_two_stages_under_the_pipeline_schedule_train_like_the_whole_model():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", __file__]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "rank 0: ok" in result.stdout and "rank 1: ok" in result.stdout


if __name__ == "__main__":
    _pipeline_worker()


def test_bitlinear_uses_weights_written_through_a_buffer():
    """megatron-core's DDP makes parameters views of one buffer and its optimizers write through
    the buffer, which never bumps the parameter's own version counter: evaluation, and every new
    generation, must still compute with the new weights."""
    from thann.models.nnn.bitlinear import frozen_weights

    torch.manual_seed(0)
    layer = BitLinear(16, 8)
    buffer = layer.weight.detach().flatten().clone()
    layer.weight.data = buffer.view(8, 16)
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = layer(x)
        with frozen_weights({}):
            assert torch.equal(layer(x), before)
        buffer.mul_(-1)  # the optimizer's write: W -> -W flips every ternary value, same scale
        after = layer(x)
        with frozen_weights({}):
            decoded = layer(x)
    torch.testing.assert_close(after, -before, rtol=0, atol=0)
    torch.testing.assert_close(decoded, after, rtol=0, atol=0)
    torch.testing.assert_close(layer(x).detach(), after, rtol=0, atol=0)  # the training path agrees
