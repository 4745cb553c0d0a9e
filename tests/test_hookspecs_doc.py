"""Meta-test: every hook in dataselect.hookspecs has a docstring, a test,
and a `###` heading (with its signature and docstring) in the plugin guide (docs/plugins.md).

`python tests/test_hookspecs_doc.py` prints the hook reference as docs/plugins.md
must contain it; paste it into the guide after changing a hook.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest

from dataselect import hookspecs
from dataselect.registry import hook_names

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- plugin-guide:start -->", "<!-- plugin-guide:end -->"


def hooks() -> dict[str, object]:
    return {name: getattr(hookspecs, name) for name in hook_names()}


def heading(name: str) -> str:
    params = inspect.signature(getattr(hookspecs, name)).parameters
    return f"### {name}({', '.join(params)})"


def reference(name: str) -> str:
    """The guide's text for one hook: heading, signature, docstring."""
    fn = getattr(hookspecs, name)
    sig = str(inspect.signature(fn)).replace("'", "")
    doc = inspect.cleandoc(fn.__doc__ or "")
    return f"{heading(name)}\n\n```python\n@dataselect.hookimpl\ndef {name}{sig}: ...\n```\n\n{doc}\n"


def guide() -> str:
    text = REPO.joinpath("docs", "plugins.md").read_text()
    assert text.count(START) == 1 and text.count(END) == 1, "docs/plugins.md needs one plugin-guide start and end marker"
    return text[text.index(START):text.index(END)]


def test_there_are_hooks():
    assert {"register_strategies", "register_models"} <= set(hooks())


def test_the_compatibility_rule_is_stated():
    doc = " ".join((hookspecs.__doc__ or "").split())
    assert "arguments can be added to a hook later but never removed" in doc


@pytest.mark.parametrize("name", hook_names())
def test_hook_has_a_docstring_for_plugin_authors(name):
    doc = inspect.getdoc(getattr(hookspecs, name)) or ""
    assert len(doc.split()) >= 20, f"hook {name} needs a docstring written for plugin authors"
    assert "register(" in doc or "Example" in doc, f"hook {name}'s docstring should show how to call it"


@pytest.mark.parametrize("name", hook_names())
def test_hook_has_a_test(name):
    me = Path(__file__).name
    users = [p.name for p in REPO.joinpath("tests").glob("test_*.py")
             if p.name != me and re.search(rf"\b{name}\b", p.read_text())]
    assert users, f"no test in tests/ mentions hook {name}; write one"


@pytest.mark.parametrize("name", hook_names())
def test_hook_is_documented_in_the_readme(name):
    text = guide()
    assert heading(name) in text.splitlines(), f"the plugin guide lacks the heading {heading(name)!r}"
    assert reference(name) in text, (f"the plugin guide's reference for {name} differs from its hookspec; "
                                     "regenerate it with `python tests/test_hookspecs_doc.py`")


def test_readme_documents_no_hook_that_does_not_exist():
    documented = re.findall(r"^### (\w+)\(", guide(), flags=re.M)
    assert documented, "the plugin guide has no hook headings"
    stale = set(documented) - set(hook_names())
    assert not stale, f"the plugin guide documents hooks that hookspecs does not define: {sorted(stale)}"


if __name__ == "__main__":
    sys.stdout.write("\n".join(reference(n) for n in hook_names()))
