"""The README's methods table is the one ``methods.registry.methods_markdown()`` generates from each method's
class (its summary, variants and provenance), so it cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

from methods.registry import methods_markdown

README = Path(__file__).resolve().parents[2] / "README.md"
START, END = "<!-- methods-table:start -->", "<!-- methods-table:end -->"
REGENERATE = (
    "python -c \"import re,pathlib,methods.registry as r; p=pathlib.Path('README.md'); "
    "p.write_text(re.sub(r'(<!-- methods-table:start -->\\n).*?(<!-- methods-table:end -->)', "
    'lambda m: m[1]+r.methods_markdown()+m[2], p.read_text(), flags=re.S))"'
)


def test_readme_methods_table_is_generated_from_the_registry():
    text = README.read_text()
    found = re.search(re.escape(START) + r"\n(.*?)" + re.escape(END), text, flags=re.S)
    assert found, f"README.md has no block between {START} and {END} (the methods table)"
    assert found[1] == methods_markdown(), (
        "README.md's methods table differs from methods_markdown(); regenerate it from the repository root "
        f"with:\n{REGENERATE}"
    )
