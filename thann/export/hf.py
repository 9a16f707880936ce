"""A THANN checkpoint as an HF transformers model directory.

    export("checkpoints/thann_tiny", "checkpoints/thann_tiny_hf", mixtral=False, force=False)

reads the checkpoint's model arrays (global shapes, whatever layout saved them; their checksums
verified; never a pickle), maps them (thann.checkpoint.mixtral) and writes, into a new directory that
takes the output's name only when complete:

    config.json                     THANN's (model_type thann, auto_map) or, with mixtral, Mixtral's
    configuration_thann.py, modeling_thann.py   THANN's remote code (not with mixtral)
    model.safetensors               or model-0000i-of-0000n.safetensors + index, above max_shard_size
    generation_config.json          end tokens; the padded vocabulary rows suppressed
    tokenizer.json, tokenizer_config.json, chat_template.jinja   (thann.export.tokenizer)

The embedding keeps THANN's padded rows (config vocab_size 100,352 for cl100k's 100,277 tokens),
so logits equal THANN's at every position and the weights import back bitwise; the rows no token
has are listed in ``suppress_tokens``, so ``generate`` never emits them.
"""

import contextlib
import os
import shutil

import tensorstore as ts
import torch
from omegaconf import DictConfig

from thann.checkpoint import mixtral as mapping
from thann.checkpoint import zarr_store
from thann.config import ConfigError, nearest_existing, require
from thann.data.tokenizer import CHAT_SPECIAL_TOKENS, Tokenizer
from thann.inference.load import saved, saved_tokenizer, slot_args, slot_record

HERE = os.path.dirname(os.path.abspath(__file__))
REMOTE_CODE = ("configuration_thann.py", "modeling_thann.py")
AUTO_MAP = {"AutoConfig": "configuration_thann.ThannConfig", "AutoModel": "modeling_thann.ThannModel",
            "AutoModelForCausalLM": "modeling_thann.ThannForCausalLM"}


def check_exportable(args: DictConfig, path: str) -> None:
    """The checkpoint ``path`` holds a THANN model whose decoder is Mixtral's: ConfigError otherwise."""
    arch = args.get("arch", "thann")
    require(arch == "thann", "checkpoint", path, f"holds a {arch} model; the HF export writes THANN language models "
                                                 "(model.arch=thann), whose decoder is HF's Mixtral")
    require(args.normalization == "RMSNorm", "checkpoint", path,
            f"holds a model with model.normalization={args.normalization}; Mixtral's layers use RMSNorm")
    require(not args.get("use_te", False), "checkpoint", path, "holds a model of transformer-engine's layer spec "
            "(model.use_te=true), whose weights are named otherwise; export a model trained with use_te=false")


def read_arrays(path: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """The checkpoint's arrays ``keys``, whole, after checking their chunks against the manifest."""
    manifest = zarr_store.read_manifest(path)
    for key in keys:
        if not os.path.isfile(os.path.join(path, key, "zarr.json")):
            raise zarr_store.CorruptCheckpoint(f"{path}: no array {key!r}, which its model has")
    zarr_store.verify(path, [p for p in manifest if p.partition("/c/")[0] in keys], manifest)
    arrays = {}
    for key in keys:  # read as the checkpoint tools read them (thann/checkpoint/__main__.py)
        array = ts.open(zarr_store._array_spec(path, key)).result()
        bf16 = torch.bfloat16 if array.dtype.name == "bfloat16" else None
        arrays[key] = zarr_store._to_torch(array.read().result(), bf16)
    return arrays


def check_output(out: str, force: bool, run_dir: str) -> None:
    """Refuses (ConfigError naming ``out``) an output that would destroy what the export does not
    own: a directory with files in it without ``force``, or even with it one that holds anything
    but an HF model; a file; the run directory or a place inside it; a place that cannot be written."""
    real = os.path.realpath(out)
    if os.path.commonpath([real, os.path.realpath(run_dir)]) == os.path.realpath(run_dir):
        raise ConfigError("out", out, f"is inside the run directory {run_dir}, which the export reads; write "
                          "it elsewhere")
    if os.path.exists(real):
        require(os.path.isdir(real), "out", out, "is a file; name a directory")
        require(force or not os.listdir(real), "out", out, "exists; pass --force to replace it")
        require(not os.listdir(real) or mapping.is_model_dir(real), "out", out,
                "holds files that are not an HF model directory; --force replaces only an earlier export")
    existing = nearest_existing(os.path.dirname(real))
    require(os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK), "out", out,
            f"cannot be written: {existing} is {'read-only' if os.path.isdir(existing) else 'not a directory'}")


