"""``thann-embed``: embeddings of texts or images with any THANN checkpoint, in any layout
(configs/embed.yaml): a contrastive one as trained, a language model's as the mean of its final
hidden states, an image-text one by its image encoder (images) or its text encoder (texts).
Input: a text file (one text per line), JSON lines (``{"id": ..., "text": ...}`` or ``{"id": ...,
"image": path}``, paths relative to the file) or a directory of images (ids: their file names);
output: ``OUTPUT.npy`` (float32 [N, P], L2-normalised rows, in input order) and
``OUTPUT.ids.json``; centred or whitened on request, with the statistics used in
``OUTPUT.stats.npz`` (apply them to other texts with ``statistics=``). Input and output problems
(thann.outputs) are one line with exit code 2, before the model is built; nothing is written then."""

import contextlib
import json
import logging
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from thann.cli import exit_if_help, exit_on_bad_input, load_config
from thann.config import ConfigError, check_parallel, require
from thann.checkpoint.weights import primary_slot, saved_slots, slot_prefix
from thann.data.images import ImageDataError, read_image, to_tensor
from thann.data.pairs import fit_text
from thann.inference.embedding import (POSTPROCESSING, apply_statistics, embed_images, embed_texts,
                                       output_statistics)
from thann.inference.load import build_from_checkpoint, check_layout, saved, saved_tokenizer, slot_args
from thann.models import registry
from thann.outputs import atomic_write, check_output

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp")


def _inputs(path: str) -> tuple[str, list[str], list[str]]:
    """("text", ids, texts) or ("image", ids, image paths) of ``input=``."""
    require(path is not None and os.path.exists(path), "input", path, "no such file or directory")
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))
        require(bool(names), "input", path, f"holds no image file ({', '.join(IMAGE_SUFFIXES)})")
        return "image", names, [os.path.join(path, n) for n in names]
    ids, items, kinds = [], [], set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith((".jsonl", ".json")):
                try:
                    record = json.loads(line)
                except ValueError:
                    raise ConfigError("input", f"{path}:{number}", "not a JSON object") from None
                kind = next((k for k in ("text", "image") if isinstance(record, dict) and k in record), None)
                require(kind is not None and isinstance(record[kind], str) and record[kind] != "", "input",
                        f"{path}:{number}", 'expected {"id": ..., "text": "..."} or {"id": ..., "image": path}')
                kinds.add(kind)
                require(len(kinds) == 1, "input", f"{path}:{number}", "mixes texts and images: embed them apart")
                ids.append(str(record.get("id", number)))
                items.append(record[kind] if kind == "text" else
                             os.path.join(os.path.dirname(os.path.abspath(path)), record[kind]))
            else:
                kinds.add("text")
                ids.append(str(number))
                items.append(line.rstrip("\n"))
    require(bool(items), "input", path, "holds no text")
    return kinds.pop(), ids, items


def _slot(metadata: dict, kind: str, requested: str | None, load: str) -> str:
    """The checkpoint's slot that embeds ``kind``: ``requested``, else its one image encoder
    (images) or its primary slot, or else its one text model (texts)."""
    slots = saved_slots(metadata)
    embeds_images = {name: registry.spec_of(slot_args(record)).embeds_images for name, record in slots.items()}
    if requested is not None:
        require(requested in slots, "slot", requested, f"{load} holds the slots {sorted(slots)}")
        require(embeds_images[requested] == (kind == "image"), "slot", requested,
                f"embeds {'images' if embeds_images[requested] else 'texts'}, and the input holds {kind}s")
        return requested
    fitting = [name for name in slots if embeds_images[name] == (kind == "image")]
    require(bool(fitting), "input", kind + "s", f"{load} holds no {kind} encoder (its slots: {sorted(slots)})")
    return primary_slot(metadata) if primary_slot(metadata) in fitting else fitting[0]


def _outputs(cfg: DictConfig) -> tuple[str, ...]:
    """OUTPUT.npy, OUTPUT.ids.json and, when computed here, OUTPUT.stats.npz."""
    return (f"{cfg.output}.npy", f"{cfg.output}.ids.json") + ((f"{cfg.output}.stats.npz",)
                                                             if cfg.postprocess != "none" else ())


