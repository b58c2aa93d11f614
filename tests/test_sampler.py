"""Sampler: greedy, temperature, top-k/p, min-p, penalties, min_tokens, seeds, logprobs.

Statistical tests use fixed seeds, so they are deterministic; their bounds are several standard
errors wide, and each also checks that the wrong distribution would be rejected.
"""
import math

import pytest
import torch

from loom.sampler import (Sampler, SamplingRow, apply_min_p, apply_penalties,
                          apply_top_k_top_p)
from loom.sampling_params import SamplingParams
from loom import sampler

VOCAB = 6
EOS = 5


def row(generator=None, prompt=(), output=(), eos=(EOS,), **kw) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), generator, list(prompt), list(output),
                       frozenset(eos))


def seeded(seed: int, **kw) -> SamplingRow:
    return row(torch.Generator().manual_seed(seed), **kw)


def draw(probs: list[float], num: int = 20000, seed: int = 0, **kw) -> torch.Tensor:
    """Sample ``num`` times (one batch) from logits log(probs); returns the token frequencies."""
    torch.manual_seed(seed)
    logits = torch.tensor(probs).log().expand(num, -1)
    tokens, _ = Sampler()(logits, [row(**kw) for _ in range(num)])
    return torch.bincount(torch.tensor(tokens), minlength=len(probs)).float() / num


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    """Total-variation distance between two distributions."""
    return 0.5 * (torch.as_tensor(p) - torch.as_tensor(q)).abs().sum().item()


def renormalized(probs: list[float], keep: list[int]) -> torch.Tensor:
    p = torch.tensor(probs)
    mask = torch.zeros_like(p, dtype=torch.bool)
    mask[keep] = True
    p = p.masked_fill(~mask, 0)
    return p / p.sum()


# ---------------------------------------------------------------- greedy and temperature

def test_greedy_is_argmax_any_dtype():
    torch.manual_seed(0)
    logits = torch.randn(8, 50)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = logits.to(dtype)
        tokens, logprobs = Sampler()(x, [row(temperature=0.0) for _ in range(8)])
        assert tokens == x.float().argmax(-1).tolist()
        assert logprobs == [None] * 8
    # The slow path (logprobs requested) picks the same tokens.
    tokens, _ = Sampler()(logits, [row(temperature=0.0, logprobs=1) for _ in range(8)])
    assert tokens == logits.argmax(-1).tolist()


def test_sampler_leaves_input_logits_alone():
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    rows = [row(temperature=0.7, top_k=2, top_p=0.5, min_p=0.1),
            row(temperature=0.0, repetition_penalty=2.0, prompt=[0, 1], min_tokens=2),
            row(temperature=1.0, frequency_penalty=1.0, output=[2], logprobs=3)]
    Sampler()(logits, rows)
    assert torch.equal(logits, before)


def test_empty_batch():
    assert Sampler()(torch.zeros(0, VOCAB), []) == ([], [])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies_match_softmax(temperature):
    probs = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]
    freq = draw(probs, temperature=temperature)
    expected = (torch.tensor(probs).log() / temperature).softmax(-1)
    assert tv(freq, expected) < 0.015
    if temperature != 1.0:  # the test tells temperatures apart
        assert tv(freq, torch.tensor(probs)) > 0.05


def test_temperature_chi_square():
    probs = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]
    num = 20000
    counts = draw(probs, num=num, seed=1, temperature=0.8) * num
    expected = (torch.tensor(probs).log() / 0.8).softmax(-1) * num
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5  # 5 degrees of freedom: p = 0.001


# ---------------------------------------------------------------- top-k, top-p, min-p

PROBS = [0.05, 0.3, 0.03, 0.5, 0.12]   # order by prob: 3, 1, 4, 0, 2


