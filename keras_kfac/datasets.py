"""MNIST / Fashion-MNIST loading for the examples and benchmarks.

Data is served through the standard TensorFlow Datasets builders
(``mnist/3.0.1`` and ``fashion_mnist/3.0.1``), found or made in this order:

1. The TFDS dataset is already prepared in ``data_dir`` (default
   ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``): it is read with
   ``tfds.load(..., download=False)``.
2. The four raw IDX files (``train-images-idx3-ubyte.gz``, ...) are found
   locally: the TFDS dataset is prepared from them, offline, in ``data_dir``.
   They are looked for in ``manual_dir``, then ``$KERAS_KFAC_DATA``, then
   ``data_dir`` itself, then a ``shared/datasets/<name-with-dash>`` folder
   found by walking up from the current directory and from this file.
   Each location may hold the files directly or in a ``<name-with-dash>``
   (or ``<name>``) subfolder.
3. Otherwise TFDS downloads them (needs network access).

``tensorflow_datasets`` (and TensorFlow) are imported lazily inside the
functions so that ``import keras_kfac`` stays fast.
"""

from __future__ import annotations

import logging
import os
import socket
import urllib.parse

__all__ = [
    "DataNotFoundError",
    "SUPPORTED",
    "default_data_dir",
    "find_raw_dir",
    "prepare",
    "load",
    "load_numpy",
]

log = logging.getLogger(__name__)

#: Supported dataset names and the TFDS version that is prepared/loaded.
SUPPORTED = ("mnist", "fashion_mnist")
VERSION = "3.0.1"

RAW_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

ENV_VAR = "KERAS_KFAC_DATA"


class DataNotFoundError(RuntimeError):
    """Raised when a dataset is neither prepared, nor found raw, nor downloadable."""


# --------------------------------------------------------------------------
# Locating files
# --------------------------------------------------------------------------


