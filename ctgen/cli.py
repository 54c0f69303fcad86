"""``ctgen`` command line: model-side tools (shard verification now; training and sampling follow)."""

from __future__ import annotations

import sys

COMMANDS = {"verify-shards": "re-hash shards against their manifests and count samples per split"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        listing = "\n".join(f"  {k:15s} {v}" for k, v in COMMANDS.items())
        sys.stderr.write(f"usage: ctgen COMMAND ...\ncommands:\n{listing}\n")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from ctgen.data import verify_shards_main

    return verify_shards_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
