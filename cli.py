"""What every script of tst shares at its command line: the user's mistakes, reported in one line.

    if __name__ == "__main__":
        cli.run(main)

Imports nothing heavy (no torch, numpy or tiktoken) at the top, so that any tool can use it.
"""

import argparse
import contextlib
import math
import os
import shlex
import signal
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
            print_error(e)
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


def print_error(message):
    """A UserError's line on stderr, `error: ...`: one line, even for a library's message."""
    print("error:", " ".join(str(message).split("\n")), file=sys.stderr, flush=True)


def command(script, argv, *extra):
    """The command line that runs `script` again with argv, the settings in `extra` replacing theirs; under torchrun,
    with torchrun (and the `--` that keeps its parser off the script's settings)."""
    keys = tuple(e.split("=", 1)[0] + "=" for e in extra)
    kept = [a for a in argv if not a.startswith(keys)] + list(extra)
    script = os.path.relpath(script)
    script = script if not script.startswith("..") else os.path.abspath(script)
    if "RANK" in os.environ:
        launch = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', 1)}", script, "--"]
    else:
        launch = ["python", script]
    return shlex.join(launch + kept)


# argparse types of the scripts' numbers, and --device

def positive_int(text):
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return int(text)


def non_negative_int(text):
    if int(text) < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return int(text)


def non_negative_float(text):
    if not 0 <= float(text) < math.inf:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0")
    return float(text)


def torch_device(name):
    """--device, checked here: a device the machine lacks would otherwise fail deep inside torch."""
    import torch  # here: see the module docstring
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices (torch "
                        f"{torch.__version__}): use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: this machine (torch {torch.__version__}) has no MPS device: use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: use cpu, cuda[:N] or mps")
    return device


@contextlib.contextmanager
def stop_signals():
    """Within: SIGTERM and SIGINT append their numbers to the list it yields (a Ctrl-C after either stops at once; the
    caller may add reasons of its own, which do not count). The handlers that were there before come back after."""
    received = []

    def handler(signum, frame):
        if signum == signal.SIGINT and any(isinstance(r, int) for r in received):
            raise KeyboardInterrupt
        received.append(signum)
    before = {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for signum, previous in before.items():
            signal.signal(signum, previous)
