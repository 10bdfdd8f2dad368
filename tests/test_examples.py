"""Smoke test: examples/mnist_autoencoder.py --quick runs K-FAC and Adam end to end."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mnist_autoencoder_quick(raw_data, tfds_dir):
    raw_data("mnist")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "examples", "mnist_autoencoder.py"),
            "--quick",
            "--verbose",
            "2",
            "--data-dir",
            tfds_dir,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Summary: MNIST autoencoder" in proc.stdout, out[-4000:]
    for name in ("kfac", "adam"):
        row = re.search(
            rf"^{name}\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$",
            proc.stdout,
            re.M,
        )
        assert row, f"no summary row for {name}:\n{proc.stdout[-2000:]}"
        assert int(row.group(1)) == 2  # 512 images, batch 256, 1 epoch
    # Each optimizer's test-loss trace is compared with the other's final loss.
    assert re.search(r"^kfac (reached|did not reach) adam's final test loss", proc.stdout, re.M)
    assert re.search(r"^adam (reached|did not reach) kfac's final test loss", proc.stdout, re.M)
