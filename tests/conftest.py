"""Fixtures shared by the test files."""

import os

import pytest

SHARED_DATASETS = os.path.abspath(
    os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "shared", "datasets")
)


def _under_ci():
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture
def raw_data():
    """``raw_data("mnist")`` (or ``"fashion-mnist"``): the folder of raw IDX
    files under ``../shared/datasets``. When it is absent the test is skipped,
    except under ``CI=true``, where it fails: a CI run that silently skipped
    every data test would be green while testing none of the data path."""

    def locate(name, root=SHARED_DATASETS):
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
        message = f"raw {name} IDX files not found: {path} is absent"
        if _under_ci():
            pytest.fail(
                f"{message}. CI=true requires the data-dependent tests: put the raw files there "
                "(see README, Data) or unset CI to skip them.",
                pytrace=False,
            )
        pytest.skip(message)

    return locate


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """One TFDS data_dir per session (test_datasets, test_examples, test_callbacks),
    so each dataset is prepared once."""
    return str(tmp_path_factory.getbasetemp() / "keras_kfac_tfds")
