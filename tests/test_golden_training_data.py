"""Issue 9's invariant: the training data is byte-identical to what the pre-restructure code made.

``tests/golden/training_data.json`` holds, for every kind of shipped data (each format, truncated and
not, z-scored and not, the pre-tokenised variant and the data ``configs/train/tiny_cpu.yaml`` trains
on), a sha256 of each training column. It was generated at commit 6047ed7 (before the layout moved)
by ``helpers/golden_data.py``; this test recomputes every case with the current code.
"""

import json

import pytest
from helpers.golden_data import GOLDEN, _tokenizer, cases

_GOLDEN = json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def computed(tok):
    return cases(tok)


def test_the_tiny_tokenizer_is_the_one_the_golden_file_was_made_with(tok):
    import hashlib

    vocab = json.dumps(sorted(tok.get_vocab().items())).encode()
    assert hashlib.sha256(vocab).hexdigest() == _GOLDEN["tokenizer"]


def test_every_golden_case_is_still_computed(computed):
    assert sorted(computed) == sorted(_GOLDEN["cases"])


@pytest.mark.parametrize("case", sorted(_GOLDEN["cases"]))
def test_training_columns_are_byte_identical_to_the_pre_restructure_code(computed, case):
    assert computed[case]() == _GOLDEN["cases"][case]
