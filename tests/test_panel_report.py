"""benchmarks/panel.py's report: the per-step comparison that tells a miss by
step cost from a miss by progress per step."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import panel  # noqa: E402


def run(points, final_step=None):
    rows = [{"step": s, "loss": v} for s, v in points]
    return {
        "rows": rows,
        "steps": final_step or rows[-1]["step"],
        "final": {"loss": rows[-1]["loss"]},
    }


def test_value_at_step_interpolates_between_logged_rows():
    rows = run([(1, 10.0), (11, 5.0), (31, 3.0)])["rows"]
    assert panel.value_at_step(rows, "loss", 6) == 7.5
    assert panel.value_at_step(rows, "loss", 21) == 4.0
    assert panel.value_at_step(rows, "loss", 31) == 3.0
    assert panel.value_at_step(rows, "loss", 32) is None  # never took that many steps


def test_per_step_comparison_pairs_seeds_and_names_the_cause():
    best = {
        0: run([(1, 10.0), (101, 2.0), (201, 1.0)]),
        1: run([(1, 10.0), (101, 4.0), (201, 2.0)]),
    }
    # KFAC took 101 steps: seed 0 at 3.0 against the best's 2.0, seed 1 at 3.0 against 4.0.
    kfac = {0: run([(1, 10.0), (101, 3.0)]), 1: run([(1, 10.0), (101, 3.0)])}
    equal = panel.per_step_comparison({"kfac": kfac, "adam": best}, "loss", "kfac", "adam")
    assert equal == {"steps": 101, "kfac": 3.0, "best": 3.0}
    headline = {"diverged": 0, "seeds": 2}
    assert panel.verdict(headline, headline, None, 0.5, equal).endswith(
        "ahead at equal steps: the step cost stops it"
    )
    behind = dict(equal, kfac=3.5)
    assert panel.verdict(headline, headline, 0.8, 0.5, behind) == (
        "misses (<= 0.5); behind at equal steps: progress per step stops it"
    )
    assert panel.verdict(headline, headline, 0.4, 0.5, behind) == "meets (<= 0.5)"
