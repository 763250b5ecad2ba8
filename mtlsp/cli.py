"""The ``mtlsp`` command.

``mtlsp demo`` indexes a sample workspace into its persistent memory with the shipped weights,
completes a line with and without that memory and shows where the memory's hits came from; ``mtlsp index PATH... [--watch | --status]`` builds and keeps fresh the
persistent memory of workspace folders; ``mtlsp model ...`` is the model package's own command
line (corpus, train, eval).  The language server will join it here.
"""

from __future__ import annotations

import sys

from mtlsp_model.cli import main as model_main


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nusage: mtlsp demo [--workspace DIR --file REL --cursor-after TEXT --cache-dir DIR]"
              " | mtlsp index PATH... [--watch | --status] | mtlsp model COMMAND ...")
        return
    if argv[0] == "demo":
        from .demo import main as demo_main

        demo_main(argv[1:])
    elif argv[0] == "index":
        from .index_cli import main as index_main

        index_main(argv[1:])
    elif argv[0] == "model":
        model_main(argv[1:])
    else:
        sys.exit(f"mtlsp: unknown command {argv[0]!r} (try: mtlsp demo, mtlsp index --help, mtlsp model --help)")
