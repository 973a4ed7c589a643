"""What the command-line scripts (main.py, bench.py, predict.py, plots.py) share: argparse with one-line errors."""
import argparse


class OneLineErrors(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (argparse would print its 12-line usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")