def test_top_k_mask_exact():
    x = torch.tensor(PROBS).log().repeat(4, 1)
    apply_top_k_top_p(x, [1, 2, 3, 0], [1.0] * 4)
    kept = [torch.isfinite(r).nonzero().flatten().tolist() for r in x]
    assert kept == [[3], [1, 3], [1, 3, 4], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("k,support", [(1, [3]), (2, [1, 3]), (3, [1, 3, 4])])
def test_top_k_samples_only_the_k_largest(k, support):
    freq = draw(PROBS, num=5000, top_k=k)
    assert sorted(freq.nonzero().flatten().tolist()) == support
    assert tv(freq, renormalized(PROBS, support)) < 0.03


def test_top_p_mask_is_smallest_sufficient_set():
    # Cumulative in sorted order: 0.5, 0.8, 0.92, 0.97, 1.0.
    cases = [(0.1, [3]), (0.49, [3]), (0.51, [1, 3]), (0.79, [1, 3]),
             (0.81, [1, 3, 4]), (0.95, [0, 1, 3, 4]), (1.0, [0, 1, 2, 3, 4])]
    x = torch.tensor(PROBS).log().repeat(len(cases), 1)
    apply_top_k_top_p(x, [0] * len(cases), [p for p, _ in cases])
    kept = [torch.isfinite(r).nonzero().flatten().tolist() for r in x]
    assert kept == [support for _, support in cases]


def test_top_p_reaching_the_threshold_exactly_is_enough():
    # Uniform over 4: probs and their sums are exact in float32; ties keep the lower ids.
    x = torch.zeros(3, 4)
    apply_top_k_top_p(x, [0, 0, 0], [0.25, 0.5, 0.75])
    kept = [torch.isfinite(r).nonzero().flatten().tolist() for r in x]
    assert kept == [[0], [0, 1], [0, 1, 2]]


@pytest.mark.parametrize("p,support", [(0.3, [3]), (0.7, [1, 3]), (0.85, [1, 3, 4])])
def test_top_p_samples_only_the_nucleus(p, support):
    freq = draw(PROBS, num=5000, top_p=p)
    assert sorted(freq.nonzero().flatten().tolist()) == support
    assert tv(freq, renormalized(PROBS, support)) < 0.03


def test_min_p_mask_exact():
    probs = torch.tensor(PROBS).repeat(3, 1)
    apply_min_p(probs, [0.0, 0.2, 0.5])     # thresholds 0, 0.1, 0.25
    kept = [r.nonzero().flatten().tolist() for r in probs]
    assert kept == [[0, 1, 2, 3, 4], [1, 3, 4], [1, 3]]


def test_min_p_samples_only_above_threshold():
    freq = draw(PROBS, num=5000, min_p=0.2)
    assert sorted(freq.nonzero().flatten().tolist()) == [1, 3, 4]
    assert tv(freq, renormalized(PROBS, [1, 3, 4])) < 0.03


def test_top_p_applies_to_the_top_k_distribution():
    probs = [0.1, 0.4, 0.2, 0.3]
    # top-k 3 -> 0.444, 0.333, 0.222; top-p 0.75 then keeps 2 (on the raw probs it would keep 3).
    freq = draw(probs, num=3000, top_k=3, top_p=0.75)
    assert sorted(freq.nonzero().flatten().tolist()) == [1, 3]


def test_top_p_applies_after_temperature():
    probs = [0.6, 0.3, 0.1]
    assert sorted(draw(probs, num=3000, top_p=0.85).nonzero().flatten().tolist()) == [0, 1]
    # T=3 flattens to 0.427, 0.339, 0.235: the nucleus grows to all three.
    freq = draw(probs, num=3000, temperature=3.0, top_p=0.85)
    assert sorted(freq.nonzero().flatten().tolist()) == [0, 1, 2]


def test_mixed_batch_uses_each_rows_params():
    torch.manual_seed(0)
    logits = torch.tensor(PROBS).log().expand(1200, -1)
    kinds = [dict(temperature=0.0), dict(top_k=1), dict(top_k=2), dict(top_p=0.7),
             dict(min_p=0.2), dict()]
    rows = [row(**kinds[i % len(kinds)]) for i in range(1200)]
    tokens, _ = Sampler()(logits, rows)
    support = [set() for _ in kinds]
    for i, t in enumerate(tokens):
        support[i % len(kinds)].add(t)
    assert support == [{3}, {3}, {1, 3}, {1, 3}, {1, 3, 4}, {0, 1, 2, 3, 4}]


# ---------------------------------------------------------------- penalties

LOGITS = [2.0, -1.0, 0.5, -0.5, 3.0, 0.0]
PROMPT, OUTPUT = [0, 1], [2, 2, 3]


@pytest.mark.parametrize("kw,expected", [
    # Repetition: seen in prompt or output -> positive / 2, negative * 2.
    (dict(repetition_penalty=2.0), [1.0, -2.0, 0.25, -1.0, 3.0, 0.0]),
    # Frequency: output only, times the count (token 2 twice, token 3 once).
    (dict(frequency_penalty=0.5), [2.0, -1.0, -0.5, -1.0, 3.0, 0.0]),
    # Presence: output only, once.
    (dict(presence_penalty=0.3), [2.0, -1.0, 0.2, -0.8, 3.0, 0.0]),
    # All three: repetition first, then frequency and presence.
    (dict(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.3),
     [1.0, -2.0, -1.05, -1.8, 3.0, 0.0]),
    # Negative frequency/presence reward repeats.
    (dict(frequency_penalty=-1.0, presence_penalty=-0.5), [2.0, -1.0, 3.0, 1.0, 3.0, 0.0]),
])
def test_penalties_match_hand_computation(kw, expected):
    x = torch.tensor([LOGITS, LOGITS])
    rows = [row(prompt=PROMPT, output=OUTPUT, **kw), row(prompt=PROMPT, output=OUTPUT)]
    apply_penalties(x, rows)
    torch.testing.assert_close(x[0], torch.tensor(expected), rtol=0, atol=1e-6)
    assert x[1].tolist() == LOGITS  # a row without penalties is untouched


def test_penalties_with_empty_history_change_nothing():
    x = torch.tensor([LOGITS])
    apply_penalties(x, [row(repetition_penalty=3.0, frequency_penalty=1.0, presence_penalty=1.0)])
    assert x[0].tolist() == LOGITS


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([LOGITS])
    assert Sampler()(logits, [row(temperature=0.0, output=[4])])[0] == [4]
    assert Sampler()(logits, [row(temperature=0.0, output=[4], repetition_penalty=2.0)])[0] == [0]
    assert Sampler()(logits, [row(temperature=0.0, output=[4], presence_penalty=1.5)])[0] == [0]


# ---------------------------------------------------------------- min_tokens

def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 1.0, 2.0, 4.0, 0.5, 5.0]])   # eos 5, then stop id 3, then 2
    for ignore_eos in (False, True):
        def pick(num_out, min_tokens=2, stop=(3,)):
            r = row(temperature=0.0, output=[1] * num_out, min_tokens=min_tokens,
                    stop_token_ids=list(stop), ignore_eos=ignore_eos)
            return Sampler()(logits, [r])[0][0]
        assert pick(0) == 2 and pick(1) == 2
        assert pick(2) == 5 and pick(3) == 5
        assert pick(0, min_tokens=0) == 5
        assert pick(0, stop=()) == 3


