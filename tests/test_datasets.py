"""keras_kfac.datasets: offline preparation of the standard TFDS MNIST builders.

Uses the real IDX files in ``<repo>/../shared/datasets`` (the ``raw_data``
fixture: skipped if absent, failed under ``CI=true``).
TFDS shuffles examples when it writes a split, so the prepared dataset's order
is not the IDX files' order: the known first labels (MNIST ``5 0 4 1 9``,
Fashion-MNIST ``9 0 0 3 0``) are checked on the raw files and then looked up,
image by image, in the prepared TFDS split.
"""

import gzip
import os

import numpy as np
import pytest

from keras_kfac import datasets

FIRST_LABELS = {"mnist": [5, 0, 4, 1, 9], "fashion_mnist": [9, 0, 0, 3, 0]}


def _read_idx(folder, prefix):
    with gzip.open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz")) as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    with gzip.open(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz")) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)
    return x, y


def _check(name, raw_dir, data_dir):
    for split, prefix, n in (("train", "train", 60000), ("test", "t10k", 10000)):
        x, y = datasets.load_numpy(name, split, data_dir=data_dir, download=False)
        assert x.shape == (n, 28, 28, 1) and x.dtype == np.float32
        assert y.shape == (n,) and y.dtype == np.int64
        assert x.min() == 0.0 and x.max() == 1.0
        assert 0.05 < x.mean() < 0.5
        assert set(np.unique(y)) == set(range(10))

        raw_x, raw_y = _read_idx(raw_dir, prefix)
        np.testing.assert_array_equal(np.bincount(raw_y), np.bincount(y))
        if split == "train":
            assert raw_y[:5].tolist() == FIRST_LABELS[name]
            # The same images carry the same labels in the prepared TFDS split.
            x_u8 = np.rint(x * 255).astype(np.uint8)
            index = {x_u8[i].tobytes(): int(y[i]) for i in range(n)}
            assert [index[raw_x[i].tobytes()] for i in range(5)] == FIRST_LABELS[name]

    # Now prepared: a plain offline tfds.load reads it (standard name/version).
    import tensorflow_datasets as tfds

    builder = tfds.builder(f"{name}:3.0.1", data_dir=data_dir)
    assert builder.is_prepared()
    assert builder.info.splits["train"].num_examples == 60000


def test_mnist_offline(raw_data, tfds_dir):
    _check("mnist", raw_data("mnist"), tfds_dir)


@pytest.mark.slow
def test_fashion_mnist_offline(raw_data, tfds_dir):
    _check("fashion_mnist", raw_data("fashion-mnist"), tfds_dir)


def test_tf_dataset_batches(raw_data, tfds_dir):
    raw_data("mnist")
    ds = datasets.load("mnist", "test", data_dir=tfds_dir, batch_size=1000, download=False)
    x, y = next(iter(ds))
    assert tuple(x.shape) == (1000, 28, 28, 1) and tuple(y.shape) == (1000,)


def test_unknown_name():
    with pytest.raises(ValueError, match="Unsupported"):
        datasets.load_numpy("cifar10")


def test_clear_error_without_data(tmp_path, monkeypatch):
    """No prepared data, no raw files, no download: the message says what to do."""
    monkeypatch.delenv("KERAS_KFAC_DATA", raising=False)
    monkeypatch.setattr(datasets, "_candidate_dirs", lambda *a, **k: [str(tmp_path / "raw")])
    with pytest.raises(datasets.DataNotFoundError) as err:
        datasets.prepare("mnist", data_dir=str(tmp_path / "tfds"), download=False)
    msg = str(err.value)
    assert "KERAS_KFAC_DATA" in msg and "--data-dir" in msg and "train-images" in msg


def test_bad_manual_dir(tmp_path):
    with pytest.raises(datasets.DataNotFoundError, match="manual_dir"):
        datasets.find_raw_dir("mnist", manual_dir=str(tmp_path))


def test_finds_shared_dir_by_walking_up(monkeypatch, tmp_path, raw_data):
    shared = os.path.dirname(raw_data("mnist"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.abspath(datasets.__file__).startswith(repo + os.sep):
        pytest.skip("keras_kfac is not imported from this checkout")
    monkeypatch.delenv("KERAS_KFAC_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # cwd is elsewhere: found from the package location
    found = datasets.find_raw_dir("fashion_mnist")
    assert found is not None and os.path.samefile(found, os.path.join(shared, "fashion-mnist"))
    monkeypatch.setenv("KERAS_KFAC_DATA", shared)
    assert os.path.samefile(datasets.find_raw_dir("mnist"), os.path.join(shared, "mnist"))


def test_offline_download_fails_fast(tmp_path, monkeypatch):
    """With no local data and no network, prepare() fails at once with advice."""
    monkeypatch.delenv("KERAS_KFAC_DATA", raising=False)
    monkeypatch.setattr(datasets, "_candidate_dirs", lambda *a, **k: [str(tmp_path / "raw")])
    monkeypatch.setattr(datasets, "_reachable", lambda url, timeout=5.0: False)
    with pytest.raises(datasets.DataNotFoundError, match="unreachable"):
        datasets.prepare("fashion_mnist", data_dir=str(tmp_path / "tfds"), download=True)


def test_reachable_probe_on_closed_local_port():
    assert datasets._reachable("http://127.0.0.1:9/x.gz", timeout=1.0) is False


def test_never_prepares_next_to_raw_files(tmp_path, monkeypatch):
    """A data_dir holding the raw files (a shared source folder) is not written to."""
    raw = tmp_path / "src" / "mnist"
    raw.mkdir(parents=True)
    for f in datasets.RAW_FILES:
        (raw / f).write_bytes(b"")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "default"))
    calls = []
    monkeypatch.setattr(datasets, "_prepare_from_raw", lambda *a: calls.append(a))
    out = datasets.prepare("mnist", data_dir=str(tmp_path / "src"), download=False)
    assert out == str(tmp_path / "default")
    assert calls == [("mnist", str(raw), str(tmp_path / "default"))]


def test_missing_raw_data_skips_locally_and_fails_under_ci(raw_data, tmp_path, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="absent"):
        raw_data("mnist", root=str(tmp_path))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true requires"):
        raw_data("mnist", root=str(tmp_path))
    (tmp_path / "mnist").mkdir()
    assert raw_data("mnist", root=str(tmp_path)) == str(tmp_path / "mnist")