def _images(source: str, paths: list[str], size: int, resize: bool) -> torch.Tensor:
    """Floats [N, 3, size, size] of the image files (ConfigError naming a bad one)."""
    try:
        return to_tensor(np.stack([read_image(p, size, resize, resize_field="resize") for p in paths]))
    except ImageDataError as e:
        raise ConfigError("input", source, str(e)) from None


def _statistics(cfg: DictConfig, dim: int, texts: int) -> dict | None:
    """The saved statistics to apply (``statistics=``), checked; None when none are given."""
    require(cfg.postprocess in POSTPROCESSING, "postprocess", cfg.postprocess, f"must be one of {list(POSTPROCESSING)}")
    require(cfg.postprocess != "whiten" or texts > dim, "postprocess", cfg.postprocess,
            f"needs more texts than the {dim} dimensions ({texts} given): use center, or statistics= of a larger set")
    if cfg.statistics is None:
        return None
    require(cfg.postprocess == "none", "statistics", cfg.statistics,
            f"applies saved statistics; postprocess={cfg.postprocess} would compute others (give one of the two)")
    require(os.path.isfile(cfg.statistics), "statistics", cfg.statistics, "no such file")
    try:
        with np.load(cfg.statistics, allow_pickle=False) as saved:
            statistics = {"mean": saved["mean"], "transform": saved["transform"]}
    except (ValueError, KeyError, OSError):
        raise ConfigError("statistics", cfg.statistics, "not an OUTPUT.stats.npz of thann-embed") from None
    require(statistics["mean"].shape == (dim,) and statistics["transform"].shape == (dim, dim), "statistics",
            cfg.statistics, f"holds statistics of {statistics['mean'].shape[0]}-dimensional embeddings, not {dim}")
    return statistics


def encoder_record(record: dict, load: str) -> tuple[dict, str | None]:
    """The checkpoint's model as an encoder: a contrastive one as trained; a language model's
    decoder as the mean of its final hidden states over a text's real tokens, with a note saying so."""
    arch = record["args"].get("arch", "thann")
    if arch == "thann_encoder":
        return record, None
    require(arch == "thann", "load", load, f"holds a {arch} model; thann-embed reads THANN checkpoints")
    args = {**record["args"], "arch": "thann_encoder", "pooling": "mean", "projection_dim": None,
            "learnt_temperature": None}
    return {**record, "args": args}, (f"{load} is a language model: its embeddings are the mean of its final "
                                      "hidden states over each text's tokens")


def _build(cfg: DictConfig, record: dict, path: str, prefix: str, dp: int):
    from thann.parallel import state

    layout = state.initialize(cfg.parallel, dp, 0)
    return build_from_checkpoint(path, record, cfg.parallel, cfg.precision, prefix), layout


