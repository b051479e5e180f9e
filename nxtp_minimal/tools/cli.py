"""Command line: `python -m nxtp_minimal {predict,convert,download,train,evaluate,bench,export,ablate,demo} ...`.

Each command's options live with the code that does the work; this file only dispatches and turns
user errors into one line on stderr.
"""

import importlib
import sys

from .errors import USER_ERRORS, message

COMMANDS = {
    "predict": "nxtp_minimal.tools.predict",
    "convert": "nxtp_minimal.weights.convert",
    "download": "nxtp_minimal.weights.download",
    "train": "nxtp_minimal.training.train",
    "evaluate": "nxtp_minimal.training.evaluate",
    "bench": "nxtp_minimal.tools.bench",
    "export": "nxtp_minimal.tools.onnx_engine",
    "ablate": "nxtp_minimal.training.ablations",
    "demo": "nxtp_minimal.tools.demo",
}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m nxtp_minimal {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        sys.exit(2)
    command, rest = argv[0], argv[1:]
    run = importlib.import_module(COMMANDS[command]).main
    try:
        run(rest)
    except USER_ERRORS as e:
        print(f"error: {message(e)}", file=sys.stderr)
        sys.exit(1)