def test_min_tokens_masks_several_eos_ids_when_sampling():
    torch.manual_seed(0)
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 3.0, 3.0]]).expand(2000, -1)
    rows = [row(output=[0] * (i % 3), min_tokens=2, eos=(4, 5), stop_token_ids=[0])
            for i in range(2000)]
    tokens, _ = Sampler()(logits, rows)
    blocked = {t for i, t in enumerate(tokens) if i % 3 < 2}
    free = {t for i, t in enumerate(tokens) if i % 3 == 2}
    assert blocked == {1, 2, 3}
    assert free == {0, 1, 2, 3, 4, 5}


# ---------------------------------------------------------------- seeds

STEPS = 8
STEP_LOGITS = torch.randn(STEPS, 64, generator=torch.Generator().manual_seed(7))


def generate(seed: int, position: int, others: list[dict], global_seed: int) -> list[int]:
    """Decode STEPS tokens for one seeded row placed at ``position`` among ``others``."""
    torch.manual_seed(global_seed)
    target = torch.Generator().manual_seed(seed)
    other_gens = [torch.Generator().manual_seed(o["seed"]) if "seed" in o else None
                  for o in others]
    out = []
    for step in range(STEPS):
        rows = [row(g, **{k: v for k, v in o.items() if k != "seed"})
                for o, g in zip(others, other_gens)]
        rows.insert(position, row(target, output=list(out), top_p=0.95, temperature=1.3))
        logits = torch.randn(len(rows), 64)
        logits[position] = STEP_LOGITS[step]
        tokens, _ = Sampler()(logits, rows)
        out.append(tokens[position])
    return out