def _check_name(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    if key not in SUPPORTED:
        raise ValueError(f"Unsupported dataset {name!r}: expected one of {', '.join(SUPPORTED)}.")
    return key


def _dashed(name: str) -> str:
    return name.replace("_", "-")


def default_data_dir() -> str:
    """TFDS's default ``data_dir``: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(
        os.path.expanduser("~"), "tensorflow_datasets"
    )


def _has_raw(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, f)) for f in RAW_FILES)


def _expand(base: str, name: str) -> list[str]:
    """A location may hold the files directly or in a per-dataset subfolder."""
    base = os.path.abspath(os.path.expanduser(str(base)))
    return [base, os.path.join(base, _dashed(name)), os.path.join(base, name)]


def _walk_up(start: str):
    cur = os.path.abspath(start)
    while True:
        yield cur
        parent = os.path.dirname(cur)
        if parent == cur:
            return
        cur = parent


def _candidate_dirs(name: str, manual_dir=None, data_dir=None) -> list[str]:
    cands: list[str] = []
    if manual_dir:
        cands += _expand(manual_dir, name)
    env = os.environ.get(ENV_VAR)
    if env:
        cands += _expand(env, name)
    if data_dir:
        cands += _expand(data_dir, name)
    starts = []
    try:
        starts.append(os.getcwd())
    except OSError:  # cwd deleted
        pass
    starts.append(os.path.dirname(os.path.abspath(__file__)))
    for start in starts:
        for d in _walk_up(start):
            cands.append(os.path.join(d, "shared", "datasets", _dashed(name)))
    seen, out = set(), []
    for c in cands:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def find_raw_dir(name: str, manual_dir=None, data_dir=None) -> str | None:
    """Return the first folder holding the four raw IDX ``.gz`` files of ``name``.

    Raises ``DataNotFoundError`` if an explicit ``manual_dir`` was given but
    holds no such files (a typo should not silently fall through).
    """
    name = _check_name(name)
    if manual_dir:
        for c in _expand(manual_dir, name):
            if _has_raw(c):
                return c
        raise DataNotFoundError(
            f"manual_dir={manual_dir!r} does not contain the raw {name} files "
            f"{', '.join(RAW_FILES)} (directly or in a '{_dashed(name)}' subfolder)."
        )
    for c in _candidate_dirs(name, None, data_dir):
        if _has_raw(c):
            return c
    return None


def _writable(path: str) -> bool:
    """Whether ``path`` (or its nearest existing parent) may be written to.

    Also honours the permission bits: root passes ``os.access`` even on a
    folder marked read-only (``r-x``), which we still treat as read-only.
    """
    path = os.path.abspath(os.path.expanduser(path))
    for d in _walk_up(path):
        if os.path.exists(d):
            return (
                os.path.isdir(d)
                and os.access(d, os.W_OK | os.X_OK)
                and bool(os.stat(d).st_mode & 0o222)
            )
    return False


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _not_found_message(name: str, data_dir: str, searched: list[str], why: str) -> str:
    d = _dashed(name)
    return (
        f"Could not load dataset {name!r}.\n"
        f"  - no prepared TFDS dataset at {os.path.join(data_dir, name, VERSION)}\n"
        f"  - raw IDX files ({', '.join(RAW_FILES)}) not found in any of:\n"
        + "".join(f"      {s}\n" for s in searched)
        + f"  - {why}\n"
        f"To fix, put the four files in a folder DIR (or DIR/{d}) and either pass "
        f"manual_dir=DIR (examples: --data-dir DIR), set {ENV_VAR}=DIR, or place "
        f"them in shared/datasets/{d}/ next to the repository; or run once with "
        f"network access so TFDS can download them into {data_dir}."
    )


# --------------------------------------------------------------------------
# Preparing
# --------------------------------------------------------------------------


def _offline_builder(name: str, raw_dir: str, data_dir: str):
    """Stock TFDS builder whose registered checksums are those of ``raw_dir``'s files.

    The local files hold the same images as the original downloads but their
    gzip headers (hence sha256) may differ, so only ``url_infos`` is swapped;
    everything else (features, splits, version, on-disk format) is the
    standard ``<name>/3.0.1``.
    """
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import checksums

    base_cls = tfds.builder_cls(name)
    stock = base_cls.url_infos or {}
    if not stock:
        raise DataNotFoundError(f"TFDS has no registered URLs for {name!r}.")
    local = {}
    for url, info in stock.items():
        fname = info.filename or os.path.basename(urllib.parse.urlparse(url).path)
        local[url] = checksums.compute_url_info(os.path.join(raw_dir, fname))

    # skip_registration: do not clash with the stock builder in TFDS's registry.
    # A plain class attribute shadows TFDS's memoised `url_infos` classproperty.
    offline_cls = type(
        base_cls.__name__ + "FromLocalFiles",
        (base_cls,),
        {"name": base_cls.name, "url_infos": local, "__module__": __name__},
        skip_registration=True,
    )
    return offline_cls(data_dir=data_dir, version=VERSION)


def _prepare_from_raw(name: str, raw_dir: str, data_dir: str) -> None:
    import tensorflow_datasets as tfds

    builder = _offline_builder(name, raw_dir, data_dir)
    # MNIST and Fashion-MNIST share file names: give each its own download
    # dir, or TFDS would reuse the other's extraction.
    download_dir = os.path.join(data_dir, "downloads", f"keras_kfac_{name}")
    log.info("Preparing %s/%s in %s from %s", name, VERSION, data_dir, raw_dir)
    builder.download_and_prepare(
        download_dir=download_dir,
        download_config=tfds.download.DownloadConfig(manual_dir=raw_dir),
    )


def _reachable(url: str, timeout: float = 5.0) -> bool:
    parts = urllib.parse.urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _prepare_by_download(name: str, data_dir: str, searched: list[str]) -> None:
    import tensorflow_datasets as tfds

    builder = tfds.builder(f"{name}:{VERSION}", data_dir=data_dir)
    urls = sorted((builder.url_infos or {}).keys())
    # Offline, TFDS retries for minutes before failing: probe once first.
    if urls and not _reachable(urls[0]):
        raise DataNotFoundError(
            _not_found_message(
                name,
                data_dir,
                searched,
                f"download host {urllib.parse.urlparse(urls[0]).hostname} unreachable "
                "(no network?)",
            )
        )
    try:
        builder.download_and_prepare()
    except Exception as e:  # pragma: no cover - network dependent
        raise DataNotFoundError(
            _not_found_message(name, data_dir, searched, f"TFDS download failed: {e!r}")
        ) from e


def prepare(name: str, data_dir=None, manual_dir=None, download: bool = True) -> str:
    """Make sure ``<name>/3.0.1`` is prepared; return the ``data_dir`` holding it.

    The returned directory differs from ``data_dir`` only when ``data_dir``
    itself holds the raw files (e.g. a shared source folder) or is read-only:
    the dataset is then prepared in :func:`default_data_dir`, so the raw
    files' folder is never written to.
    """
    name = _check_name(name)
    data_dir = os.path.abspath(os.path.expanduser(str(data_dir or default_data_dir())))

    import tensorflow_datasets as tfds

    if tfds.builder(f"{name}:{VERSION}", data_dir=data_dir).is_prepared():
        return data_dir

    raw_dir = find_raw_dir(name, manual_dir=manual_dir, data_dir=data_dir)
    if raw_dir is not None:
        out_dir = data_dir
        # Never write next to the raw files (a data_dir that holds them is
        # typically a shared source folder), nor into a read-only folder.
        if _inside(raw_dir, data_dir) or not _writable(out_dir):
            out_dir = os.path.abspath(default_data_dir())
            log.warning(
                "%s holds the raw files or is read-only: preparing %s in %s instead",
                data_dir,
                name,
                out_dir,
            )
            if tfds.builder(f"{name}:{VERSION}", data_dir=out_dir).is_prepared():
                return out_dir
        _prepare_from_raw(name, raw_dir, out_dir)
        return out_dir

    searched = _candidate_dirs(name, manual_dir, data_dir)
    if not download:
        raise DataNotFoundError(_not_found_message(name, data_dir, searched, "download=False"))
    _prepare_by_download(name, data_dir, searched)
    return data_dir


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def load(
    name: str,
    split: str = "train",
    data_dir=None,
    batch_size: int | None = None,
    manual_dir=None,
    as_supervised: bool = True,
    shuffle_files: bool = False,
    download: bool = True,
    **load_kwargs,
):
    """Return ``tfds.load(name, split=split, ...)`` as a ``tf.data.Dataset``.

    Prepares the dataset first if needed (see the module docstring). With
    ``as_supervised=True`` elements are ``(image uint8 (28, 28, 1), label int64)``.
    ``batch_size=-1`` returns the whole split as tensors.
    """
    name = _check_name(name)
    data_dir = prepare(name, data_dir=data_dir, manual_dir=manual_dir, download=download)
    import tensorflow_datasets as tfds

    return tfds.load(
        f"{name}:{VERSION}",
        split=split,
        data_dir=data_dir,
        batch_size=batch_size,
        as_supervised=as_supervised,
        shuffle_files=shuffle_files,
        download=False,
        **load_kwargs,
    )


def load_numpy(
    name: str, split: str = "train", data_dir=None, manual_dir=None, download: bool = True
):
    """Return ``(x, y)``: ``x`` float32 in [0, 1] of shape (N, 28, 28, 1), ``y`` int64."""
    import numpy as np
    import tensorflow_datasets as tfds

    ds = load(
        name,
        split=split,
        data_dir=data_dir,
        batch_size=-1,
        manual_dir=manual_dir,
        as_supervised=True,
        download=download,
    )
    x, y = tfds.as_numpy(ds)
    x = np.asarray(x, dtype=np.float32) / np.float32(255.0)
    y = np.asarray(y, dtype=np.int64)
    return x, y
