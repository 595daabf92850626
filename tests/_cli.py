"""Running the command in the test process."""

from __future__ import annotations

from adaptive_batch.cli import main


def main_in_process(argv: list[str]) -> int:
    """``main(argv)`` with JAX's persistent compilation cache off: turned on, it would
    stay on for the rest of the test process (test_cli_compile.py runs it in
    subprocesses instead)."""
    if argv and argv[0] in ("train", "compare") and "--help" not in argv:
        argv = [*argv, "--no-compile-cache"]
    return main(argv)
