"""What the command-line scripts (main.py, bench.py, predict.py, plots.py) share: argparse with one-line errors,
the type of their path arguments and a stdout that prints any path; and for all but main.py (which stops on
signals itself: trainer.py and main.main) a Ctrl-C that ends them in one line."""
import argparse
import os
import sys


class OneLineErrors(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (argparse would print its 12-line usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def nonempty_path(value: str) -> str:
    """A path argument: an empty one ("$CKPT" with CKPT unset) is refused, never taken as the flag left out; a
    leading ~ the shell left (--data-dir=~/x) is expanded, as torchvision would expand it on its own."""
    if not value:
        raise argparse.ArgumentTypeError("empty path: give one, or leave the flag out")
    return os.path.expanduser(value)


def first_line(error) -> str:
    """The first non-blank line of an exception's message (or of a text), stripped; "" when there is none."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), "")


def escape_what_stdout_cannot_encode() -> None:
    """A path the output's encoding cannot show (a Latin-1 file name under PYTHONIOENCODING=utf-8, a Chinese one
    on a Latin-1 terminal) is printed with backslash escapes instead of ending the script with UnicodeEncodeError,
    as Python already does on stderr. Where stdout is not strict (a UTF-8 locale's surrogateescape) it is kept."""
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


def run_script(main) -> None:
    """sys.exit(main()); a Ctrl-C ends the script with one line and status 130, not a traceback; stdout as
    escape_what_stdout_cannot_encode leaves it."""
    escape_what_stdout_cannot_encode()
    try:
        status = main()
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); files already written are kept", file=sys.stderr, flush=True)
        status = 130
    sys.exit(status)
