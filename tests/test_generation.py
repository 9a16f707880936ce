"""Generation: cached decoding equals a full forward, every layout generates what one rank
does from one checkpoint, sampling is seeded, and bad input is one line with exit code 2."""

import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, TINY_MODEL, slow_case
from thann.inference.generator import Generator
from thann.inference.sampling import SamplingParams, choose, row_generator
from thann.parallel import state

VOCAB = 100352
# Prompts of different lengths (the first is the shortest: rows 1 and 2 are teacher-forced past it).
PROMPTS = ["Hello", "What is the capital of France? Answer in one word.", "Write a poem about the sea"]


class _Tokenizer:
    """What the generator reads from a tokenizer, for models fed raw ids."""
    vocab_size, eod, special_ids, unused_ids = 100277, 100257, {}, ()

    def decode(self, ids):
        return " ".join(map(str, ids))


def _assert_close_relative(got, expected, tolerance=1e-5):
    assert ((got - expected).norm() / expected.norm()).item() < tolerance


def _cached_equals_full_forward(model, prompts, new_tokens):
    """Generates greedily from a model in training mode; checks the logits and log-probabilities
    of every generated token against a full forward of the whole sequence."""
    generator = Generator([model], _Tokenizer(), max_sequence_length=64)
    results = generator.generate(prompts, SamplingParams(max_new_tokens=new_tokens), keep_logits=True)
    assert model.training  # generation ran in eval mode (no dropout) and switched back
    model.eval()
    for prompt, result in zip(prompts, results):
        assert len(result.tokens) == new_tokens  # the id-only tokenizer never meets a stop token
        sequence = torch.tensor([prompt + result.tokens], device=state.device())
        positions = torch.arange(sequence.size(1), device=state.device()).unsqueeze(0)
        with torch.no_grad():
            full = model(sequence, positions, None)[0, :, :_Tokenizer.vocab_size].float()
        for i, logits in enumerate(result.logits):
            position = len(prompt) - 1 + i  # the logits that chose generated token i
            _assert_close_relative(logits, full[position].cpu())
            expected_logprob = torch.log_softmax(full[position], -1)[result.tokens[i]].item()
            assert result.logprobs[i] == pytest.approx(expected_logprob, rel=1e-5, abs=1e-6)


def test_kv_cached_decoding_equals_a_full_forward_for_ragged_prompts(single_rank):
    from thann.models.thann.model import ThannModel, transformer_config

    model_cfg = OmegaConf.load(TINY_MODEL)  # learnt tokenization with dropout 0.1
    model = ThannModel(transformer_config(model_cfg, single_rank, bf16=False), model_cfg, VOCAB, 64)
    prompts = [[5, 6, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19], [21, 22, 23, 24, 25, 26]]
    _cached_equals_full_forward(model.to(state.device()).train(), prompts, new_tokens=8)


def test_recurrent_state_decoding_equals_a_full_forward_for_ragged_prompts(single_rank):
    from thann.models.nnn.model import NNNModel, nnn_transformer_config

    cfg = OmegaConf.load(os.path.join(ROOT, "configs", "model", "nnn_tiny.yaml"))
    model = NNNModel(nnn_transformer_config(cfg, single_rank, bf16=False), cfg, VOCAB).double().to(state.device())
    original = model.forward

    def float_logits(*args, **kwargs):  # in float64 (see tests/test_nnn_model.py), read back as float32
        return original(*args, **kwargs).float()

    model.forward = float_logits
    _cached_equals_full_forward(model.train(), [[5, 6], [7, 8, 9, 10, 11], [12, 13, 14]], new_tokens=6)


def test_ids_without_a_token_are_never_generated(single_rank):
    """cl100k leaves ids without a token (100261-100275 bar the two ChatML ones): a model that
    favours them (as a PPO policy drifting over a barely trained vocabulary did) still generates
    text the tokenizer decodes, greedy and sampled."""
    from thann.data.tokenizer import TiktokenTokenizer
    from thann.models.thann.model import ThannModel, transformer_config

    tokenizer = TiktokenTokenizer()
    assert set(range(100261, 100276)) - {100264, 100265} <= set(tokenizer.unused_ids)
    model_cfg = OmegaConf.load(TINY_MODEL)
    model = ThannModel(transformer_config(model_cfg, single_rank, bf16=False), model_cfg, VOCAB, 64)
    model = model.to(state.device())
    original, favoured = model.forward, torch.tensor(tokenizer.unused_ids)

    def favouring(*args, **kwargs):
        logits = original(*args, **kwargs)
        logits[..., favoured] += 100.0
        return logits

    model.forward = favouring
    generator = Generator([model], tokenizer, max_sequence_length=64)
    for params in (SamplingParams(max_new_tokens=6), SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)):
        result = generator.generate([tokenizer.encode("Hello there")], params)[0]
        assert result.tokens and not set(result.tokens) & set(tokenizer.unused_ids)
        assert result.text == tokenizer.decode(result.tokens)


def test_sampling_keeps_top_k_and_top_p_and_is_seeded_per_row():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    top2 = SamplingParams(temperature=1.0, top_k=2)
    assert {choose(logits, top2, row_generator(1, r)) for r in range(200)} == {0, 1}
    # p(0) = 0.64, p(0) + p(1) = 0.88: top_p 0.8 keeps both, 0.5 keeps only the first
    assert {choose(logits, SamplingParams(temperature=1.0, top_p=0.8), row_generator(1, r)) for r in range(200)} == {0, 1}
    assert {choose(logits, SamplingParams(temperature=1.0, top_p=0.5), row_generator(1, r)) for r in range(50)} == {0}
    draws = [choose(logits, SamplingParams(temperature=2.0), row_generator(7, 3)) for _ in range(3)]
    assert len(set(draws)) == 1  # the same row's stream, restarted, draws the same token
    with pytest.raises(ValueError, match=r"top_p=1.5: must be in \(0, 1\]"):
        SamplingParams(top_p=1.5).check()


