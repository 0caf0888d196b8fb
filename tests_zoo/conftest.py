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
        r64 = None
        try:
            r64 = zoo.measure64(case.id)
        except Exception as exc:  # test_float64_exact / the rule tests already failed with it
            float64_error = f"{type(exc).__name__}: {exc}"
        else:
            float64_error = None
        try:
            row = zoo.summary(zoo.measure(case.id), r64)
        except Exception as exc:  # the tests already failed with it
            row = {"library": case.library, "name": case.name, "variant": case.variant,
                   "input_shape": list(case.input_shape), "bn_flavours": {}, "bn_layers": None,
                   "matcher_layers": None, "error": f"{type(exc).__name__}: {exc}"}
        row["float64_error"] = float64_error
        row["checks"] = dict(sorted(checks.items()))
        # a skipped check (test_float64_exact under autocast) is not a failure
        row["pass"] = all(v in ("passed", "skipped") for v in checks.values())
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
        from fastdfd.ops.dispatch import resolve

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


COLUMNS = [
    # header, width, row key
    ("f64-lg", 7, "float64_logit_rel_err"), ("f64-gr", 7, "float64_input_grad_rel_err"),
    ("lg-tap", 7, "logit_norm_err_tapped_vs_ref64"), ("lg-untap", 8, "logit_norm_err_untapped_vs_ref64"),
    ("gr-tap", 7, "input_grad_norm_err_tapped_vs_ref64"), ("gr-untap", 8, "input_grad_norm_err_untapped_vs_ref64"),
    ("el-lg", 7, "logit_rel_err"), ("el-gr", 7, "input_grad_rel_err"),
    ("floor-lg", 8, "floor_logit_rel_err"), ("floor-gr", 8, "floor_input_grad_rel_err"),
]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = _rows()
    if not rows:
        return
    tr = terminalreporter
    tr.section("zoo: tapped vs untapped teacher")
    tr.write_line("f64-lg/gr: float64 tapped vs untapped, max|a-b|/max|b| (asserted <= 1e-10; '-': autocast, skipped)")
    tr.write_line("lg/gr-tap, -untap: fp32 (autocast) run vs the float64 untapped reference, norm-wise "
                  "||a-ref64||/||ref64|| (asserted: tap <= 2 x max(untap, floor) + atol)")
    tr.write_line("el-lg/gr: elementwise max|tapped-untapped|/max|untapped| in fp32 (autocast); 'el<=1e-5': within "
                  "1e-5 elementwise (autocast: the dtype's tolerance), reported, not asserted; floor: the untapped "
                  "run with each BN input perturbed by one fp32 rounding, same measure as el (the first sample; "
                  "the rule draws 16 more where the tapped run is outside the first's bound)")
    header = " ".join(f"{h:>{w}s}" for h, w, _ in COLUMNS)
    tr.write_line(f"{'case':58s} {header} {'el<=1e-5':>8s} {'layers':>7s}  result  BN flavours")
    for r in rows:
        cid = f"{r['library']}:{r['name']}" + ("" if r["variant"] == "eval fp32" else f" [{r['variant']}]")
        layers = f"{_fmt(r.get('matcher_layers'))}/{_fmt(r.get('bn_layers'))}"
        failed = [k for k, v in r["checks"].items() if v not in ("passed", "skipped")]
        result = "PASS" if r["pass"] else "FAIL(" + ",".join(failed) + ")"
        fl = ", ".join(f"{k.split('.', 1)[1]} x{n}" for k, n in r["bn_flavours"].items())
        cells = " ".join(f"{_fmt(r.get(key)):>{w}s}" for _, w, key in COLUMNS)
        within = {True: "yes", False: "no", None: "-"}[r.get("within_elementwise")]
        tr.write_line(f"{cid:58s} {cells} {within:>8s} {layers:>7s}  {result}  {fl}")
        if r.get("autocast_logit_rel_err_vs_fp32"):
            a = r["autocast_logit_rel_err_vs_fp32"]
            tr.write_line(f"{'':10s}logits against the untapped fp32 run: untapped {a['untapped']:.1e}, tapped {a['tapped']:.1e}")
        for key in ("error", "float64_error"):
            if r.get(key):
                tr.write_line(f"{'':10s}{key}: {r[key][:300]}")
    n_strict = sum(r.get("within_elementwise") is True for r in rows)
    n_strict32 = sum(r.get("within_elementwise") is True for r in rows if "autocast" not in r["variant"])
    n32 = sum("autocast" not in r["variant"] for r in rows)
    tr.write_line(f"passed {sum(r['pass'] for r in rows)}/{len(rows)} cases; strict elementwise target met by "
                  f"{n_strict32}/{n32} fp32 cases ({n_strict}/{len(rows)} with autocast at its dtype tolerance)")
    path = config.getoption("--zoo-report")
    if path:
        doc = {
            "what": "fastdfd.MomentMatcher on timm / torchvision teachers: tapped vs untapped run "
                    "(random weights, random plausible BN statistics; see tests_zoo/zoo.py)",
            "date": datetime.date.today().isoformat(),
            "machine": f"CPU, {os.cpu_count()} cores, no GPU",
            "versions": _versions(),
            "criteria": {
                "float64": "float64_*: model, statistics and input in float64, tapped vs untapped: "
                           "max |a - b| / max |b| of the logits, the input gradient and (train mode) the running "
                           "statistics after the run; asserted <= float64 tolerance (not run under autocast)",
                "rule": "*_norm_err_{tapped,untapped}_vs_ref64: the fp32 (autocast) run against the untapped "
                        "teacher in float64 (ref64; under autocast: without autocast), ||a - ref64||_2 / "
                        "||ref64||_2 over the whole tensor; asserted: tapped <= rule_factor x max(untapped, *_rule_floor) + "
                        "rule_atol (*_rule_bound, *_rule_ok); *_rule_floor: the largest floor error of the "
                        "*_floor_samples drawn (see noise_floor)",
                "elementwise": "logit_rel_err / input_grad_rel_err: max |tapped - untapped| / max |untapped| in fp32 "
                               "(autocast: in the autocast dtype); within_elementwise: |a - b| <= tol (|b| + max |b|) "
                               "everywhere for both, tol = elementwise_tol (1e-5 fp32, the dtype's under autocast); "
                               "the strict target, reported, not asserted",
                "input_gradient": "gradient w.r.t. the input of a fixed random projection of the logits (the same "
                                  "projection in every run)",
                "loss": "loss_rel_err: m.loss() against a float64 forward-hook reference",
            },
            "noise_floor": "floor_*: the untapped run again with the input of every BN-like layer times "
                           "(1 + u * N(0, 1)), u = 2^-24 (fp32 unit roundoff), handed on in fp32 (under autocast "
                           "the next op rounds it): how far a BN computed in fp32 by a formula not bit-identical "
                           "to torch's moves this teacher (the first sample, seed 4); floor_*_rel_err against the "
                           "untapped run (elementwise, as *_rel_err), floor_*_norm_err_vs_ref64 against ref64 (as "
                           "the rule). The rule's bound takes the floor where it exceeds the untapped run's error; "
                           "where the first sample leaves the tapped run outside it, 16 more are drawn and the "
                           "largest error is the floor (*_floor_samples: how many)",
            "tolerances": {"float64": zoo.FP64_RTOL, "rule_factor": zoo.RULE_FACTOR,
                           "rule_atol_fp32": zoo.FP32_RULE_ATOL,
                           "rule_atol_autocast": {str(k): v for k, v in zoo.AUTOCAST_RULE_ATOL.items()},
                           "elementwise_fp32": zoo.FP32_RTOL,
                           "elementwise_autocast": {str(k): v for k, v in zoo.AUTOCAST_RTOL.items()},
                           "loss_vs_float64_reference": zoo.LOSS_RTOL},
            "rows": rows,
            "other_tests": OTHER,
            "passed": sum(r["pass"] for r in rows),
            "failed": sum(not r["pass"] for r in rows),
            "strict_elementwise_1e-5_met_fp32": f"{n_strict32}/{n32}",
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(doc, indent=1) + "\n")
        tr.write_line(f"zoo table written to {path}")
