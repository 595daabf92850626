"""Import a script of `benchmarks/` as a module, for tests of its logic (never its timing)."""

import importlib.util
import pathlib

BENCHMARKS = pathlib.Path(__file__).parents[1] / "benchmarks"


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module named ``<name>_benchmark`` (its own helpers,
    such as `_common`, come from ``benchmarks/``, which the script puts on ``sys.path``)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
