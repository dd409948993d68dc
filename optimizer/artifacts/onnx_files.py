"""ONNX models are sometimes several files: the graph plus external data files beside it.

Large models keep their weights outside the protobuf (its 2 GB limit), in one combined file or
one file per tensor. Wherever mlopt sizes, moves or deletes a model it goes through here, so the
data always travels with its graph. Locations are validated the safe way: relative, inside the
model's folder, no `..` and no symlink out of it (CVE-2024-27318, CVE-2024-27319).
"""

from __future__ import annotations

import shutil
from pathlib import Path


class ExternalDataError(ValueError):
    """An external-data location that is missing or points outside the model's folder."""


# Reading a large graph's protobuf takes a while, and load, keep and size all ask about the same
# file: remember the answer per (path, mtime, size), so a rewritten file is read again.
_LOCATIONS: dict[tuple[str, int, int], list[str]] = {}


def external_locations(path: Path) -> list[str]:
    """The distinct external-data file names the model refers to, in order of first use."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _LOCATIONS:
        import onnx
        from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

        model = onnx.load(str(path), load_external_data=False)
        seen: dict[str, None] = {}
        for tensor in _get_all_tensors(model):
            if uses_external_data(tensor):
                seen.setdefault(ExternalDataInfo(tensor).location, None)
        _LOCATIONS[key] = list(seen)
    return _LOCATIONS[key]


def check_locations(path: Path, locations: list[str]) -> None:
    """Refuse a location that is absolute or climbs out of the model's folder (also via a symlink)."""
    folder = path.parent.resolve()
    for location in locations:
        candidate = Path(location)
        resolved = (folder / candidate).resolve()
        if candidate.is_absolute() or ".." in candidate.parts or not resolved.is_relative_to(folder):
            raise ExternalDataError(
                f"{path.name} keeps tensor data at {location!r}, outside the model's folder {folder}; external "
                "data must sit beside the model (re-save it with onnx.save_model(..., save_as_external_data=True, "
                "location='<name>.data'))")


def validate(path: Path) -> list[Path]:
    """The data files behind `path`, each checked to be a file inside the model's folder."""
    folder = path.parent.resolve()
    files = []
    locations = external_locations(path)
    check_locations(path, locations)
    for location in locations:
        candidate = Path(location)
        resolved = (folder / candidate).resolve()
        if not resolved.is_file():
            raise ExternalDataError(
                f"{path.name} keeps tensor data in {location!r}, which is not in {folder}; copy the data file(s) "
                "next to the model file")
        files.append(folder / candidate)
    return files


def files(path: Path) -> list[Path]:
    """The model file followed by its external data files."""
    return [path, *validate(path)]


def total_size(path: Path) -> int:
    return sum(item.stat().st_size for item in files(path))


def has_external_data(path: Path) -> bool:
    return bool(external_locations(path))


def move(path: Path, target: Path) -> Path:
    """Move a model to `target` with its data files beside it (their names are kept, so the
    graph's references still hold)."""
    data = validate(path)
    for item in data:
        shutil.move(item, target.parent / item.name)
    shutil.move(path, target)
    return target


def remove(path: Path) -> None:
    for item in files(path):
        item.unlink(missing_ok=True)


def data_location(target: Path) -> str:
    """The one combined data file a written model uses: `<model file name>.data`."""
    return f"{target.name}.data"
