"""make test-zoo: real timm / torchvision teachers under fastdfd.MomentMatcher.

Runs in its own venv (.venv-zoo: torch 2.14.1 + torchvision + timm). The per-case checks
record their outcome here; the terminal summary prints the table, and
``--zoo-report PATH`` (tests_zoo/report.py) writes it as JSON.
"""

import os

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter. It must be
# switched on before triton is first imported (as tests/conftest.py does).
os.environ.setdefault("TRITON_INTERPRET", "1")

import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import zoo  # noqa: E402

# case id -> check name -> "passed" / "failed"; other tests: name -> outcome
OUTCOMES: dict[str, dict[str, str]] = {}
OTHER: dict[str, str] = {}


def pytest_addoption(parser):
    parser.addoption("--zoo-report", default=None, metavar="PATH",
                     help="write the per-case table of tests_zoo as JSON to PATH")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        params = getattr(getattr(item, "callspec", None), "params", {})
        check = item.originalname.removeprefix("test_")
        if "case_id" in params:
            OUTCOMES.setdefault(params["case_id"], {})[check] = report.outcome
        else:
            OTHER[item.name] = report.outcome


def _fmt(v):
    return "-" if v is None else (f"{v:.1e}" if isinstance(v, float) else str(v))


def _rows():
    rows = []
    for case in zoo.CASES:
        checks = OUTCOMES.get(case.id)
        if not checks:
            continue
        try:
            row = zoo.summary(zoo.measure(case.id))
        except Exception as exc:  # the tests already failed with it
            row = {"library": case.library, "name": case.name, "variant": case.variant,
                   "input_shape": list(case.input_shape), "bn_flavours": {}, "bn_layers": None,
                   "matcher_layers": None, "tolerance_rel": case.rtol, "logit_rel_err": None,
                   "input_grad_rel_err": None, "loss_rel_err": None, "error": f"{type(exc).__name__}: {exc}"}
        if "float64_exact" in checks:
            try:
                r64 = zoo.measure64(case.id)
                row["float64_logit_rel_err"], row["float64_input_grad_rel_err"] = r64["logit"], r64["grad"]
            except Exception as exc:
                row["float64_error"] = f"{type(exc).__name__}: {exc}"
        row["checks"] = dict(sorted(checks.items()))
        row["pass"] = all(v == "passed" for v in checks.values())
        rows.append(row)
    return rows


def _versions():
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "timm", "fastdfd"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    try:
        from fastdfd.backends import resolve

        out["fastdfd_backend_cpu"] = resolve("moment_tap", torch.empty(1))[0]
    except Exception as exc:  # pragma: no cover - informative only
        out["fastdfd_backend_cpu"] = f"? ({exc})"
    try:
        def git(*args):
            return subprocess.run(["git", *args], capture_output=True, text=True,
                                  cwd=Path(__file__).parent, timeout=10).stdout.strip()

        dirty = git("status", "--porcelain", "--", "fastdfd", "kernels", "csrc")
        out["fastdfd_commit"] = (git("rev-parse", "--short", "HEAD") or "?") + ("+uncommitted" if dirty else "")
    except Exception:
        out["fastdfd_commit"] = None
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = _rows()
    if not rows:
        return
    tr = terminalreporter
    tr.section("zoo: tapped vs untapped teacher (rel err = max|a-b| / max|ref|)")
    tr.write_line("floor: the untapped run with each BN input perturbed by one fp32 rounding; "
                  "f64: the case in float64")
    tr.write_line(f"{'case':58s} {'tol':>7s} {'logits':>8s} {'in-grad':>8s} {'loss':>8s} {'floor-lg':>8s} "
                  f"{'floor-gr':>8s} {'f64-lg':>8s} {'f64-gr':>8s} {'layers':>7s}  result  BN flavours")
    for r in rows:
        cid = f"{r['library']}:{r['name']}" + ("" if r["variant"] == "eval fp32" else f" [{r['variant']}]")
        layers = f"{_fmt(r['matcher_layers'])}/{r['bn_layers']}"
        failed = [k for k, v in r["checks"].items() if v != "passed"]
        result = "PASS" if r["pass"] else "FAIL(" + ",".join(failed) + ")"
        fl = ", ".join(f"{k.split('.', 1)[1]} x{n}" for k, n in r["bn_flavours"].items())
        tr.write_line(f"{cid:58s} {r['tolerance_rel']:7.1e} {_fmt(r['logit_rel_err']):>8s} "
                      f"{_fmt(r['input_grad_rel_err']):>8s} {_fmt(r['loss_rel_err']):>8s} "
                      f"{_fmt(r.get('floor_logit_rel_err')):>8s} {_fmt(r.get('floor_input_grad_rel_err')):>8s} "
                      f"{_fmt(r.get('float64_logit_rel_err')):>8s} {_fmt(r.get('float64_input_grad_rel_err')):>8s} "
                      f"{layers:>7s}  {result}  {fl}")
        if r.get("autocast_logit_rel_err_vs_fp32"):
            a = r["autocast_logit_rel_err_vs_fp32"]
            tr.write_line(f"{'':10s}logits against the untapped fp32 run: untapped {a['untapped']:.1e}, tapped {a['tapped']:.1e}")
        if r["error"]:
            tr.write_line(f"{'':10s}error: {r['error'][:300]}")
    path = config.getoption("--zoo-report")
    if path:
        doc = {
            "what": "fastdfd.MomentMatcher on timm / torchvision teachers: tapped vs untapped run "
                    "(random weights, random plausible BN statistics; see tests_zoo/zoo.py)",
            "date": datetime.date.today().isoformat(),
            "machine": f"CPU, {os.cpu_count()} cores, no GPU",
            "versions": _versions(),
            "rel_err": "max |tapped - untapped| / max |untapped| (logits, input gradient of a fixed "
                       "random projection of the logits); loss against a float64 forward-hook reference",
            "noise_floor": "floor_*: the untapped run again with the input of every BN-like layer times "
                           "(1 + u * N(0, 1)), u = 2^-24 (fp32 unit roundoff), handed on in fp32 (under autocast "
                           "the next op rounds it): how far a BN computed in fp32 by a formula not bit-identical "
                           "to torch's moves this teacher (one sample); reported, not asserted",
            "tolerances": {"fp32": zoo.FP32_RTOL, "float64": zoo.FP64_RTOL, "autocast": {str(k): v for k, v in zoo.AUTOCAST_RTOL.items()},
                           "loss_vs_float64_reference": zoo.LOSS_RTOL},
            "rows": rows,
            "other_tests": OTHER,
            "passed": sum(r["pass"] for r in rows),
            "failed": sum(not r["pass"] for r in rows),
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(doc, indent=1) + "\n")
        tr.write_line(f"zoo table written to {path}")
