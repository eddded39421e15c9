"""The 70B phases run what this checkout's `qdora train` has: the planner's fitting flags, filtered."""

from __future__ import annotations

from benchmarks.gpu.big_phase import fitting_flags
from benchmarks.gpu.big_train import PLAN_MODES, plan_settings, train_flags
from benchmarks.gpu.common import Phase


def test_fitting_flags_are_the_planners_and_known_to_train(tmp_path):
    phase = Phase("70b-2ranks", tmp_path, dry_run=False)
    flags = fitting_flags(phase)
    help_text = train_flags()
    assert all(f in help_text for f in flags[::2])
    suggested = phase.data.get("planner_flags", "").split()
    assert all(f in suggested for f in flags)  # nothing invented beyond the planner's suggestion
    assert "--offload" not in suggested or suggested[suggested.index("--offload") + 1] not in ("params", "all")


def test_plan_settings_follow_the_flags_given():
    got = plan_settings(["--offload", "activations"])
    help_text = train_flags()
    for key, without in PLAN_MODES.items():
        flag = "--" + key.replace("_", "-")
        assert got.get(key) == (None if flag in help_text else without)
