"""Print docs/configuration.md from the settings model: ``python -m cli.config_docs > docs/configuration.md``.

A test checks the file is what this prints, so a setting cannot be added without its line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.settings import ENV_PREFIX, PROJECT_ROOT, Settings

HEADER = """# Configuration

Every setting is a `BATCHGEN_*` environment variable, read once when a process starts into one typed,
frozen settings object (`core/settings.py`); a value that cannot be used stops the process with the
variable's name. The defaults serve a laptop: SQLite and an embedded Redis under `var/`, the `demo`
model, the CPU. `0` turns a limit off where its line says so.

This page is generated from the settings model (`python -m cli.config_docs > docs/configuration.md`);
a test fails when the two differ.
"""


def _default(value: Any) -> str:
    if value is None or value == "" or value == Path(""):
        return "(unset)"
    if isinstance(value, Path):
        try:
            return f"`{value.relative_to(PROJECT_ROOT)}/`"
        except ValueError:
            return f"`{value}`"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1024 * 1024 and value % (1024 * 1024) == 0:
        return f"{value} ({value // (1024 * 1024)} MiB)" if value < 1024**3 else f"{value} ({value // 1024**3} GiB)"
    return f"`{value}`"


def render() -> str:
    groups: dict[str, list[str]] = {}
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        group = str(extra.get("group", "Other"))
        groups.setdefault(group, []).append(
            f"| `{ENV_PREFIX}{name.upper()}` | {_default(field.default)} | {field.description or ''} |")
    out = [HEADER]
    for group, rows in groups.items():
        out += [f"## {group}", "", "| variable | default | |", "|---|---|---|", *rows, ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
