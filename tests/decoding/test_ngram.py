"""Prompt-lookup proposals on hand-computed cases."""

import jax.numpy as jnp
import numpy as np

from opd.drafters.ngram import lookup


def _lookup(rows, K=3, max_ngram=3, min_ngram=1, S=12):
    seq = np.zeros((len(rows), S), np.int32)
    for i, r in enumerate(rows):
        seq[i, : len(r)] = r
    return np.asarray(lookup(jnp.asarray(seq), jnp.asarray([len(r) for r in rows], jnp.int32), K, max_ngram, min_ngram)).tolist()


def test_hand_computed_proposals():
    assert _lookup([[1, 2, 3, 4, 1, 2]]) == [[3, 4, 1]]  # bigram (1, 2) seen at 0..1
    assert _lookup([[7, 8, 9]]) == [[9, 9, 9]]  # no match: repeat the last token
    assert _lookup([[5, 6, 5]]) == [[6, 5, 5]]  # continuation runs into the end: repeat its last known token
    # The longest n-gram wins over a more recent shorter match; ties go to the latest occurrence.
    assert _lookup([[1, 2, 3, 9, 2, 3, 8, 1, 2, 3]], K=2) == [[9, 2]]
    assert _lookup([[4, 1, 4, 2, 4]], K=1) == [[2]]
    # min_ngram=2 ignores unigram matches.
    assert _lookup([[5, 6, 5]], min_ngram=2) == [[5, 5, 5]]
    # Rows are independent.
    assert _lookup([[1, 2, 3, 4, 1, 2], [7, 8, 9]]) == [[3, 4, 1], [9, 9, 9]]
