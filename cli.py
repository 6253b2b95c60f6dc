"""What every script of tst shares at its command line: the user's mistakes, reported in one line.

    if __name__ == "__main__":
        cli.run(main)

Imports nothing heavy (no torch, numpy or tiktoken), so that any tool can use it.
"""

import os
import sys


class UserError(Exception):
    """A mistake in what the user asked for (a setting, a data folder, a checkpoint, a file): printed as one line,
    `error: ...`, without a traceback, and the script exits with status 1. Every other exception is a bug of the code
    and keeps its traceback."""


def run(main, argv=None):
    """main(argv) with the command line's arguments, then exit: a UserError becomes one line on stderr (from rank 0
    only under torchrun, where every rank raises it) and exit status 1; Ctrl-C outside a training loop (which saves
    first) exits with 130, without a traceback."""
    code = 0
    try:
        main(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print("error:", " ".join(str(e).split("\n")), file=sys.stderr)  # one line, even for a library's message
        code = 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    if "RANK" in os.environ:  # under torchrun: skip the interpreter's teardown, where gloo's threads can abort
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