def test_sampled_tokens_follow_the_tempered_softmax():
    import math

    logits = torch.tensor([1.0, 0.0, -0.5, 2.0])
    params = SamplingParams(temperature=0.7)
    draws = [choose(logits, params, row_generator(3, r)) for r in range(20000)]
    weights = [math.exp(x / 0.7) for x in logits.tolist()]
    for token, weight in enumerate(weights):
        assert draws.count(token) / len(draws) == pytest.approx(weight / sum(weights), abs=0.012)


def _generate(overrides: list[str], nproc: int = 1, timeout: int = 300):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    f"--nproc-per-node={nproc}", "--standalone"]
    return subprocess.run(launcher + [os.path.join(ROOT, "generate_thann.py"), *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def _results(tiny_checkpoint, prompts_file, out, nproc, layout, sampling=()):
    run = _generate([f"load={tiny_checkpoint}", f"prompts_file={prompts_file}", f"output={out}",
                     "max_new_tokens=12", "batch_size=3", *sampling, *layout], nproc)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def single_rank_generations(tiny_checkpoint, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return {"greedy": _results(tiny_checkpoint, prompts_file, out / "greedy.jsonl", 1, []),
            "sampled": _results(tiny_checkpoint, prompts_file, out / "sampled.jsonl", 1, [],
                                ["temperature=1.0", "top_k=50", "seed=7"])}


@pytest.mark.parametrize("nproc, layout, mode", [
    slow_case(2, ["parallel.tp=2", "parallel.sp=true"], "greedy", id="tp2_sp"),
    pytest.param(2, ["parallel.pp=2"], "greedy", id="pp2"),
    slow_case(2, ["parallel.ep=2"], "greedy", id="ep2"),
    slow_case(4, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2"], "greedy", id="tp2_sp_ep2"),
    pytest.param(4, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2"], "sampled", id="tp2_sp_ep2_sampled"),
    # two data-parallel ranks, each with its share of the prompts
    slow_case(2, [], "sampled", id="dp2_sampled"),
    # expert parallelism across two data-parallel ranks holding prompts of different lengths
    # (rank 0 prompts 0 and 2, rank 1 prompt 1 and a batch it drops): steps agreed by all ranks
    pytest.param(2, ["parallel.ep=2", "batch_size=1"], "greedy", id="ep2_dp2_own_prompts"),
])
def test_every_layout_generates_what_one_rank_does(tiny_checkpoint, prompts_file, single_rank_generations,
                                                   tmp_path, nproc, layout, mode):
    sampling = ["temperature=1.0", "top_k=50", "seed=7"] if mode == "sampled" else []
    batch = ["batch_size=2"] if not layout else []
    got = _results(tiny_checkpoint, prompts_file, tmp_path / "out.jsonl", nproc, layout + batch, sampling)
    expected = single_rank_generations[mode]
    assert [r["tokens"] for r in got] == [r["tokens"] for r in expected]
    assert [r["text"] for r in got] == [r["text"] for r in expected]
    for g, e in zip(got, expected):
        assert g["logprobs"] == pytest.approx(e["logprobs"], rel=1e-5)
    assert all(len(r["tokens"]) == 12 or r["finish_reason"] == "stop" for r in got)


def test_a_single_prompt_streams_its_tokens(tiny_checkpoint):
    run = _generate([f"load={tiny_checkpoint}", "prompt=What is the capital of France?", "max_new_tokens=4"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("What is the capital of France?") and "[length: 4 tokens]" in run.stdout


@pytest.mark.parametrize("override, message", [
    ("prompt=" + "word " * 80, "invalid config: prompt="),            # longer than the sequence budget (64)
    slow_case("prompt=''", "invalid config: prompt='': is empty"),
    slow_case("top_p=1.5", "invalid config: top_p='1.5': must be in (0, 1]"),
    ("tokenizer={type:huggingface,model:/nonexistent}", "invalid config: tokenizer="),
])
def test_bad_input_is_one_line_with_exit_2_and_writes_nothing(tiny_checkpoint, tmp_path, override, message):
    run = _generate([f"load={tiny_checkpoint}", f"output={tmp_path / 'out.jsonl'}", "prompt=Hi", override])
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().startswith(message) and run.stderr.count("\n") == 1, run.stderr[-2000:]
    assert not (tmp_path / "out.jsonl").exists()


def test_a_directory_without_a_checkpoint_or_of_another_tokenizer_is_refused(tiny_checkpoint, tmp_path):
    empty = _generate([f"load={tmp_path}", "prompt=Hi"])
    assert empty.returncode == 2 and empty.stderr.strip().startswith(f"invalid config: load='{tmp_path}': no checkpoint")
    from thann.data.tokenizer import train_bpe

    bpe = train_bpe(["a small corpus for a different tokenizer " * 20], vocab_size=300, output_dir=str(tmp_path / "bpe"))
    other = _generate([f"load={tiny_checkpoint}", "prompt=Hi", f"tokenizer={{type:huggingface,model:{bpe.model}}}"])
    assert other.returncode == 2
    assert "the checkpoint was trained with tiktoken:cl100k_base" in other.stderr and other.stderr.count("\n") == 1
