"""The decode engine (model.decode): static KV cache, MoE decode path, device-side sampling."""

from __future__ import annotations

import pytest
import torch

from model import DBRX
from model.attention import KVCache
from model.config import DBRXConfig
from model.decode import DecodeEngine, Sampling, counter_uniforms, sample_tokens
from model.moe import DroplessMoE

torch.set_num_threads(min(2, torch.get_num_threads()))

CFG = DBRXConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=16, moe_num_experts=8,
                 moe_top_k=2, vocab_size=50, max_seq_len=96, rope_theta=500.0, clip_qkv=1.0)
TOL = 1e-4


@pytest.fixture(scope="module")
def model(random_model) -> DBRX:
    return random_model(CFG, std=0.3).eval()


def dynamic_logits(model: DBRX, prompt: list[int], fed: list[int]) -> list[torch.Tensor]:
    """Last-position logits of the prompt, then after each token of `fed`, with the dynamic KVCache."""
    cache = KVCache(CFG, 1, len(prompt) + len(fed), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        out = [model(torch.tensor([prompt]), kv_cache=cache, last_logits_only=True).logits[0, -1]]
        for t in fed:
            out.append(model(torch.tensor([[t]]), kv_cache=cache, last_logits_only=True).logits[0, -1])
    return out


def test_static_cache_gives_the_dynamic_cache_logits_and_tokens(model):
    prompts = [[3, 14, 15, 9, 2, 6], [7, 1], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 1]]
    engine = DecodeEngine(model, slots=4, max_len=40, key_bucket=8)
    slots, prefill = [], []
    for p in prompts:
        slots.append(engine.admit(p))
        prefill.append(engine.last_logits[0].clone())
    fed: dict[int, list[int]] = {s: [] for s in slots}
    steps: dict[int, list[torch.Tensor]] = {s: [] for s in slots}
    for step in range(12):
        tokens = engine.step()
        for s, t in tokens.items():
            fed[s].append(t)
            if step > 0:                              # step 0 reports the prefill tokens
                steps[s].append(engine.last_logits[s].clone())
    for p, s, first in zip(prompts, slots, prefill):
        expected = dynamic_logits(model, p, fed[s][:-1])
        assert (first - expected[0]).abs().max() < TOL
        for got, want in zip(steps[s], expected[1:]):
            assert (got - want).abs().max() < TOL
        assert fed[s] == [int(l.argmax()) for l in expected]      # greedy tokens agree too


@pytest.mark.parametrize("budget", [8192, 12])        # one right-padded forward; groups of <= 12 tokens
def test_prompts_prefilled_together_equal_each_prefilled_alone(model, budget):
    prompts = [[3, 14, 15, 9, 2, 6], [7, 1], [40, 41, 42, 43, 44], [11]]
    alone = []
    for p in prompts:
        single = DecodeEngine(model, slots=1, max_len=40)
        slot = single.admit(p)
        first = single.last_logits[0].clone()
        alone.append((first, [single.step()[slot] for _ in range(6)]))
    engine = DecodeEngine(model, slots=4, max_len=40, max_prefill_tokens=budget)
    slots = engine.admit_many(prompts, [Sampling()] * len(prompts))
    if budget > 100:
        for row, (first, _) in enumerate(alone):
            assert (engine.last_logits[row] - first).abs().max() < TOL
    outputs = {s: [] for s in slots}
    for _ in range(6):
        for s, t in engine.step().items():
            outputs[s].append(t)
    assert [outputs[s] for s in slots] == [tokens for _, tokens in alone]


def test_a_released_slot_serves_the_next_sequence_as_if_fresh(model):
    engine = DecodeEngine(model, slots=2, max_len=40)
    alone = model.generate([[5, 6, 7]], max_new_tokens=8).tokens[0]
    long_slot = engine.admit([9] * 20)                # leaves 20+ stale positions in its slot
    for _ in range(6):
        engine.step()
    engine.release(long_slot)
    slot = engine.admit([5, 6, 7])
    assert slot == long_slot
    got = []
    while len(got) < 8:
        got.append(engine.step()[slot])
    assert got == alone


@pytest.mark.parametrize("tokens", [1, 2, 8, 16, 17, 24])   # 8 experts, k=2: gather (1), dense (2-16), sorted
def test_moe_decode_path_equals_the_training_forward(random_moe, tokens):
    moe: DroplessMoE = random_moe(CFG).eval()
    x = torch.randn(tokens, CFG.d_model)
    with torch.no_grad():
        expected, _ = moe(x)
        got = moe.decode(x)
    assert (got - expected).abs().max() < 1e-5


