"""Convert a checkpoint that holds Python objects into one that holds tensors only.

Every command of this project loads checkpoints with ``torch.load(weights_only=True)``: a file
can only give back tensors, numbers, strings and plain containers, so loading it cannot run code.
The checkpoints of the original release load that way. A file saved with other Python objects in
it (a whole model object, a custom class) is refused instead, because unpickling it would execute
whatever code it names.

If you trust such a file (you wrote it, or you got it from its authors over a channel you trust),
this tool loads it ONCE with ``weights_only=False`` (running the code it holds: that is the risk
you accept with --trust-code) and writes a copy that the other commands load safely:

    python tools/convert_checkpoint.py untrusted.pth converted.pth --trust-code

The copy keeps every entry that consists of tensors and plain values ("model", "optimizer",
"lr_scheduler", "epoch", ...); a model object is replaced by its state_dict(); entries that are
neither are dropped and listed. The copy is checked to load with ``weights_only=True``.
"""
import argparse
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from models.checkpoint import CheckpointFileError, load_checkpoint_file  # noqa: E402
from utils.errors import UserError, run_main  # noqa: E402
from utils.fileio import atomic_write_bytes  # noqa: E402


def _weights_only_loadable(obj) -> bool:
    buffer = io.BytesIO()
    try:
        torch.save(obj, buffer)
        buffer.seek(0)
        torch.load(buffer, map_location="cpu", weights_only=True)
    except Exception:  # not picklable at all (an open file), or not loadable without code
        return False
    return True


def plain_copy(obj):
    """(copy of ``obj`` holding tensors and plain values only, names of the dropped entries)."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        if _weights_only_loadable(obj):
            return obj, []
        raise UserError(f"the file holds a {type(obj).__name__}, neither a dict of entries nor a model")
    kept, dropped = {}, []
    for key, value in obj.items():
        if isinstance(value, torch.nn.Module):
            value = value.state_dict()
        if _weights_only_loadable(value):
            kept[key] = value
        else:
            dropped.append(str(key))
    return kept, dropped


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="the checkpoint to convert")
    p.add_argument("dst", help="where to write the copy (must not exist)")
    p.add_argument("--trust-code", action="store_true",
                   help="load SRC with weights_only=False, running any code it holds (required)")
    args = p.parse_args(argv)
    if not os.path.isfile(args.src):
        raise CheckpointFileError(f"checkpoint not found: {args.src}")
    if os.path.exists(args.dst):
        raise UserError(f"{args.dst} exists; give a new file name for the copy")
    if not args.trust_code:
        raise UserError(
            f"loading {args.src} with weights_only=False runs any code the file holds; pass --trust-code "
            f"if you trust where it comes from")
    obj = torch.load(args.src, map_location="cpu", weights_only=False)
    copy, dropped = plain_copy(obj)
    buffer = io.BytesIO()
    torch.save(copy, buffer)
    atomic_write_bytes(args.dst, buffer.getvalue())
    load_checkpoint_file(args.dst)  # the copy loads the safe way
    kept = ", ".join(map(str, copy)) if isinstance(copy, dict) else type(copy).__name__
    print(f"wrote {args.dst} (kept: {kept})" + (f"; dropped: {', '.join(dropped)}" if dropped else ""))


if __name__ == "__main__":
    run_main(main)