HELP = dict(
    program="thann-embed", config_name="embed",
    summary="Embeds texts (one per line, or JSON lines {\"id\": ..., \"text\": ...}) or images (a directory, "
            "or JSON lines {\"id\": ..., \"image\": path}) with a THANN checkpoint (contrastive, image-text, or a "
            "language model's mean-pooled states); writes OUTPUT.npy (float32, L2-normalised rows) and "
            "OUTPUT.ids.json, and OUTPUT.stats.npz when centring or whitening.",
    keys=("load", "input", "output", "force", "batch_size", "slot", "resize", "postprocess", "statistics",
          "parallel.tp", "parallel.pp"),
    examples=("thann-embed load=checkpoints/thann_tiny_contrastive input=texts.txt output=embeddings",
              "thann-embed load=checkpoints/thann_tiny input=corpus.txt output=corpus postprocess=whiten",
              "thann-embed load=checkpoints/thann_tiny input=queries.txt output=queries statistics=corpus.stats.npz",
              "thann-embed load=checkpoints/vit_tiny_thann_tiny_image_text input=my_images/ output=images resize=true"))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    exit_if_help(argv, **HELP)
    rank0 = os.environ.get("RANK", "0") == "0"
    logging.getLogger("megatron").setLevel(logging.WARNING)

    def prepare():
        cfg = load_config("embed", argv)
        dp = check_parallel(cfg.parallel, int(os.environ.get("WORLD_SIZE", "1")))
        path, metadata = saved(str(cfg.load), "load")
        kind, ids, items = _inputs(cfg.input)
        require(isinstance(cfg.batch_size, int) and cfg.batch_size > 0, "batch_size", cfg.batch_size,
                "must be a positive integer")
        require(cfg.output is not None, "output", None, "give the path prefix of OUTPUT.npy and OUTPUT.ids.json")
        slot = _slot(metadata, kind, cfg.slot, cfg.load)
        record, note = encoder_record(saved_slots(metadata)[slot], cfg.load) if kind == "text" \
            else (saved_slots(metadata)[slot], None)
        args = record["args"]
        if kind == "text":
            inputs = (saved_tokenizer(metadata, None, "load"), items)
        else:
            inputs = (None, _images(cfg.input, items, args["image_size"], cfg.resize))
        statistics = _statistics(cfg, args["projection_dim"] or args["hidden_size"], len(items))
        for output in _outputs(cfg):
            check_output(output, force=cfg.force, inputs={"input": cfg.input, "load": cfg.load,
                                                          "statistics": cfg.statistics})
        check_layout(record, cfg.parallel)
        if note and rank0:
            print(note, file=sys.stderr)
        return cfg, dp, record, *inputs, ids, statistics, *_build(cfg, record, path, slot_prefix(metadata, slot), dp)

    cfg, dp, record, tokenizer, items, ids, statistics, chunks, layout = exit_on_bad_input(prepare)
    from megatron.core import parallel_state

    from thann.parallel import state

    args = record["args"]
    dim = args["projection_dim"] or args["hidden_size"]
    if tokenizer is not None:
        seq = record["seq_length"]
        items = [fit_text(tokenizer.encode(text), seq, tokenizer.eod) for text in items]

        def embed(part):
            return embed_texts(chunks, part, cfg.batch_size, seq, tokenizer.eod, dim)
    else:
        def embed(part):
            return embed_images(chunks, part, cfg.batch_size, dim)
    # Data-parallel ranks share out the inputs, except under expert parallelism (its groups span
    # data-parallel ranks, whose steps must match one for one).
    shares = dp if layout.ep == 1 else 1
    share = parallel_state.get_data_parallel_rank() if shares > 1 else 0
    bounds = np.linspace(0, len(items), shares + 1).astype(int)
    part = items[bounds[share]:bounds[share + 1]]
    mine = embed(part if len(part) else items[:1])[: len(part)]  # a rank without inputs runs one, dropped
    parts = [None] * shares
    if shares > 1:
        dist.all_gather_object(parts, mine.cpu(), group=parallel_state.get_data_parallel_group())
    else:
        parts = [mine.cpu()]
    if rank0:
        matrix = torch.cat(parts).numpy().astype(np.float32)
        if cfg.postprocess != "none":
            statistics = output_statistics(matrix, cfg.postprocess)
        if statistics is not None:
            matrix = apply_statistics(matrix, statistics)
        matrix_path, ids_path, *stats_path = _outputs(cfg)
        with contextlib.ExitStack() as stack:
            matrix_temporary, ids_temporary, *stats_temporary = (stack.enter_context(atomic_write(p))
                                                                 for p in _outputs(cfg))
            with open(matrix_temporary, "wb") as f:
                np.save(f, matrix, allow_pickle=False)
            with open(ids_temporary, "w", encoding="utf-8") as f:
                json.dump(ids, f)
            for temporary in stats_temporary:
                with open(temporary, "wb") as f:
                    np.savez(f, **statistics)
        written = ", ".join([ids_path, *stats_path])
        print(f"wrote {matrix_path} ({matrix.shape[0]} x {matrix.shape[1]}) and {written} "
              f"(layout {layout.describe()})")
    state.destroy()


if __name__ == "__main__":
    main()