def test_a_decode_step_reads_nothing_back_to_the_host(model, monkeypatch):
    engine = DecodeEngine(model, slots=3, max_len=32)
    for p, temperature in (([1, 2, 3], 0.0), ([4, 5], 0.8)):
        engine.admit(p, Sampling(temperature=temperature, top_p=0.9, seed=1))
    engine.step()

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside a decode step")

    for name in ("item", "tolist", "__bool__", "nonzero", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    rows = engine._tokens[:2]
    with torch.no_grad():
        logits = engine.forward_step(rows, engine._pos[:2], key_len=32)
        sample_tokens(logits, engine._temp[:2], engine._top_p[:2], engine._top_k[:2], engine._seed[:2],
                      engine._count[:2])
    monkeypatch.undo()
    assert logits.shape == (2, CFG.vocab_size)


def test_sampling_depends_on_seed_and_token_index_only_not_on_the_batch(model):
    prompt = [4, 8, 15, 16]
    params = Sampling(temperature=1.2, top_p=0.95, seed=123)
    alone = DecodeEngine(model, slots=1, max_len=40)
    slot = alone.admit(prompt, params)
    expected = [alone.step()[slot] for _ in range(10)]
    crowded = DecodeEngine(model, slots=4, max_len=40)
    crowded.admit([1, 2, 3], Sampling(temperature=0.7, seed=5))
    crowded.admit([9, 9], Sampling())
    slot = crowded.admit(prompt, params)               # another slot, other neighbours
    assert slot == 2
    assert [crowded.step()[slot] for _ in range(10)] == expected
    other = DecodeEngine(model, slots=1, max_len=40)
    s = other.admit(prompt, Sampling(temperature=1.2, top_p=0.95, seed=124))
    assert [other.step()[s] for _ in range(10)] != expected


def test_sample_tokens_follows_the_distribution_and_its_filters():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 4000
    logits = probs.log().expand(n, 4)
    seeds = torch.arange(n)
    zeros = torch.zeros(n, dtype=torch.long)
    one = torch.ones(n)
    drawn = sample_tokens(logits, one, one, zeros, seeds, zeros)
    freq = torch.bincount(drawn, minlength=4).float() / n
    assert (freq - probs).abs().max() < 0.03                              # 4000 draws: sd < 0.008
    nucleus = sample_tokens(logits, one, torch.full((n,), 0.8), zeros, seeds, zeros)
    assert set(nucleus.tolist()) == {0, 1}
    top2 = sample_tokens(logits, one, one, torch.full((n,), 2), seeds, zeros)
    assert set(top2.tolist()) == {0, 1}
    greedy = sample_tokens(logits, torch.zeros(n), one, zeros, seeds, zeros)
    assert set(greedy.tolist()) == {0}
    u = counter_uniforms(torch.tensor([7, 7, 8]), torch.tensor([0, 1, 0]), 1000)
    assert 0 < float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.03
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])


def test_the_engine_refuses_what_it_cannot_hold(model):
    engine = DecodeEngine(model, slots=1, max_len=16)
    with pytest.raises(ValueError, match="no room"):
        engine.admit([1] * 16)
    engine.admit([1, 2])
    with pytest.raises(RuntimeError, match="slots are taken"):
        engine.admit([3])
    with pytest.raises(ValueError, match="max_seq_len"):
        DecodeEngine(model, slots=1, max_len=CFG.max_seq_len + 1)


def test_a_failed_prefill_admits_none_and_keeps_every_slot(model, monkeypatch):
    engine = DecodeEngine(model, slots=3, max_len=16)
    kept = engine.admit([1, 2])

    def out_of_memory(*args):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine, "_prefill", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.admit_many([[3], [4, 5]], [Sampling(), Sampling()])
    assert engine.free_slots == 2 and engine.active == 1
    monkeypatch.undo()
    assert set(engine.step()) == {kept}                 # the admitted one carries on alone
    assert engine.admit([3]) != kept


def _decode_all(engine: DecodeEngine, prompts, samplings, steps: int) -> dict[int, list[int]]:
    """Admit the prompts one step apart (so rows and lengths differ) and decode; slot -> tokens."""
    out: dict[int, list[int]] = {}
    pending = list(zip(prompts, samplings))
    for _ in range(steps):
        if pending:
            prompt, sampling = pending.pop(0)
            out[engine.admit(prompt, sampling)] = []
        for slot, token in engine.step().items():
            out[slot].append(token)
    return out


def test_power_of_two_buckets_decode_the_same_tokens(model):
    """CUDA graphs replay steps padded to power-of-two rows and key lengths: the padding rows
    decode into their own unused slots and the padding keys are masked, so nothing changes."""
    prompts = [[3, 14, 15], [7, 1, 8, 2, 8, 1, 8], [40, 41], [5] * 9, [9, 9, 8]]
    samplings = [Sampling(), Sampling(temperature=0.9, seed=5), Sampling(), Sampling(temperature=1.2, top_p=0.8,
                                                                                      seed=11), Sampling()]
    fine = DecodeEngine(model, slots=6, max_len=64, key_bucket=8, pow2_buckets=False)
    padded = DecodeEngine(model, slots=6, max_len=64, key_bucket=8, pow2_buckets=True)
    assert padded.bucket(3, 9) == (4, 16) and padded.bucket(6, 60) == (6, 64) and fine.bucket(3, 9) == (3, 16)
    assert _decode_all(fine, prompts, samplings, 20) == _decode_all(padded, prompts, samplings, 20)


def test_cuda_graphs_are_refused_off_a_gpu(model):
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        DecodeEngine(model, slots=2, max_len=16, cuda_graphs=True)
    assert not DecodeEngine(model, slots=2, max_len=16).cuda_graphs