OTHERS = [dict(), dict(seed=1), dict(temperature=0.0), dict(seed=2, top_k=5),
          dict(top_p=0.5, logprobs=2), dict(seed=3, repetition_penalty=1.5, output=[1, 2])]


def test_seed_gives_same_tokens_whatever_the_batch():
    alone = generate(1234, 0, [], global_seed=0)
    assert len(set(alone)) > 1
    for position in (0, 3, len(OTHERS)):
        for global_seed in (1, 2):
            assert generate(1234, position, OTHERS, global_seed) == alone
    assert generate(1234, 1, OTHERS[:2], global_seed=3) == alone


def test_different_seeds_differ():
    runs = {tuple(generate(seed, 0, OTHERS[:1], global_seed=0)) for seed in range(5)}
    assert len(runs) == 5


def test_unseeded_rows_follow_the_global_rng():
    assert generate(0, 0, [], 0) == generate(0, 0, [], 1)   # seeded: global RNG ignored
    logits = STEP_LOGITS[:1].expand(32, -1)
    torch.manual_seed(5)
    a = Sampler()(logits, [row() for _ in range(32)])[0]
    torch.manual_seed(5)
    b = Sampler()(logits, [row() for _ in range(32)])[0]
    c = Sampler()(logits, [row() for _ in range(32)])[0]
    assert a == b and a != c


def test_seeded_rows_have_the_right_distribution():
    probs = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]
    num = 4000
    logits = torch.tensor(probs).log().expand(num, -1)
    tokens, _ = Sampler()(logits, [seeded(s, temperature=0.5) for s in range(num)])
    freq = torch.bincount(torch.tensor(tokens), minlength=VOCAB).float() / num
    expected = (torch.tensor(probs).log() / 0.5).softmax(-1)
    assert tv(freq, expected) < 0.03
    assert tv(freq, torch.tensor(probs)) > 0.1


# ---------------------------------------------------------------- logprobs

