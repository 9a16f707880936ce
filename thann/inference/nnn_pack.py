"""python -m thann.inference.nnn_pack CHECKPOINT OUT.safetensors [--force]: a trained NNN
checkpoint (a run or iter_* directory, zarr, any layout) -> its packed-ternary export
(thann.models.nnn.pack), which generate_thann.py loads with ``load=OUT.safetensors``; prints the
sizes. A bad checkpoint or OUT (thann.outputs) is one line with exit code 2, before the model is
loaded."""

import argparse
import os

from megatron.core.utils import unwrap_model
from omegaconf import OmegaConf

from thann.cli import exit_on_bad_input
from thann.config import require
from thann.inference.load import build_from_checkpoint, saved, saved_tokenizer, slot_record
from thann.models.nnn.bitlinear import BitLinear
from thann.models.nnn.pack import export_packed
from thann.outputs import atomic_write, check_output
from thann.parallel import state


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m thann.inference.nnn_pack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    args = parser.parse_args(argv)

    def prepare():
        path, metadata = saved(args.checkpoint, "checkpoint")
        check_output(args.out, force=args.force, inputs={"checkpoint": path}, field="out", force_flag="--force")
        tokenizer = saved_tokenizer(metadata, None, "checkpoint")
        record = slot_record(metadata)
        arch = record["args"].get("arch", "thann")
        require(arch == "nnn", "checkpoint", path, f"holds a {arch} model, not an NNN")
        return path, record, tokenizer

    path, record, tokenizer = exit_on_bad_input(prepare)
    single = OmegaConf.create({"tp": 1, "pp": 1, "ep": 1, "etp": 1, "sp": False, "distributed_optimizer": False})
    state.initialize(single, dp=1, seed=0)
    model = unwrap_model(build_from_checkpoint(path, record, single, precision="fp32")[0])
    with atomic_write(args.out) as temporary:
        export_packed(model, temporary, tokenizer.identity)
    fp32 = sum(t.numel() * 4 for t in model.state_dict().values())
    bit = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, BitLinear))
    size = os.path.getsize(args.out)
    print(f"wrote {args.out}: {size / 2**20:.1f} MiB ({size / fp32:.0%} of the {fp32 / 2**20:.1f} MiB fp32 weights; "
          f"the BitLinear weights, {bit / 2**20:.1f} MiB in fp32, take 2 bits each)")
    state.destroy()


if __name__ == "__main__":
    main()
