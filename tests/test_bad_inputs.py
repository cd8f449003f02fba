"""Each row of docs/bad_inputs.md is a test; the table is generated from the same list (tests/bad_inputs.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from bad_inputs import CASES, DOC, document, message, run  # noqa: E402


@pytest.mark.parametrize("case", CASES, ids=[f"{c.entry.split('(')[0]}: {c.bad_input}" for c in CASES])
def test_bad_input_raises_a_clear_error(case):
    error = run(case)
    assert isinstance(error, case.error), f"{case.bad_input}: expected {case.error.__name__}, got {error!r}"
    text = message(error)
    missing = [part for part in case.says if part not in text]
    assert not missing, f"{case.bad_input}: the message {text!r} does not say {missing}"


def test_the_table_in_docs_is_the_list_of_cases():
    assert DOC.read_text() == document(), "docs/bad_inputs.md is out of date: run `python tests/bad_inputs.py`"
