"""The inference and export tools (generate, embed, checkpoint export, nnn_pack) never destroy a
file they did not own, and every problem with an output is one line with exit code 2 before the
work: the tool's expensive step is replaced by one that fails the test, and the tool must stop
first. Refusals run the tool's ``main`` in this process (no start-up cost); successes run it as
the user does."""

import importlib
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

# The first expensive step of each tool: building the model, verifying and reading the arrays,
# loading the weights.
GENERATE = ("thann.inference.cli", "_build")
EMBED = ("thann.inference.embed", "_build")
EXPORT = ("thann.checkpoint.__main__", "verify")
PACK = ("thann.inference.nnn_pack", "build_from_checkpoint")
PRECIOUS = b"a file the tool does not own\n"


class WorkStarted(Exception):
    pass


def _start_work(*args, **kwargs):
    raise WorkStarted


def _refused(tool, argv, monkeypatch, capsys) -> str:
    """Runs ``tool``'s main with its work replaced; returns the one line it printed, exiting 2."""
    module_name, work = tool
    module = importlib.import_module(module_name)
    monkeypatch.setattr(module, work, _start_work)
    with pytest.raises(SystemExit) as stopped:
        module.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert stopped.value.code == 2, err
    assert err.count("\n") == 1, err
    return err.strip()


def _no_temporaries(root) -> None:
    assert not list(root.rglob("*.tmp*"))


def _precious(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(PRECIOUS)
    return path


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "Hello"}) + "\n" + json.dumps({"prompt": "What is 2+2?"}) + "\n")
    return path


@pytest.fixture
def texts(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("How do I bake bread?\nThe capital of France\n")
    return path


def _argv(tool, checkpoint, out, prompts=None, texts=None):
    if tool is GENERATE:
        return [f"load={checkpoint}", f"prompts_file={prompts}", f"output={out}"]
    if tool is EMBED:
        return [f"load={checkpoint}", f"input={texts}", f"output={out}"]
    return ["export", checkpoint, out] if tool is EXPORT else [checkpoint, out]


@pytest.mark.parametrize("tool, force_flag", [(GENERATE, "force=true"), (EMBED, "force=true"), (EXPORT, "--force"),
                                              (PACK, "--force")], ids=["generate", "embed", "export", "nnn_pack"])
def test_an_existing_output_is_refused_without_force(tiny_checkpoint, tmp_path, prompts, texts, monkeypatch, capsys,
                                                     tool, force_flag):
    existing = _precious(tmp_path / ("emb.ids.json" if tool is EMBED else "out"))  # embed: either output counts
    out = tmp_path / "emb" if tool is EMBED else existing
    line = _refused(tool, _argv(tool, tiny_checkpoint, out, prompts, texts), monkeypatch, capsys)
    assert f"{existing}': exists; pass {force_flag} to overwrite it" in line
    assert existing.read_bytes() == PRECIOUS and not (tmp_path / "emb.npy").exists()
    _no_temporaries(tmp_path)


@pytest.mark.parametrize("tool", [GENERATE, EMBED, EXPORT, PACK], ids=["generate", "embed", "export", "nnn_pack"])
def test_an_existing_directory_is_refused_even_with_force(tiny_checkpoint, tmp_path, prompts, texts, monkeypatch,
                                                          capsys, tool):
    directory = tmp_path / ("emb.npy" if tool is EMBED else "out")
    inside = _precious(directory / "kept")
    out = tmp_path / "emb" if tool is EMBED else directory
    force = ["force=true"] if tool in (GENERATE, EMBED) else ["--force"]
    line = _refused(tool, _argv(tool, tiny_checkpoint, out, prompts, texts) + force, monkeypatch, capsys)
    assert f"{directory}': is a directory; name a file" in line
    assert inside.read_bytes() == PRECIOUS
    _no_temporaries(tmp_path)


@pytest.mark.parametrize("same", ["path", "hard_link"])
def test_generate_refuses_to_write_over_its_prompts_even_with_force(tiny_checkpoint, tmp_path, prompts, monkeypatch,
                                                                     capsys, same):
    out = prompts
    if same == "hard_link":
        out = tmp_path / "out.jsonl"
        os.link(prompts, out)
    before = prompts.read_bytes()
    line = _refused(GENERATE, [f"load={tiny_checkpoint}", f"prompts_file={prompts}", f"output={out}", "force=true"],
                    monkeypatch, capsys)
    assert f"output='{out}': is prompts_file ({prompts}), which it reads; write it elsewhere" in line
    assert prompts.read_bytes() == before
    _no_temporaries(tmp_path)


def test_embed_refuses_to_write_over_its_input_even_with_force(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    texts = tmp_path / "texts.npy"  # a text file that OUTPUT=texts would replace
    texts.write_text("How do I bake bread?\n")
    line = _refused(EMBED, [f"load={tiny_checkpoint}", f"input={texts}", f"output={tmp_path / 'texts'}", "force=true"],
                    monkeypatch, capsys)
    assert f"output='{texts}': is input ({texts}), which it reads" in line
    assert texts.read_text() == "How do I bake bread?\n" and not (tmp_path / "texts.ids.json").exists()


@pytest.mark.parametrize("tool", [GENERATE, EXPORT], ids=["generate", "export"])
def test_an_output_under_a_file_is_refused(tiny_checkpoint, tmp_path, prompts, monkeypatch, capsys, tool):
    blocker = _precious(tmp_path / "not_a_directory")
    line = _refused(tool, _argv(tool, tiny_checkpoint, blocker / "sub" / "out", prompts), monkeypatch, capsys)
    assert f"cannot be written: {blocker} is not a directory" in line
    assert blocker.read_bytes() == PRECIOUS


@pytest.mark.parametrize("tool, argv", [
    (GENERATE, ["prompt=Hi", "batch_size=0"]),
    (GENERATE, ["prompt=''"]),
    (EMBED, ["batch_size=0"]),
], ids=["generate_batch_size", "generate_empty_prompt", "embed_batch_size"])
def test_bad_values_are_refused_before_the_model_is_built(tiny_checkpoint, tmp_path, texts, monkeypatch, capsys,
                                                          tool, argv):
    extra = [f"input={texts}"] if tool is EMBED else []
    line = _refused(tool, [f"load={tiny_checkpoint}", f"output={tmp_path / 'out'}", *extra, *argv],
                    monkeypatch, capsys)
    assert line.startswith("invalid config: batch_size=0: must be a positive integer" if "batch_size=0" in argv
                           else "invalid config: prompt='': is empty")
    assert not list(tmp_path.glob("out*"))


def test_nnn_pack_usage_errors_exit_2(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(PACK[0]).main([str(tiny_checkpoint)])
    assert stopped.value.code == 2 and "required: out" in capsys.readouterr().err
    line = _refused(PACK, [tiny_checkpoint, tmp_path / "nnn.safetensors"], monkeypatch, capsys)
    assert line.endswith("holds a thann model, not an NNN")
    assert not list(tmp_path.iterdir())


def test_embed_takes_spaces_as_a_text_and_a_missing_directory_as_its_output(tiny_checkpoint, tmp_path, monkeypatch):
    from thann.inference import embed

    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"id": "a", "text": "   "}) + "\n" + json.dumps({"id": "b", "text": "Hi"}) + "\n")
    assert embed._inputs(str(texts)) == ("text", ["a", "b"], ["   ", "Hi"])
    monkeypatch.setattr(embed, "_build", _start_work)
    with pytest.raises(WorkStarted):  # every check passed
        embed.main([f"load={tiny_checkpoint}", f"input={texts}", f"output={tmp_path / 'new' / 'emb'}"])
    assert not (tmp_path / "new").exists()  # created when written, after the work


