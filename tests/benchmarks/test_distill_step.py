"""benchmarks.distill_step's cases: each a distinct step, whatever the CIFAR-10 benchmark's DISTILL defaults to."""

from dataclasses import replace


def test_every_case_is_its_own_step_whatever_distill_defaults_to():
    from benchmarks.cifar10_datafree import DISTILL
    from benchmarks.distill_step import CASES

    # every case names every field any case names, so a default of DISTILL cannot leak into one case only
    names = set().union(*CASES.values())
    assert all(set(case) == names for case in CASES.values())
    steps = [replace(DISTILL, **case) for case in CASES.values()]
    assert all(a != b for i, a in enumerate(steps) for b in steps[i + 1:])
    # the anchor is the step as it was (fp32 labels from the teacher, a contiguous student); the benchmark's default
    # step is the last (labels in bf16) where the CPU computes in bf16, the one before it (fp32) elsewhere
    from fastdfd.train.bf16 import cpu_computes_bf16

    first = steps[0]
    assert (first.fold_teacher, first.channels_last, first.autocast) == (False, False, False)
    assert DISTILL == (steps[-1] if cpu_computes_bf16() else steps[-2])
