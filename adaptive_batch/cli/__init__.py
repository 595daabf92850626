"""The ``adaptive-batch`` command: ``train`` one method, ``compare`` several.

``python -m adaptive_batch`` runs it too. See ``adaptive-batch --help``.
"""

from adaptive_batch.cli._main import build_parser, main

__all__ = ["build_parser", "main"]
