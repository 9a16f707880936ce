"""``thann-generate`` / ``generate_thann.py``: generate with a trained checkpoint in any layout
(configs/generate.yaml). Prompts come from ``prompt=`` or a JSON-lines ``prompts_file=``;
an image-conditioned checkpoint (finetune_captioning.py) reads ``image=`` before each of them;
results go to ``output=`` as JSON lines, or to the terminal (a single prompt streams its tokens
as they are produced). Everything that can be wrong with the input or the output (thann.outputs)
is checked before the model is built, and reported in one line with exit code 2; nothing is
written then."""

import json
import logging
import os
import sys

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from thann.cli import exit_if_help, exit_on_bad_input, load_config
from thann.config import ConfigError, check_parallel, require
from thann.data.chat import encode_prompt
from thann.inference.generator import Generation, Generator
from thann.inference.load import build_from_checkpoint, check_layout, saved, saved_tokenizer, slot_record
from thann.inference.sampling import SamplingParams
from thann.outputs import atomic_write, check_output


def _prompts(cfg: DictConfig) -> list[str]:
    require((cfg.prompt is None) != (cfg.prompts_file is None), "prompt", cfg.prompt,
            "give exactly one of prompt=... and prompts_file=...")
    if cfg.prompt is not None:
        return [str(cfg.prompt)]
    require(os.path.isfile(cfg.prompts_file), "prompts_file", cfg.prompts_file, "no such file")
    prompts = []
    with open(cfg.prompts_file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise ConfigError("prompts_file", f"{cfg.prompts_file}:{number}", "not a JSON object") from None
            require(isinstance(record, dict) and isinstance(record.get("prompt"), str), "prompts_file",
                    f"{cfg.prompts_file}:{number}", 'expected {"prompt": "..."}')
            prompts.append(record["prompt"])
    require(bool(prompts), "prompts_file", cfg.prompts_file, "holds no prompt")
    return prompts


def _sampling(cfg: DictConfig) -> SamplingParams:
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=float(cfg.temperature),
                            top_k=cfg.top_k, top_p=float(cfg.top_p), seed=cfg.seed,
                            stop_strings=tuple(str(s) for s in cfg.stop))
    try:
        params.check()
    except ValueError as e:
        field, _, reason = str(e).partition(": ")
        name, _, value = field.partition("=")
        raise ConfigError(name, value, reason) from None
    return params


def _saved(cfg: DictConfig) -> tuple[str, dict, dict]:
    """(path, metadata, the model's slot record) of ``load``: a checkpoint, or an NNN packed
    export (whose metadata holds the model config and the tokenizer, not a sequence length)."""
    if os.path.isfile(str(cfg.load)):
        from thann.models.nnn.pack import packed_metadata

        try:
            packed = packed_metadata(str(cfg.load))
        except ValueError as e:
            raise ConfigError("load", cfg.load, str(e).split(": ", 1)[-1]) from None
        require(all(cfg.parallel[k] == 1 for k in ("tp", "pp", "ep")), "parallel", dict(cfg.parallel),
                "a packed export is generated from on one rank")
        metadata = {"tokenizer": json.loads(packed["tokenizer"])}
        return str(cfg.load), metadata, {"args": json.loads(packed["model_config"]), "seq_length": None}
    path, metadata = saved(str(cfg.load), "load")
    record = slot_record(metadata)
    check_layout(record, cfg.parallel)
    reads_images = record["args"].get("arch") == "thann_vlm"
    require(reads_images == (cfg.image is not None), "image", cfg.image,
            f"{cfg.load} reads an image before its prompt: give image=path" if reads_images
            else f"{cfg.load} does not read images (an image-conditioned one comes from finetune_captioning.py)")
    return path, metadata, record


def _image_encoder(cfg: DictConfig, metadata: dict):
    """(checkpoint path, slot record, arrays prefix) of the image encoder an image-conditioned
    checkpoint read, and the image as floats [1, 3, H, W]. The encoder was frozen in that run, so
    its weights are where the run took them from (the slot's ``init``)."""
    from thann.checkpoint.weights import checkpoint_path, saved_run, saved_slots, slot_prefix
    from thann.data.images import ImageDataError, read_image, to_tensor

    record = saved_slots(metadata)["image"]
    require(record["init"] is not None and os.path.isdir(str(record["init"])), "load", cfg.load,
            f"its image encoder was read from {record['init']}, which is not there any more")
    path = checkpoint_path(str(record["init"]), "load")
    source = saved_run(path, "load")
    check_layout(record, cfg.parallel)
    size = record["args"]["image_size"]
    try:
        pixels = read_image(str(cfg.image), size, cfg.resize, resize_field="resize")
    except ImageDataError as e:
        raise ConfigError("image", cfg.image, str(e)) from None
    return path, record, slot_prefix(source, "image"), to_tensor(pixels[None])


