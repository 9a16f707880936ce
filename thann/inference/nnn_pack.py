"""python -m thann.inference.nnn_pack CHECKPOINT OUT.safetensors: a trained NNN checkpoint (a
run or iter_* directory, zarr, any layout) -> its packed-ternary export (thann.models.nnn.pack),
which generate_thann.py loads with ``load=OUT.safetensors``; prints the sizes."""

import argparse
import os
from types import SimpleNamespace

from omegaconf import OmegaConf

from thann.data.tokenizer import padded_vocab_size
from thann.inference.loading import checkpoint_path, load_weights, saved_config, saved_run, saved_tokenizer
from thann.models.nnn.bitlinear import BitLinear
from thann.models.nnn.model import NNNModel, nnn_transformer_config
from thann.models.nnn.pack import export_packed
from thann.parallel import state


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m thann.inference.nnn_pack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    try:
        path = checkpoint_path(args.checkpoint)
        metadata = saved_run(path)
        tokenizer = saved_tokenizer(metadata, None, "checkpoint")
    except ValueError as e:  # ConfigError: one line naming the problem
        raise SystemExit(str(e)) from None
    saved = saved_config(metadata)
    if saved.model.get("arch") != "nnn":
        raise SystemExit(f"{path}: holds a {saved.model.get('arch', 'thann')} model, not an NNN")
    single = SimpleNamespace(tp=1, pp=1, ep=1, etp=1, sp=False)
    state.initialize(OmegaConf.create(vars(single)), dp=1, seed=0)
    model = NNNModel(nnn_transformer_config(saved.model, single, bf16=False), saved.model,
                     padded_vocab_size(tokenizer.vocab_size, 1))
    load_weights([model], path)
    export_packed(model, args.out, tokenizer.identity)
    fp32 = sum(t.numel() * 4 for t in model.state_dict().values())
    bit = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, BitLinear))
    size = os.path.getsize(args.out)
    print(f"wrote {args.out}: {size / 2**20:.1f} MiB ({size / fp32:.0%} of the {fp32 / 2**20:.1f} MiB fp32 weights; "
          f"the BitLinear weights, {bit / 2**20:.1f} MiB in fp32, take 2 bits each)")
    state.destroy()


if __name__ == "__main__":
    main()
