"""Which models an entry point evaluates or attacks: `--run` / `--method` values -> run folders.

    parse_runs(["base", "runs/ft", "SARE=runs/sare"])
    # {"base": None, "ft": "runs/ft", "SARE": "runs/sare"}

Each value is one of
- `name=dir`: the run in `dir`, reported as `name`;
- `dir`: the run in `dir`, reported under the folder's name;
- `base` or `name=base`: the bare base checkpoint (None: nothing loaded on top of it).
"""
from __future__ import annotations

from pathlib import Path

BASE = "base"


def parse_runs(items: list[str], flag: str = "--run") -> dict[str, str | None]:
    """Report name -> run folder (None for the base checkpoint), in the given order."""
    runs: dict[str, str | None] = {}
    for item in items:
        if "=" in item:
            name, _, target = item.partition("=")
            name, target = name.strip(), target.strip()
            if not name or not target:
                raise ValueError(f"{flag} {item!r}: name=dir needs both a name and a folder (an empty side "
                                 f"is often an unset shell variable); write {flag} NAME=DIR or {flag} {BASE}")
        else:
            target = item.strip()
            name = Path(target).name if target != BASE else BASE
            if not name:
                raise ValueError(f"{flag} {item!r}: no folder name to report it under; "
                                 f"write {flag} NAME=DIR")
        if name in runs:
            raise ValueError(f"{flag} {item!r}: the name {name!r} is given twice, so one result would "
                             f"overwrite the other; name them apart with {flag} NAME=DIR")
        runs[name] = None if target == BASE else target
    return runs
