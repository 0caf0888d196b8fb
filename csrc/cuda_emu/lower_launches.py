"""Lower a .cu file's launch chevrons for the CPU emulation (cuda_emu.h); nothing else changes.

`k<<<grid, block, smem, stream>>>(args)` is not C++; nvcc's front end lowers it to a
configure-and-call of the runtime, and this does the same textually:
`::cuda_emu::launch(k, grid, block, smem, stream)(args)`. Every other line of the source
compiles unchanged, and a `#line` keeps diagnostics and sanitizer reports on the .cu's lines.

    python csrc/cuda_emu/lower_launches.py in.cu out.cpp
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# kernel name (optionally qualified, optionally one level of template arguments), then the chevrons
LAUNCH = re.compile(r"((?:::)?[A-Za-z_][\w:]*(?:\s*<[^<>;(){}]*>)?)\s*<<<(.*?)>>>", re.S)


def lower(source: str, path: str) -> str:
    lowered, count = LAUNCH.subn(lambda m: f"::cuda_emu::launch({m[1]}, {m[2]})", source)
    if count == 0:
        raise ValueError(f"{path}: no kernel launch found")
    if "<<<" in lowered or ">>>" in lowered:
        raise ValueError(f"{path}: a launch the lowering does not understand is left")
    return f'#line 1 "{path}"\n{lowered}'


def main(argv: list[str]) -> int:
    src, dst = Path(argv[1]), Path(argv[2])
    dst.write_text(lower(src.read_text(), str(src.resolve())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