def check_logprobs(raw: torch.Tensor, token: int, entry, n: int) -> None:
    ref = torch.log_softmax(raw.float(), dim=-1)
    assert entry.sampled_token_id == token
    assert abs(entry.sampled_logprob - ref[token].item()) <= 1e-6
    assert entry.sampled_rank == 1 + int((ref > ref[token]).sum())
    top_lp, top_ids = ref.topk(n)
    assert entry.top_token_ids == top_ids.tolist()
    assert len(entry.top_logprobs) == n
    assert entry.top_logprobs == sorted(entry.top_logprobs, reverse=True)
    torch.testing.assert_close(torch.tensor(entry.top_logprobs), top_lp, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_raw_log_softmax(dtype):
    torch.manual_seed(0)
    raw = (torch.randn(6, 40) * 3).to(dtype)
    specs = [dict(temperature=0.0, logprobs=5), dict(logprobs=0), dict(),
             dict(temperature=0.3, top_k=4, logprobs=20),
             dict(repetition_penalty=1.8, presence_penalty=2.0, output=[1, 2, 3], logprobs=3),
             dict(temperature=0.0, logprobs=1, min_tokens=3, eos=[7])]
    tokens, logprobs = Sampler()(raw, [row(**s) for s in specs])
    assert logprobs[2] is None
    for i, s in enumerate(specs):
        if s.get("logprobs") is not None:
            assert len(logprobs[i]) == 1
            check_logprobs(raw[i], tokens[i], logprobs[i][0], s["logprobs"])
    assert logprobs[0][0].sampled_rank == 1
    assert logprobs[1][0].top_token_ids == [] and logprobs[1][0].top_logprobs == []


def test_logprobs_unaffected_by_temperature_and_penalties():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    base = Sampler()(logits, [row(temperature=0.0, logprobs=3)])[1][0][0]
    assert base.sampled_rank == 1
    # Penalties move the greedy pick to token 1: its raw logprob and rank 2 are reported.
    tokens, lp = Sampler()(logits, [row(temperature=0.0, logprobs=3, output=[0],
                                        repetition_penalty=10.0)])
    assert tokens == [1]
    check_logprobs(logits[0], 1, lp[0][0], 3)
    assert lp[0][0].sampled_rank == 2
    assert lp[0][0].top_logprobs == base.top_logprobs
    # Temperature does not rescale the reported logprobs.
    torch.manual_seed(0)
    tokens, lp = Sampler()(logits, [row(temperature=5.0, logprobs=3)])
    check_logprobs(logits[0], tokens[0], lp[0][0], 3)
    assert lp[0][0].top_logprobs == base.top_logprobs


# ---------------------------------------------------------------- SamplingParams validation

@pytest.mark.parametrize("kw,field", [
    (dict(n=0), "n"), (dict(n=1.5), "n"),
    (dict(temperature=-0.1), "temperature"), (dict(temperature="1"), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.1), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(min_p=-0.1), "min_p"), (dict(min_p=1.1), "min_p"),
    (dict(presence_penalty=2.1), "presence_penalty"),
    (dict(frequency_penalty=-2.1), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=2.0), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens"),
    (dict(logprobs=-1), "logprobs"), (dict(logprobs=21), "logprobs"),
    (dict(stop=[""]), "stop"), (dict(stop=[1]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(stop_token_ids=["a"]), "stop_token_ids"),
    (dict(seed=1.5), "seed"), (dict(seed="7"), "seed"),
])
def test_invalid_sampling_params_name_the_field(kw, field):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kw)
    assert str(err.value).startswith(f"{field}:")


def test_valid_sampling_params_are_normalized():
    p = SamplingParams(top_k=-1, stop="###", temperature=0, min_tokens=4, max_tokens=4, seed=0)
    assert p.top_k == 0 and p.stop == ["###"] and p.greedy
    assert not p.needs_penalties and SamplingParams(presence_penalty=0.1).needs_penalties
    assert math.isclose(SamplingParams(top_p=1).top_p, 1.0)


def check_two_pass_argmax(dtype, vocab, device):
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(6, vocab, generator=gen).to(dtype)
    x[1] = x[1].round()                                  # many ties everywhere
    x[2, 5], x[2, vocab - 1] = 100.0, 100.0              # tie across the first and last slice
    x[3, 130], x[3, 131] = 100.0, 100.0                  # tie inside one slice
    x[4] = -torch.inf
    x[5, 7], x[5, 3000 % vocab] = torch.nan, torch.nan
    x = x.to(device)
    assert torch.equal(sampler.argmax(x), x.argmax(dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [128256, 4096, 1000, 2048 + 128])
def test_two_pass_argmax_is_argmax_with_ties(dtype, vocab):
    """The first index of the largest value, as x.argmax(-1): ties inside a slice and across
    slices, rows of -inf, a NaN (argmax takes the first NaN), coarse bf16 values."""
    check_two_pass_argmax(dtype, vocab, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_pass_argmax_on_gpu(dtype):
    check_two_pass_argmax(dtype, 128256, "cuda")
