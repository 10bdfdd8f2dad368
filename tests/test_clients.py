"""Two keras-io client programs (examples/keras_io/) run end to end with KFAC() in --quick mode."""

import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from clients import _last_error_line, run_program, verdict  # noqa: E402

SHARED_MNIST = os.path.join(ROOT, os.pardir, "shared", "datasets", "mnist")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist_convnet", "tfdata_mnist"])
def test_client_program_runs_with_kfac(name):
    if not os.path.isdir(SHARED_MNIST):
        pytest.skip(f"raw MNIST files not found: {os.path.abspath(SHARED_MNIST)} is absent")
    result = run_program(name, "kfac", quick=True, timeout=300)
    assert result["error"] is None, "\n".join(result.get("log_tail", [])) or result["error"]
    assert result["optimizer"] == "kfac" and result["quick"]
    assert math.isfinite(result["loss"]) and result["loss"] > 0
    assert math.isfinite(result["metric"])


def _run(metric, loss, higher=True):
    return {"metric": metric, "loss": loss, "higher_is_better": higher, "error": None}


def test_verdict_rule():
    own_acc, own_loss = _run(0.950, 0.20), _run(3.00, 3.0, higher=False)
    assert verdict(own_acc, _run(0.946, 0.20)) == "yes"  # within half a point
    assert verdict(own_acc, _run(0.944, 0.20)) == "no"
    assert verdict(own_loss, _run(3.01, 3.0, higher=False)) == "yes"  # within 0.5 %
    assert verdict(own_loss, _run(3.02, 3.0, higher=False)) == "no"
    # A good metric after a blown-up training loss is not "equal or better".
    assert verdict(own_acc, _run(0.960, 0.41)).startswith("no (training loss")
    assert verdict(own_acc, _run(float("nan"), 0.1)) == "no (not finite)"
    assert verdict(own_acc, {"error": "ValueError: x"}) == "no (error)"
    assert verdict({"error": "ValueError: x"}, _run(0.9, 0.2)) == ""


def test_last_error_line_is_the_exception():
    log = (
        'Traceback (most recent call last):\n  File "x.py", line 1\n'
        "ValueError: KFAC could not find the model\nI0000 some log line\n"
    )
    assert _last_error_line(log) == "ValueError: KFAC could not find the model"
    assert _last_error_line("just output\n") == "just output"
