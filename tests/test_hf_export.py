"""HF transformers export and import (thann.export), checked against transformers itself: the
export loads with AutoModelForCausalLM (THANN's remote code) or plain MixtralForCausalLM and gives
THANN's logits and greedy tokens; a Mixtral directory starts THANN with bitwise its weights; the
tokenizer encodes, decodes and frames chat as THANN's; bad input is one line with exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zarr

from conftest import ROOT, run_pretrain, slow_case, tiny_run_overrides
from thann.data.chat import encode_chat, encode_prompt
from thann.data.tokenizer import build_tokenizer, train_bpe
from thann.inference.generator import Generator
from thann.inference.load import build_from_checkpoint, saved, slot_record
from thann.inference.sampling import SamplingParams

IMPORT_HARNESS = os.path.join(ROOT, "tests", "support", "hf_import_harness.py")
# Prompts of different lengths (the batch is left-padded for HF, ragged for THANN), non-ASCII too.
PROMPTS = ["Hello", "What is the capital of France? Answer in one word.", "Écris un poème sur la mer, s'il te plaît",
           "日本の首都は"]
TEXTS = PROMPTS + ["Привет, мир! 🎉🚀", "def f(x):\n    return x**2  # 1234567890\n",
                   "  spaces\t\ttabs\n\n\nend  ", "naïve café Zürich ß I'm you're they'll", "مرحبا بالعالم",
                   "🤷🏽‍♀️ a\r\nb"]
NEW_TOKENS = 12


def export(*args) -> None:
    run = subprocess.run([sys.executable, "-m", "thann.export", *map(str, args)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.fixture(scope="module")
def tp2_ep2_checkpoint(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tp2_ep2") / "run"
    layout = ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2"]
    out = run_pretrain(tiny_run_overrides(tiny_corpus, run_dir, steps=2) + layout, nproc=4, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def mixtral_checkpoint(tiny_corpus, tmp_path_factory):
    """THANN with the learnt tokenization off and its LM head untied: a Mixtral."""
    run_dir = tmp_path_factory.mktemp("mixtral") / "run"
    overrides = tiny_run_overrides(tiny_corpus, run_dir, steps=2) + ["model.tokenization.enabled=false",
                                                                     "model.tie_embeddings=false"]
    out = run_pretrain(overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def mixtral_export(mixtral_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "mixtral"
    export("hf", mixtral_checkpoint, out, "--mixtral", "--max-shard-size", "20MB")
    return out


@pytest.fixture(scope="module")
def thann_export(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "thann_tiny"
    export("hf", tiny_checkpoint, out)
    return out


def thann_model(checkpoint, layout):
    path, metadata = saved(str(checkpoint), "load")
    return build_from_checkpoint(path, slot_record(metadata), layout, "fp32")[0]


def relative(got, expected) -> float:
    return ((got - expected).norm() / expected.norm()).item()


def assert_same_logits_and_greedy_tokens(hf, thann, tokenizer) -> None:
    """HF's logits of a batch equal THANN's forward (1e-5 relative); HF ``generate`` (greedy, the
    batch left-padded, its KV cache) chooses THANN's generator's tokens, from the same logits."""
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    ids = torch.tensor([prompts[1][:8], prompts[2][:8]])
    with torch.no_grad():
        expected = thann(ids, torch.arange(8).expand(2, 8), None)
        got = hf(ids).logits
    assert got.shape == expected.shape and relative(got, expected) < 1e-5

    results = Generator([thann], tokenizer, 64).generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS),
                                                         keep_logits=True)
    width = max(map(len, prompts))
    padded = torch.tensor([[tokenizer.eod] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(padded, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                      return_dict_in_generate=True)
    for row, result in enumerate(results):
        assert out.sequences[row, width:width + len(result.tokens)].tolist() == result.tokens
        for step, logits in enumerate(result.logits):
            assert relative(out.logits[step][row, :tokenizer.vocab_size], logits) < 1e-5


@pytest.mark.parametrize("source", ["tp1", slow_case("tp2_ep2")])  # slow: 4 ranks train
def test_thann_export_gives_thanns_logits_and_greedy_tokens(request, single_rank, thann_export, source, tmp_path):
    from transformers import AutoModelForCausalLM

    if source == "tp1":
        checkpoint, out = request.getfixturevalue("tiny_checkpoint"), thann_export
    else:  # saved by four ranks: its arrays are gathered from tensor- and expert-parallel shards
        checkpoint, out = request.getfixturevalue("tp2_ep2_checkpoint"), tmp_path / "hf"
        export("hf", checkpoint, out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "thann" and config["auto_map"]["AutoModelForCausalLM"]
    assert config["tokenization_conv_widths"] == [3, 5, 7] and config["vocab_size"] == 100352
    # Padded vocabulary rows are never generated.
    assert json.loads((out / "generation_config.json").read_text())["suppress_tokens"] == list(range(100277, 100352))
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(hf).__name__ == "ThannForCausalLM" and hf.dtype == torch.float32
    assert_same_logits_and_greedy_tokens(hf, thann_model(checkpoint, single_rank),
                                         build_tokenizer("tiktoken", "cl100k_base"))


def test_mixtral_export_is_plain_mixtral_and_imports_back_bitwise(single_rank, tiny_corpus, mixtral_checkpoint,
                                                                  mixtral_export, tmp_path):
    from transformers import MixtralForCausalLM

    out = mixtral_export
    assert not list(out.glob("*.py")) and json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    index = json.loads((out / "model.safetensors.index.json").read_text())  # sharded above 20 MB
    assert "model.layers.1.block_sparse_moe.experts.15.w2.weight" in index["weight_map"]
    hf = MixtralForCausalLM.from_pretrained(out).eval()
    assert_same_logits_and_greedy_tokens(hf, thann_model(mixtral_checkpoint, single_rank),
                                         build_tokenizer("tiktoken", "cl100k_base"))

    # Back into THANN, at tp2·sp: the policy's checks, the trainer's start, each rank its slices.
    started = tmp_path / "started.pt"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                          IMPORT_HARNESS, started, out, *tiny_run_overrides(tiny_corpus, tmp_path / "run"),
                          "model.tokenization.enabled=false", "model.tie_embeddings=false", "parallel.tp=2",
                          "parallel.sp=true", "logging.wandb.enabled=false", "logging.progress=false"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"model: initialised from {out}" in run.stdout
    weights = torch.load(started)
    path = saved(str(mixtral_checkpoint), "load")[0]
    arrays = sorted(p.parent.name for p in Path(path).glob("*/zarr.json")
                    if not p.parent.name.startswith(("optimizer.", "chained_")))  # the model's, not Adam's
    assert sorted(weights) == arrays
    original = zarr.open(path, mode="r")
    for key, tensor in weights.items():
        assert torch.equal(tensor, torch.from_numpy(original[key][...])), key


def assert_tokenizes_as_thann(hf, thann) -> None:
    for text in TEXTS:
        ids = thann.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf.decode(ids) == thann.decode(ids) == text
    # THANN reads special-token text in a document as text; HF does so when asked.
    text = "a <|im_start|> b <|endoftext|>"
    assert hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == thann.encode(text)
    # The chat template frames messages as thann.data.chat does.
    question = "Quelle est la capitale de la France ? 日本"
    conversation = [("system", "You are terse."), ("user", question), ("assistant", "Paris.")]
    messages = [{"role": role, "content": content} for role, content in conversation]
    assert hf.apply_chat_template(messages[1:2], add_generation_prompt=True, tokenize=True, return_dict=False) \
        == encode_prompt(thann, question, "chat")
    framed, _ = encode_chat(thann, conversation)
    assert hf.apply_chat_template(messages, tokenize=True, return_dict=False) == framed[:-1]  # without the end token
    assert hf.eos_token_id == hf.pad_token_id == thann.eod and hf.padding_side == "left"


def test_tokenizer_encodes_decodes_and_frames_chat_as_thanns(thann_export, tmp_path):
    from transformers import AutoTokenizer

    cl100k = AutoTokenizer.from_pretrained(thann_export, trust_remote_code=True)
    assert_tokenizes_as_thann(cl100k, build_tokenizer("tiktoken", "cl100k_base"))
    # An HF tokenizer used in training goes through the same writer (thann.export.tokenizer).
    from thann.export.tokenizer import hf_tokenizer

    bpe = train_bpe(TEXTS * 20, vocab_size=400, output_dir=str(tmp_path / "bpe"))
    hf_tokenizer(bpe, 64).save_pretrained(tmp_path / "bpe_export")
    assert_tokenizes_as_thann(AutoTokenizer.from_pretrained(tmp_path / "bpe_export"), bpe)


def test_bad_input_is_one_line_with_exit_2_and_leaves_nothing(tiny_corpus, tiny_checkpoint, mixtral_checkpoint,
                                                              tmp_path, capsys):
    from thann.export.__main__ import main

    def refused(*args, starts: str) -> None:
        with pytest.raises(SystemExit) as stop:
            main(["hf", *map(str, args)])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith(starts) and err.count("\n") == 1, err

    out = tmp_path / "out"
    refused(tmp_path / "missing", out, starts="invalid config: checkpoint=")
    nnn = tmp_path / "nnn"
    trained = run_pretrain(tiny_run_overrides(tiny_corpus, nnn, steps=1) + [
        "train.warmup_steps=0", "model=nnn_tiny", "model.hidden_size=64", "model.intermediate_size=128"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    refused(nnn, out, starts=f"invalid config: checkpoint='{saved(str(nnn), 'load')[0]}': holds a nnn model")
    refused(tiny_checkpoint, out, "--mixtral", starts="invalid config: --mixtral=")
    refused(tiny_checkpoint, starts="python -m thann.export hf: the following arguments are required: out")
    assert not out.exists() and not list(tmp_path.glob("out.*"))

    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused(mixtral_checkpoint, out, "--mixtral", starts=f"invalid config: out='{out}': exists; pass --force")
    refused(mixtral_checkpoint, out, "--mixtral", "--force", starts=f"invalid config: out='{out}': holds files")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and not list(tmp_path.glob("out.*"))
    with pytest.raises(SystemExit) as stop:
        main(["hf", "--help"])
    assert stop.value.code == 0 and "exit codes:" in capsys.readouterr().out


def test_a_mixtral_of_another_shape_cannot_start_thann(mixtral_export, pairs_with_negatives, tmp_path):
    """Through contrastive training's init_from (THANN's encoder starts from a language model)."""
    run = subprocess.run([sys.executable, "pretrain_contrastive.py", f"init_from={mixtral_export}",
                          f"checkpoint.dir={tmp_path / 'run'}", f"data.paths=[{pairs_with_negatives}]",
                          "model.tokenization.enabled=false", "model.tie_embeddings=false", "model.num_layers=3",
                          "logging.wandb.enabled=false"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr[-3000:]
    assert run.stderr.startswith(f"invalid config: model.num_layers=3: init_from={mixtral_export} holds a model with "
                                 "num_hidden_layers=2")
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]  # the run directory's lock, nothing written
