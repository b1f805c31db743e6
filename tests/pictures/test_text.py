"""Token maps as coloured text (terminal, HTML, picture), and the language-model targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from libragrad_fx import InputError, LibraError, continuation_logprob, token_logit
from libragrad_fx.pictures import ansi, save_text, to_html, token_colours

TOKENS = ["The", " cat", " sat", " <b>"]


def test_colours_are_white_at_zero_and_full_at_the_peak_by_sign():
    colours = token_colours([0.0, 2.0, -2.0, 1.0])
    assert np.allclose(colours[0], 1.0, atol=0.05)  # white, or the colormap's near-white
    red, blue = colours[1], colours[2]
    assert red[0] > red[2] and blue[2] > blue[0]
    assert np.abs(1 - colours[3]).sum() < np.abs(1 - colours[1]).sum()  # weaker, paler


def test_a_shared_peak_pales_a_weaker_sequence():
    own, shared = token_colours([0.0, 1.0]), token_colours([0.0, 1.0], peak=10.0)
    assert np.abs(1 - shared[1]).sum() < np.abs(1 - own[1]).sum()


def test_terminal_and_html_renderings_hold_every_token_escaped():
    scores = [0.1, -0.5, 1.0, 0.0]
    text = ansi(TOKENS, scores)
    assert text.count("\x1b[0m") == 4 and " cat" in text
    page = to_html(TOKENS, scores, title="a <title>")
    assert page.count("<span") == 4 and "&lt;b&gt;" in page and "&lt;title&gt;" in page
    assert 'title="-0.5"' in page


@pytest.mark.parametrize("suffix, magic", [(".html", b"<!doctype"), (".png", b"\x89PNG"),
                                           (".svg", b"<?xml")])
def test_save_text_writes_the_format_the_name_asks_for(tmp_path, suffix, magic):
    path = save_text(TOKENS, [0.1, -0.5, 1.0, 0.0], tmp_path / f"t{suffix}")
    assert path.read_bytes().startswith(magic)


def test_one_score_per_token():
    with pytest.raises(LibraError, match="4 tokens and 3 scores"):
        ansi(TOKENS, [1.0, 2.0, 3.0])


def test_token_logit_reads_the_position_and_token():
    logits = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5)
    assert torch.equal(token_logit(4)({"logits": logits}), logits[:, -1, 4])
    assert torch.equal(token_logit(1, position=0)(logits), logits[:, 0, 1])
    with pytest.raises(InputError, match="outside the vocabulary"):
        token_logit(5)(logits)


def test_continuation_logprob_is_the_sum_of_shifted_log_probabilities():
    logits = torch.randn(2, 6, 7, generator=torch.Generator().manual_seed(0))
    got = continuation_logprob([3, 1])(logits)
    logp = logits.log_softmax(-1)
    assert torch.allclose(got, logp[:, 3, 3] + logp[:, 4, 1])
    with pytest.raises(InputError, match="needs a prompt before it"):
        continuation_logprob([1] * 6)(logits)
