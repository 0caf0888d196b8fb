"""The ahead-of-time check catches planted errors, under every Triton installed.

`make test` has the environment's Triton only; `make test-triton` installs Triton 3.6.0
beside it (.triton/3.6.0) and runs this file again, so each planted error is caught under
both versions. No GPU: the kernels are compiled for sm_90, never launched.
"""

import textwrap

import pytest

from fastdfd.kernels.tools.aot_rules import REG_LIMIT, SPILL_BUDGET, failures, violations

from ..conftest import require_triton

PLANTED = textwrap.dedent('''
    import triton
    import triton.language as tl


    @triton.jit
    def _copy(x_ptr, y_ptr, N, BLOCK: tl.constexpr, COLS: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < N), mask=offs < N)


    @triton.jit
    def _type_error(x_ptr, y_ptr, N, BLOCK: tl.constexpr, COLS: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs * 0.5))  # a float offset into a pointer


    @triton.jit
    def _register_hog(x_ptr, y_ptr, N, BLOCK: tl.constexpr, COLS: tl.constexpr):
        # a [BLOCK, COLS] fp32 tile carried through a loop: BLOCK * COLS / 32 values a thread in one warp
        rows = tl.arange(0, BLOCK)
        cols = tl.arange(0, COLS)
        acc = tl.zeros((BLOCK, COLS), dtype=tl.float32)
        for i in range(N):
            acc = acc * tl.load(x_ptr + i * BLOCK + rows)[:, None] + tl.load(x_ptr + i * COLS + cols)[None, :]
        tl.store(y_ptr + rows[:, None] * COLS + cols[None, :], acc)


    SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "N": "i32"}
    JOBS = [
        ("planted copy", _copy, SIG, {"BLOCK": 128, "COLS": 1}, 4),
        ("planted type_error", _type_error, SIG, {"BLOCK": 128, "COLS": 1}, 4),
        ("planted hog 64x128", _register_hog, SIG, {"BLOCK": 64, "COLS": 128}, 1),  # 256 values > 255 registers
    ]
''')


def _tritons():
    try:
        from fastdfd.kernels.tools.aot_versions import installed
    except ImportError:  # no triton in this environment
        return []
    return installed()


@pytest.mark.parametrize("triton_dir", _tritons())
def test_planted_errors_fail_the_check_naming_the_configuration(triton_dir, tmp_path, monkeypatch):
    require_triton()
    from fastdfd.kernels.tools.aot_versions import run_one

    (tmp_path / "planted_aot.py").write_text(PLANTED)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the check's process imports the planted jobs from here
    rc, rows, out = run_one(triton_dir, [90], ["--jobs", "planted_aot:JOBS"])
    print(out)
    assert rc == 1, out
    fail = {ln.split(":")[0] for ln in out.splitlines() if ln.startswith("FAIL")}
    assert fail == {"FAIL sm_90 planted type_error", "FAIL sm_90 planted hog 64x128"}, out
    assert "compile error: CompilationError" in out
    hog = next(r for r in rows if r["kernel"] == "planted hog 64x128")
    assert hog["stack"] > 0 and hog["local_ops"] > 0, hog  # the spill is seen both in the frame and the SASS
    copy = next(r for r in rows if r["kernel"] == "planted copy")
    assert copy["ok"] and not violations(copy), copy  # a clean kernel passes: the check is not failing everything


def _row(**kw):
    return {"arch": "sm_90", "kernel": "k", "ok": True, "reg": 100, "stack": 0, "local": 0, "local_ops": 0, **kw}



@pytest.mark.parametrize("row, why", [
    (_row(reg=REG_LIMIT), None),
    (_row(reg=REG_LIMIT + 1), f"{REG_LIMIT + 1} registers > {REG_LIMIT}"),
    (_row(stack=16, local_ops=4), "stack 16 B"),
    (_row(local=8), "local 8 B"),
    (_row(local_ops=1), "1 local loads/stores"),
    (_row(arch="sm_80", stack=SPILL_BUDGET["sm_80"], local_ops=4), None),  # ptxas's occupancy trade on sm_80
    (_row(arch="sm_80", stack=SPILL_BUDGET["sm_80"] + 8, local_ops=4), "stack 40 B (allowed 32)"),
    (_row(arch="sm_80", local_ops=2), "2 local loads/stores"),  # local accesses without a frame
    ({"arch": "sm_90", "kernel": "k", "ok": True, "reg": 10}, "resource usage not read"),
    ({"arch": "sm_90", "kernel": "k", "ok": False, "error": "CompilationError: x"}, "compile error"),
])
def test_each_rule_alone(row, why):
    lines = failures([row])
    if why is None:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith(f"FAIL {row['arch']} k:") and why in lines[0], lines
