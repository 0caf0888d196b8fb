"""After ``make bench``: each provider's median as a ratio against the ``hooks`` anchor."""

import torch


def pytest_configure(config):
    torch.manual_seed(0)


FLOORS = ("memory-floor", "floor-fresh-outputs")


def _provider(param: str) -> str:
    # parametrize ids look like "c64s32-hooks-compiled" or "fastdfd-torch" or "batched"
    for name in ("fastdfd-cpp-compiled", "hooks-compiled", "hooks", "fastdfd-torch", "fastdfd-triton", "fastdfd-cpp", "fastdfd-cuda",
                 "python-loop-graph", "python-loop", "vmap", "grouped-eager", "grouped-compiled"):
        if param.endswith(name):
            return name
    return param


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, dict[str, float]] = {}
    for bench in session.benchmarks:
        provider = _provider(bench.param or bench.name)
        if "memory_floor" in bench.name:  # ids like "c64s32-fresh"
            provider = "floor-fresh-outputs" if bench.name.endswith("fresh]") else "memory-floor"
        groups.setdefault(bench.group, {})[provider] = bench.stats.median
    tr = terminalreporter
    tr.write_sep("=", "speed-up against the anchor (median time of anchor / provider; same process, same inputs)")
    for group, times in groups.items():
        anchor = "hooks" if "hooks" in times else ("python-loop" if "python-loop" in times else None)
        if anchor is None:  # a group timed for context only (the distillation step)
            cells = "  ".join(f"{p}: {t * 1e3:.1f} ms" for p, t in times.items())
            tr.write_line(f"{group:<45} {cells}")
            continue
        cells = "  ".join(f"{p}: {times[anchor] / t:5.2f}x" for p, t in times.items() if p not in (anchor, *FLOORS))
        tr.write_line(f"{group:<45} {cells}   (anchor {anchor}: {times[anchor] * 1e3:.2f} ms)")
        if "hooks-compiled" in times and group.startswith("generator step"):  # issue 22's second anchor
            ours = "  ".join(f"{p}: {times['hooks-compiled'] / t:5.2f}x" for p, t in times.items()
                             if p.startswith("fastdfd"))
            tr.write_line(f"{'':<45} against hooks-compiled: {ours}")
    floors = {g: t for g, t in groups.items() if "memory-floor" in t}
    if floors:
        tr.write_sep("-", "time over the memory floor (median / the floor's: a copy and an add into preallocated "
                          "outputs, the fused tap's least traffic)")
        for group, times in floors.items():
            floor = times["memory-floor"]
            cells = "  ".join(f"{p}: {t / floor:5.2f}x" for p, t in times.items() if p != "memory-floor")
            tr.write_line(f"{group:<45} {cells}   (floor: {floor * 1e3:.2f} ms)")