@contextlib.contextmanager
def new_directory(out: str):
    """Yields a temporary directory beside ``out`` that replaces ``out`` when the block completes,
    and is removed if the block fails or is interrupted."""
    temporary, previous = f"{out}.{os.getpid()}.tmp", f"{out}.{os.getpid()}.old"
    os.makedirs(temporary)
    try:
        yield temporary
        if os.path.exists(out):
            os.replace(out, previous)
        os.replace(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        if os.path.exists(previous) and not os.path.exists(out):
            os.replace(previous, out)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def hf_config(args: DictConfig, record: dict, rows: int, dtype: torch.dtype, mixtral: bool):
    from transformers import MixtralConfig

    from thann.export.configuration_thann import ThannConfig

    fields = mapping.config_fields(args, rows, record["seq_length"])
    if mixtral:
        config = MixtralConfig(**fields)
        config.architectures = ["MixtralForCausalLM"]
    else:
        widths = mapping.tokenization_widths(args)
        config = ThannConfig(**fields, tokenization_conv_widths=widths,
                             tokenization_dropout=args.tokenization.dropout if widths else 0.0)
        config.architectures = ["ThannForCausalLM"]
        config.auto_map = AUTO_MAP
    config.dtype = dtype
    return config


def generation_config(tokenizer: Tokenizer, rows: int):
    from transformers import GenerationConfig

    # thann-generate stops at the end-of-document token and at <|im_end|>.
    ends = [tokenizer.eod] + [tokenizer.special_ids[t] for t in CHAT_SPECIAL_TOKENS[1:] if t in tokenizer.special_ids]
    return GenerationConfig(eos_token_id=ends, pad_token_id=tokenizer.eod,
                            suppress_tokens=list(range(tokenizer.vocab_size, rows)) or None)


def export(checkpoint: str, out: str, *, mixtral: bool, force: bool, max_shard_size: int | str = "5GB") -> str:
    """Writes the HF model directory ``out``; returns what it wrote, in one line. Every check
    runs before any work: ConfigError (a bad input), CorruptCheckpoint (a damaged checkpoint)."""
    from huggingface_hub import save_torch_state_dict

    from thann.export.tokenizer import hf_tokenizer

    path, metadata = saved(checkpoint, "checkpoint")
    record = slot_record(metadata)
    args = slot_args(record)
    check_exportable(args, path)
    require(not (mixtral and mapping.tokenization_widths(args)), "--mixtral", True,
            f"{path} holds THANN's learnt tokenization (model.tokenization.enabled=true), which Mixtral lacks; "
            "export without --mixtral (a THANN model with remote code)")
    tokenizer = saved_tokenizer(metadata, None, "checkpoint")
    check_output(out, force, os.path.dirname(os.path.abspath(path)))

    arrays = read_arrays(path, mapping.array_keys(args))
    embedding = arrays[mapping.EMBEDDING]
    rows = embedding.shape[0]
    with new_directory(out) as directory:
        hf_config(args, record, rows, embedding.dtype, mixtral).save_pretrained(directory)
        for name in () if mixtral else REMOTE_CODE:
            shutil.copyfile(os.path.join(HERE, name), os.path.join(directory, name))
        save_torch_state_dict(mapping.to_hf(arrays, args, hub=mixtral), directory, max_shard_size=max_shard_size,
                              metadata={"format": "pt"})
        generation_config(tokenizer, rows).save_pretrained(directory)
        hf_tokenizer(tokenizer, record["seq_length"]).save_pretrained(directory)
    kind = "MixtralForCausalLM (no remote code)" if mixtral else "THANN (trust_remote_code=True)"
    parameters = sum(t.numel() for t in arrays.values())
    return f"wrote {out}: {kind}, {parameters:,} parameters from {path}, tokenizer {tokenizer.model}"
