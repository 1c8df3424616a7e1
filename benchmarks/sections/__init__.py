"""The sections of `benchmarks.run`, one module each, in the order they run.

Each module has ``NAME``, ``add_arguments(parser)`` (its options), ``QUICK`` and ``SMOKE``
(the values ``--quick`` and ``--smoke`` give those options), ``run(args, result, log,
checkpoint)`` (fills its keys of the result, calling ``checkpoint()`` after every
configuration) and ``format(result) -> list[str]`` (its tables).
"""

from benchmarks.sections import compile, e2e, factored, memory, scaling, update

SECTIONS = {s.NAME: s for s in (update, factored, scaling, memory, compile, e2e)}
DEFAULT = ("update", "factored", "scaling", "memory", "e2e")  # compile is opt-in
