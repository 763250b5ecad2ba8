"""mtlsp: code completion over LSP from a memorizing transformer that reads your project.

  mtlsp serve [--tcp HOST:PORT]         the language server (stdio by default): what an editor starts
  mtlsp demo                            an LSP session against the server on a sample workspace
  mtlsp index PATH... [--watch]         build and keep fresh the memory of workspace folders
  mtlsp index --status PATH...          what each folder's memory holds
  mtlsp eval REPO...                    completion with and without the memory, against jedi and BM25
  mtlsp model fetch|heads|train|eval    the model package (base model, memory heads, training)

Each command takes --help.
"""

from __future__ import annotations

import sys

from mtlsp_model.cli import main as model_main


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    if argv[0] == "serve":
        from .serve_cli import main as serve_main

        serve_main(argv[1:])
    elif argv[0] == "demo":
        from .demo import main as demo_main

        demo_main(argv[1:])
    elif argv[0] == "index":
        from .index_cli import main as index_main

        index_main(argv[1:])
    elif argv[0] == "eval":
        from .eval_cli import main as eval_main

        eval_main(argv[1:])
    elif argv[0] == "model":
        model_main(argv[1:])
    else:
        sys.exit(f"mtlsp: unknown command {argv[0]!r} (try: mtlsp --help)")
