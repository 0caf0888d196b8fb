"""benchmarks/real_teacher.py's verdict on issue 19's Lite0 targets (teacher >= 90%, verifier >= 50%, no class
collapsed), from a quality report: each target on its own, and no verdict of "all met" without a verifier."""

import pytest

from benchmarks.real_teacher import targets
from fastdfd.train.quality import QualityReport


def _report(teacher, verifier, effective):
    classes = list(range(len(effective)))
    return QualityReport(n_per_class=8, classes=classes, teacher_top1=teacher, teacher_per_class={},
                         teacher_counts={}, layer_distances={}, kind="kl", verifier_top1=verifier,
                         diversity_per_class={c: {"spread": 0.1, "effective_images": e, "images": 8}
                                              for c, e in zip(classes, effective)})


@pytest.mark.parametrize("teacher, verifier, effective, met", [
    (0.95, 0.60, [2.0, 1.6], {"teacher_top1_at_least_90": True, "verifier_top1_at_least_50": True,
                              "no_class_collapsed": True, "all_met": True}),
    (0.89, 0.60, [2.0, 1.6], {"teacher_top1_at_least_90": False, "verifier_top1_at_least_50": True,
                              "no_class_collapsed": True, "all_met": False}),
    (0.95, 0.49, [2.0, 1.6], {"teacher_top1_at_least_90": True, "verifier_top1_at_least_50": False,
                              "no_class_collapsed": True, "all_met": False}),
    (0.95, 0.60, [2.0, 1.4], {"teacher_top1_at_least_90": True, "verifier_top1_at_least_50": True,
                              "no_class_collapsed": False, "all_met": False}),
    (0.95, None, [2.0, 1.6], {"teacher_top1_at_least_90": True, "no_class_collapsed": True, "all_met": False}),
])
def test_each_target_on_its_own(teacher, verifier, effective, met):
    assert targets(_report(teacher, verifier, effective)) == met
