"""Read a ModelOptimization from YAML and turn validation errors into messages people can act on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from optimizer.api.spec import ModelOptimization

# A hint per pydantic error type: the message says what is wrong, this says how to fix it.
_FIXES = {
    "extra_forbidden": "remove it or correct its spelling",
    "missing": "add this field",
    "enum": "use one of the listed values",
    "literal_error": "use the exact value shown",
    "int_parsing": "use a whole number",
    "int_type": "use a whole number",
    "float_parsing": "use a number",
    "list_type": "use a YAML list, e.g. [1, 1, 32, 100]",
    "dict_type": "use a YAML mapping",
    "greater_than_equal": "use a larger value",
    "less_than_equal": "use a smaller value",
    "string_pattern_mismatch": "match the pattern shown",
    "too_short": "add at least the number of items shown",
}


class SpecError(ValueError):
    """An invalid spec; `problems` has one line per offending field."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{source}: invalid spec\n" + "\n".join(f"  - {p}" for p in problems))


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_.-]+$")


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif str(part).startswith(("function-", "union[", "list[", "dict[")):
            continue  # pydantic's internal validator names, not fields
        elif not _PLAIN_KEY.match(str(part)):  # a user's key: quoted, so a newline in it stays on the line
            path += f"[{str(part)!r}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "(document)"


def describe_validation_error(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        fix = _FIXES.get(item["type"])
        line = f"{_field_path(item['loc'])}: {message}"
        if item["type"] not in ("missing", "extra_forbidden") and not isinstance(item["input"], (dict, list)):
            line += f" (got {item['input']!r})"
        if fix and item["type"] != "value_error":
            line += f" (fix: {fix})"
        problems.append(line)
    return problems


def parse_spec(document: Any, source: str = "spec") -> ModelOptimization:
    if not isinstance(document, dict):
        raise SpecError(source, ["(document): expected a mapping with apiVersion, kind, metadata, spec"])
    try:
        return ModelOptimization.model_validate(document)
    except ValidationError as error:
        raise SpecError(source, describe_validation_error(error)) from None


def load_spec(path: str | Path) -> ModelOptimization:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecError(str(path), [f"cannot read the file: {error.strerror}"]) from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError(str(path), [f"{where}not valid YAML ({getattr(error, 'problem', error)})"]) from None
    return parse_spec(document, str(path))