def test_export_creates_a_missing_directory(tiny_checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file

    from thann.checkpoint.__main__ import main

    out = tmp_path / "missing" / "deeper" / "w.safetensors"
    main(["export", str(tiny_checkpoint), str(out)])
    assert f"wrote {out}" in capsys.readouterr().out
    assert load_file(out)["embedding.word_embeddings.weight"].shape == (100352, 128)
    _no_temporaries(tmp_path)


def _generate(*overrides):
    return subprocess.run([sys.executable, os.path.join(ROOT, "generate_thann.py"), *map(str, overrides)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_a_prompt_of_spaces_generates_into_a_new_directory(tiny_checkpoint, tmp_path):
    out = tmp_path / "new" / "deeper" / "out.jsonl"
    run = _generate(f"load={tiny_checkpoint}", 'prompt="   "', f"output={out}", "max_new_tokens=2")
    assert run.returncode == 0, run.stderr[-3000:]
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["prompt"] == "   " and len(record["tokens"]) == 2
    _no_temporaries(tmp_path)


def test_force_replaces_an_existing_output_completely(tiny_checkpoint, tmp_path, prompts):
    out = _precious(tmp_path / "out.jsonl")
    run = _generate(f"load={tiny_checkpoint}", f"prompts_file={prompts}", f"output={out}", "force=true",
                    "max_new_tokens=2")
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1] and all(len(r["tokens"]) == 2 for r in records)
    _no_temporaries(tmp_path)


def test_a_refusal_is_one_line_in_a_real_process(tiny_checkpoint, tmp_path):
    run = _generate(f"load={tiny_checkpoint}", "prompt=Hi", "batch_size=0", f"output={tmp_path / 'out.jsonl'}")
    assert run.returncode == 2
    assert run.stderr == "invalid config: batch_size=0: must be a positive integer\n"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path, failure):
    from thann.outputs import atomic_write

    out = _precious(tmp_path / "out")
    with pytest.raises(failure):
        with atomic_write(str(out)) as temporary:
            with open(temporary, "wb") as f:
                f.write(b"half")
            raise failure
    assert out.read_bytes() == PRECIOUS
    _no_temporaries(tmp_path)
    with atomic_write(str(out)) as temporary:
        with open(temporary, "wb") as f:
            f.write(b"whole")
    assert out.read_bytes() == b"whole"
    _no_temporaries(tmp_path)
