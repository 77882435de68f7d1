"""Loaded at interpreter start-up by the CLI error tests (through PYTHONPATH): makes ``bench methods`` fail with
an exception bench does not expect, to check what the installed console script shows for it."""

import os

if os.environ.get("BENCH_TEST_FAULT"):
    import methods.registry

    def _broken() -> list[dict[str, str]]:
        raise RuntimeError("injected fault")

    methods.registry.method_rows = _broken
