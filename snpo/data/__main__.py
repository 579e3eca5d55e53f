"""``python -m snpo.data`` / ``snpo data``: the data tools.

synth DIR     a tiny model and synthetic Pick-a-Pic pairs for trying the trainer
stats PATHS   rows, ties, usable pairs, image sizes and decode failures of data files
"""

from __future__ import annotations

import sys

TOOLS = {"synth": "snpo.data.synthetic", "stats": "snpo.data.stats"}


def main(argv: list[str] | None = None) -> int:
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] not in TOOLS:
        print(f"snpo data: unknown tool {argv[0]!r}; one of: {', '.join(TOOLS)}", file=sys.stderr)
        return 2
    if argv[0] == "synth":  # its parser takes the tool name itself
        return int(importlib.import_module(TOOLS["synth"]).main(argv) or 0)
    return int(importlib.import_module(TOOLS[argv[0]]).main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
