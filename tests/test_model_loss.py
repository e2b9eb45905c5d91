"""The chunked LM-head cross entropy equals the plain one, in value and gradients,
in one pass over whole rows and in two passes over vocabulary blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.loss import CPU_VOCAB_BLOCK, IGNORE_INDEX, _vocab_block, linear_cross_entropy


def _inputs(n=37, d=16, vocab=301, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, d, generator=g, dtype=dtype) * 0.5).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::5] = IGNORE_INDEX
    return hidden, weight, labels


BLOCKS = [301, 64, 1]      # the whole vocabulary (one pass), uneven blocks (4 x 64 + 45), one column


@pytest.mark.parametrize("vocab_block", BLOCKS)
@pytest.mark.parametrize("chunk_rows", [1, 7, 37, 1000])     # one row, uneven chunks, one chunk
def test_equals_plain_cross_entropy_with_the_same_gradients(chunk_rows, vocab_block):
    hidden, weight, labels = _inputs()
    want = F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=IGNORE_INDEX)
    (3.0 * want).backward()                        # a scaled upstream gradient reaches both inputs
    want_gh, want_gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    got = linear_cross_entropy(hidden, weight, labels, chunk_elements=chunk_rows * weight.shape[0],
                               vocab_block=vocab_block)
    (3.0 * got).backward()
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    assert torch.allclose(hidden.grad, want_gh, rtol=1e-5, atol=1e-7)
    assert torch.allclose(weight.grad, want_gw, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("vocab_block", BLOCKS)
def test_no_grad_and_frozen_weight_paths_give_the_same_loss(vocab_block):
    hidden, weight, labels = _inputs(seed=1)
    want = F.cross_entropy(F.linear(hidden, weight), labels, ignore_index=IGNORE_INDEX)
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, labels, chunk_elements=64, vocab_block=vocab_block)
        assert torch.allclose(got, want, atol=1e-6)
    frozen = weight.detach()
    loss = linear_cross_entropy(hidden, frozen, labels, chunk_elements=64, vocab_block=vocab_block)
    loss.backward()
    assert torch.allclose(loss, want, atol=1e-6) and hidden.grad is not None


@pytest.mark.parametrize("vocab_block", BLOCKS)
def test_extreme_logits_stay_finite_and_all_ignored_labels_give_zero(vocab_block):
    hidden, weight, labels = _inputs(seed=2)
    with torch.no_grad():
        weight.mul_(200.0)                         # logits in the thousands: a naive exp overflows
    got = linear_cross_entropy(hidden, weight, labels, vocab_block=vocab_block)
    got.backward()
    want = F.cross_entropy(F.linear(hidden, weight), labels, ignore_index=IGNORE_INDEX)
    assert torch.isfinite(got) and torch.allclose(got, want, rtol=1e-5)
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    none = torch.full_like(labels, IGNORE_INDEX)
    assert linear_cross_entropy(hidden, weight, none, vocab_block=vocab_block).item() == 0.0


@pytest.mark.parametrize("vocab_block", BLOCKS[:2])
def test_bf16_inputs_compute_the_softmax_in_float32(vocab_block):
    hidden, weight, labels = _inputs(seed=3, dtype=torch.bfloat16)
    got = linear_cross_entropy(hidden, weight, labels, chunk_elements=10 * weight.shape[0],
                               vocab_block=vocab_block)
    want = F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=IGNORE_INDEX)
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-3)
    got.backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16


def test_mismatched_labels_are_refused():
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError, match="labels for"):
        linear_cross_entropy(hidden, weight, labels[:-1])


def test_cpu_default_takes_cache_sized_vocabulary_blocks():
    """A vocabulary larger than one block goes through the two-pass path by default on CPU."""
    hidden, weight, labels = _inputs(n=9, vocab=2 * CPU_VOCAB_BLOCK + 5, seed=4)
    assert _vocab_block(hidden, weight.shape[0], "auto") == CPU_VOCAB_BLOCK      # three blocks
    want = F.cross_entropy(F.linear(hidden, weight), labels, ignore_index=IGNORE_INDEX)
    want.backward()
    want_gh, want_gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = linear_cross_entropy(hidden, weight, labels)
    got.backward()
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    assert torch.allclose(hidden.grad, want_gh, rtol=1e-5, atol=1e-7)
    assert torch.allclose(weight.grad, want_gw, rtol=1e-5, atol=1e-7)
