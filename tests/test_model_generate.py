"""KV-cached decoding equals full forward passes; batching, sampling and stop tokens."""

from __future__ import annotations

import pytest
import torch

from model import DBRX
from model.attention import KVCache
from model.config import DBRXConfig
from model.decode import sample_tokens
from model.generate import left_pad

torch.set_num_threads(min(2, torch.get_num_threads()))   # never above the suite-wide cap

CFG = DBRXConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=16,
                 moe_num_experts=4, moe_top_k=2, vocab_size=50, max_seq_len=48,
                 rope_theta=500.0, clip_qkv=1.0)
TOL = 1e-4


@pytest.fixture(scope="module")
def model(random_model) -> DBRX:
    return random_model(CFG, std=0.3).eval()


def greedy_without_cache(model: DBRX, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_cached_step_logits_equal_full_forward(model):
    torch.manual_seed(1)
    ids = torch.randint(0, CFG.vocab_size, (2, 14))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(CFG, 2, 14, ids.device, torch.float32)
        prefill = model(ids[:, :6], kv_cache=cache).logits
        steps = [model(ids[:, t:t + 1], kv_cache=cache).logits for t in range(6, 10)]
        chunk = model(ids[:, 10:], kv_cache=cache).logits          # multi-token step on a warm cache
    assert cache.length == 14
    assert (prefill - full[:, :6]).abs().max() < TOL
    for i, step in enumerate(steps):
        assert (step[:, 0] - full[:, 6 + i]).abs().max() < TOL
    assert (chunk - full[:, 10:]).abs().max() < TOL


def test_greedy_generate_matches_uncached_loop(model):
    prompt = [3, 14, 15, 9, 2, 6]
    out = model.generate([prompt], max_new_tokens=8)
    assert out.tokens[0] == greedy_without_cache(model, prompt, 8)
    assert out.finish_reasons == ["length"] and out.prompt_lengths == [6]


def test_left_padded_batch_equals_each_prompt_alone(model):
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
    batched = model.generate(prompts, max_new_tokens=6)
    for prompt, tokens in zip(prompts, batched.tokens):
        assert tokens == model.generate([prompt], max_new_tokens=6).tokens[0]
    assert batched.prompt_lengths == [7, 2, 4]
    # Logits too, not only argmaxes: a padded row's last logits equal the unpadded forward.
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits[:, -1]
        for row, prompt in enumerate(prompts):
            alone = model(torch.tensor([prompt])).logits[0, -1]
            assert (padded[row] - alone).abs().max() < TOL


def test_stop_tokens_end_each_sequence(model):
    prompts = [[5, 6, 7], [20, 21]]
    free = model.generate(prompts, max_new_tokens=10)
    stop = free.tokens[0][3]                     # the 4th token the first prompt produces
    out = model.generate(prompts, max_new_tokens=10, stop_tokens=[stop])
    assert out.tokens[0] == free.tokens[0][:free.tokens[0].index(stop)]
    assert out.finish_reasons[0] == "stop"
    if stop in free.tokens[1]:
        assert out.tokens[1] == free.tokens[1][:free.tokens[1].index(stop)]
        assert out.finish_reasons[1] == "stop"
    else:
        assert out.tokens[1] == free.tokens[1] and out.finish_reasons[1] == "length"


def test_generation_stops_early_when_all_sequences_stop(model):
    first = model.generate([[1, 2, 3]], max_new_tokens=1).tokens[0][0]
    out = model.generate([[1, 2, 3]], max_new_tokens=20, stop_tokens={first})
    assert out.tokens == [[]] and out.finish_reasons == ["stop"]


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(model):
    prompt = [[4, 8, 15, 16]]
    a = model.generate(prompt, max_new_tokens=10, temperature=1.5, seed=7)
    b = model.generate(prompt, max_new_tokens=10, temperature=1.5, seed=7)
    c = model.generate(prompt, max_new_tokens=10, temperature=1.5, seed=8)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    greedy = model.generate(prompt, max_new_tokens=10)
    assert model.generate(prompt, max_new_tokens=10, temperature=1.0, top_p=1e-6,
                          seed=3).tokens == greedy.tokens
    assert model.generate(prompt, max_new_tokens=10, temperature=1.0, top_k=1,
                          seed=3).tokens == greedy.tokens


def test_top_p_keeps_the_nucleus():
    n = 300                                               # 300 draws: one seed, token indices 0..299
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(n, 4)
    picked = sample_tokens(logits, torch.ones(n), torch.full((n,), 0.8), torch.zeros(n, dtype=torch.long),
                           torch.full((n,), 7, dtype=torch.long), torch.arange(n))
    assert set(picked.tolist()) == {0, 1}                 # 0.15 and 0.05 sit past the 0.8 nucleus


def test_generate_restores_training_mode_and_checks_context(model):
    model.train()
    model.generate([[1, 2]], max_new_tokens=2)
    assert model.training
    model.eval()
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate([[1] * 40], max_new_tokens=20)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate([[1]], max_new_tokens=0)
