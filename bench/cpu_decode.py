"""CPU benchmark: prefill and decode tokens/s of onnxruntime, our PyTorch model and transformers eager.

    python bench/cpu_decode.py                                  # small preset, contexts 128 1024 4096, batch 1 8
    python bench/cpu_decode.py --contexts 128 1024 --batches 1 --work /tmp/dsv3c-bench --out cpu.json

The same as `dsv3c bench` (see `dsv3c bench --help` for every option): a random checkpoint of the preset
is written and exported under --work (reused next time), every runtime runs the same weights side by
side, and the rows are printed as a table, saved as JSON (--out) and plotted beside it (matplotlib).
"""

from __future__ import annotations

import argparse
import sys

from _bootstrap import import_dsv3c


def main() -> int:
    import_dsv3c()
    from dsv3c.cli import cmd_bench
    from dsv3c.errors import UserError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cmd_bench.add_arguments(parser)
    args = parser.parse_args()
    try:
        return cmd_bench.run(args)
    except UserError as e:
        print(f"cpu_decode: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
