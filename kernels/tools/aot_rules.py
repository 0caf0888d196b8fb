"""What a compiled kernel configuration must satisfy to pass the ahead-of-time check.

A row is one configuration compiled by :mod:`fastdfd.kernels.tools.aot`: ``ok``/``error`` and the
resources read from its cubin (``reg``, ``stack``, ``local``, ``local_ops``).
"""

from __future__ import annotations

# 255 is the hardware ceiling per thread; a configuration within 15 of it is one compiler
# release away from spilling (a bf16 wgrad went from 179 under Triton 3.9 to 254 under 3.6).
REG_LIMIT = 240

# Spill bytes allowed per arch, none on the card (sm_90). For sm_80 ptxas caps registers at an
# occupancy target (80 or 128 at 8 warps) and spills a few bytes rather than pass it: 8-24 B,
# 2-12 LDL/STL, in 5 configurations under both 3.6 and 3.9. Triton's maxnreg=255 removes them
# at 96-174 registers, i.e. fewer resident blocks; neither side is measured, so sm_80 keeps
# ptxas's trade within this budget and a larger spill still fails.
SPILL_BUDGET = {"sm_80": 32}

RESOURCES = ("reg", "stack", "local", "local_ops")


def violations(row: dict) -> list[str]:
    """Why this configuration fails the check; empty if it passes."""
    if not row.get("ok"):
        return [f"compile error: {row.get('error', '?')}"]
    missing = [k for k in RESOURCES if k not in row]
    if missing:  # an unread cubin must not pass as a clean one
        return [f"resource usage not read ({', '.join(missing)})"]
    why = []
    if row["reg"] > REG_LIMIT:
        why.append(f"{row['reg']} registers > {REG_LIMIT}")
    # spills go to the stack frame; LDL/STL in the SASS catch any other local-memory use
    budget = SPILL_BUDGET.get(row["arch"], 0)
    spill_ok = row["stack"] <= budget and (row["stack"] > 0 or row["local_ops"] == 0)
    if row["local"] or not spill_ok:
        why.append(f"local memory: stack {row['stack']} B (allowed {budget}), local {row['local']} B, "
                   f"{row['local_ops']} local loads/stores (spills)")
    return why


def failures(rows: list[dict]) -> list[str]:
    """One line per failing configuration, naming it."""
    return [f"FAIL {r['arch']} {r['kernel']}: {'; '.join(why)}" for r in rows if (why := violations(r))]