def _prepare(cfg: DictConfig):
    """Every check that needs no model: the checkpoint, its tokenizer, the prompts, sampling, the output."""
    path, metadata, record = _saved(cfg)
    image = None if cfg.image is None else _image_encoder(cfg, metadata)
    tokenizer = saved_tokenizer(metadata, cfg.tokenizer, "tokenizer")
    params = _sampling(cfg)
    require(isinstance(cfg.batch_size, int) and cfg.batch_size > 0, "batch_size", cfg.batch_size,
            "must be a positive integer")
    texts = _prompts(cfg)
    template = "chat" if cfg.chat else "{prompt}"
    budget = cfg.max_sequence_length or record["seq_length"]
    require(budget is not None, "max_sequence_length", None,
            "give it for a packed export (it records no sequence length)")
    prompts = []
    for i, text in enumerate(texts):
        where = "prompt" if cfg.prompt is not None else f"prompts_file[{i}]"
        require(text != "", where, text, "is empty")  # spaces are text; "" (no token without chat) is a slip
        prompts.append(encode_prompt(tokenizer, text, template))
        require(len(prompts[-1]) < budget, where, text[:40] + ("..." if len(text) > 40 else ""),
                f"is {len(prompts[-1])} tokens; max_sequence_length={budget} leaves no room for a new token")
    if cfg.output is not None:
        check_output(str(cfg.output), force=cfg.force, inputs={"prompts_file": cfg.prompts_file, "load": cfg.load})
    return path, record, image, tokenizer, params, texts, prompts, budget


def _build(cfg: DictConfig, record: dict, path: str, image, dp: int):
    """(this rank's model chunks, the image's patch states [1, P, H] or None, the layout)."""
    from megatron.core.utils import unwrap_model

    from thann.parallel import state

    layout = state.initialize(cfg.parallel, dp, cfg.seed)
    if os.path.isfile(path):  # an NNN packed export: ternary weights, one rank
        from thann.models.nnn.pack import load_packed

        return [load_packed(path).to(state.device())], None, layout
    states = None
    if image is not None:
        image_path, image_record, prefix, pixels = image
        (encoder,) = build_from_checkpoint(image_path, image_record, cfg.parallel, cfg.precision, prefix)
        with torch.no_grad():
            states = unwrap_model(encoder).patch_states(pixels.to(state.device()))
    return build_from_checkpoint(path, record, cfg.parallel, cfg.precision), states, layout


def _record(index: int, text: str, result: Generation) -> dict:
    return {"index": index, "prompt": text, "text": result.text, "tokens": result.tokens,
            "logprobs": result.logprobs, "finish_reason": result.finish_reason}


HELP = dict(
    program="generate_thann.py (thann-generate)", config_name="generate",
    summary="Generates with a trained checkpoint (the newest of a run directory, or one iter_* directory) in any "
            "layout, with a KV cache; the model's shape, tokenizer and sequence length come from the checkpoint.",
    keys=("load", "prompt", "prompts_file", "image", "output", "force", "chat", "max_new_tokens", "temperature",
          "top_k", "top_p", "seed", "batch_size", "parallel.tp", "parallel.pp", "parallel.ep"),
    examples=('.venv/bin/python generate_thann.py load=checkpoints/thann_tiny prompt="What is the capital of France?"',
              ".venv/bin/python generate_thann.py prompts_file=prompts.jsonl output=out.jsonl temperature=0.8",
              '.venv/bin/python generate_thann.py load=checkpoints/thann_tiny_captioning image=a.png prompt="Emoji:"'))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    exit_if_help(argv, **HELP)
    rank0 = os.environ.get("RANK", "0") == "0"
    logging.getLogger("megatron").setLevel(logging.WARNING)

    def prepare():
        cfg = load_config("generate", argv)
        dp = check_parallel(cfg.parallel, int(os.environ.get("WORLD_SIZE", "1")))
        path, record, image, tokenizer, params, texts, prompts, budget = _prepare(cfg)
        return cfg, dp, tokenizer, params, texts, prompts, budget, *_build(cfg, record, path, image, dp)

    cfg, dp, tokenizer, params, texts, prompts, budget, chunks, image_states, layout = exit_on_bad_input(prepare)
    from megatron.core import parallel_state

    from thann.parallel import state

    generator = Generator(chunks, tokenizer, budget)
    # Data-parallel ranks share out the batches; every rank makes the same number of generate
    # calls (the generator's steps are collective), a rank without prompts left generating its
    # first batch again and dropping the results.
    rounds = -(-len(prompts) // (dp * cfg.batch_size))
    firsts = [(r * dp + layout.dp_rank) * cfg.batch_size for r in range(rounds)]
    stream = cfg.prompt is not None and cfg.output is None and rank0
    shown = {"chars": 0}

    def print_new_text(row: int, result: Generation) -> None:
        print(result.text[shown["chars"]:], end="", flush=True)
        shown["chars"] = len(result.text)

    if stream:
        print(texts[0], end="", flush=True)
    records = []
    for first in firsts:
        kept = first < len(prompts)
        start = first if kept else firsts[0] % len(prompts)
        batch = prompts[start:start + cfg.batch_size]
        results = generator.generate(batch, params, first_index=start, on_token=print_new_text if stream else None,
                                     image_states=None if image_states is None else
                                     image_states.expand(len(batch), -1, -1))
        if kept:
            records += [_record(first + i, texts[first + i], r) for i, r in enumerate(results)]
    gathered = [None] * dp
    dist.all_gather_object(gathered, records, group=parallel_state.get_data_parallel_group())
    records = sorted({r["index"]: r for part in gathered for r in part}.values(), key=lambda r: r["index"])
    if stream:
        print(f"\n[{records[0]['finish_reason']}: {len(records[0]['tokens'])} tokens]")
    elif rank0:
        lines = "".join(json.dumps(r) + "\n" for r in records)
        if cfg.output is None:
            sys.stdout.write(lines)
        else:
            with atomic_write(str(cfg.output)) as temporary, open(temporary, "w", encoding="utf-8") as f:
                f.write(lines)
            print(f"wrote {cfg.output}: {len(records)} generations (layout {layout.describe()})")
    state.destroy()
