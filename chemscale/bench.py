"""`python -m chemscale.bench chemgpt|ff`: how fast chemscale trains, measured against baselines in the same run.

This module is only the command line: the ChemGPT benchmark is `chemscale.lm.bench`, the
force-field one `chemscale.ff.bench`; each module's docstring says what its figures mean, and
`chemscale.measure` holds what makes both fair. The last line printed is one JSON object with
all the figures; a figure that cannot be true is named on stderr as a warning.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chemscale.bench", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["chemgpt", "ff"],
                        help="chemgpt: language-model training and data; ff: force-field training and xTB labelling")
    parser.add_argument("--quick", action="store_true", help="few steps: checks that it runs, not a measurement")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="chemgpt: measure ChemGPT under bf16 autocast (auto: where the CPU has AVX512-BF16 "
                             "or AMX; on a CPU without them bf16 runs, slowly)")
    parser.add_argument("--json", type=Path, help="also write the JSON result here")
    args = parser.parse_args(argv)
    if args.what == "ff":
        from chemscale.ff.bench import ff_bench

        result = ff_bench(args.quick)
    else:
        from chemscale.lm.bench import chemgpt_bench

        result = chemgpt_bench(args.quick, {"auto": None, "on": True, "off": False}[args.bf16])
    for warning in result.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    line = json.dumps(result, default=float)
    if args.json:
        args.json.write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
