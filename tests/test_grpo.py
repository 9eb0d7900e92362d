"""Tests of the GRPO tensor functions against values worked out by hand (the arithmetic is in comments)."""

from __future__ import annotations

import math

import pytest
import torch

from grpodx.algo import grpo
from grpodx.algo.grpo import (
    gradient_noise_estimates,
    group_advantages,
    kl_penalty,
    kl_per_sequence,
    loss_denominator,
    micro_batches,
    policy_loss,
    sequence_logprobs,
    sequence_weights,
    zero_advantage_groups,
)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# --------------------------------------------------------------------------------------------------------
# group_advantages / zero_advantage_groups
# --------------------------------------------------------------------------------------------------------

REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])


def test_group_advantages_grpo_by_hand():
    # Group 1: mean = 1/4 = 0.25; deviations 0.75, -0.25, -0.25, -0.25.
    # Population variance = (0.75^2 + 3 * 0.25^2) / 4 = (0.5625 + 0.1875) / 4 = 0.1875,
    # std = sqrt(0.1875) = 0.4330127 = sqrt(3) / 4.
    # Advantages: 0.75 / (sqrt(3)/4) = 3/sqrt(3) = sqrt(3) = 1.7320508; -0.25 / (sqrt(3)/4) = -1/sqrt(3).
    # Group 2: every reward equals the mean, so all advantages are 0 (0 / (0 + eps) = 0).
    s3 = math.sqrt(3.0)
    expected = [s3, -1 / s3, -1 / s3, -1 / s3, 0.0, 0.0, 0.0, 0.0]
    close(group_advantages(REWARDS, 4, eps=0.0)[:4], expected[:4])
    adv = group_advantages(REWARDS, 4)
    # Default eps = 1e-6 shifts the result only in the sixth decimal.
    close(adv, expected, atol=1e-5)
    assert torch.all(adv[4:] == 0.0)
    # Advantages of a group sum to zero: the group mean is the baseline.
    close(adv[:4].sum(), 0.0)


def test_group_advantages_dr_grpo_by_hand():
    # Dr.GRPO keeps only the centring: r - mean = [0.75, -0.25, -0.25, -0.25] and [0, 0, 0, 0].
    adv = group_advantages(REWARDS, 4, scale_by_std=False)
    close(adv, [0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0])


def test_group_advantages_population_std_for_group_of_two():
    # [1, 0]: mean 0.5, deviations +-0.5, population std = sqrt((0.25 + 0.25) / 2) = 0.5 -> advantages +-1.
    # (The sample std would be sqrt(0.5) = 0.7071 and give +-0.7071.)
    close(group_advantages(torch.tensor([1.0, 0.0, 3.0, 1.0]), 2, eps=0.0), [1.0, -1.0, 1.0, -1.0])


def test_group_advantages_integer_rewards_become_float():
    adv = group_advantages(torch.tensor([1, 0, 0, 0]), 4, scale_by_std=False)
    assert adv.is_floating_point()
    close(adv, [0.75, -0.25, -0.25, -0.25])


@pytest.mark.parametrize(
    ("rewards", "group_size", "message"),
    [
        (torch.zeros(7), 4, "multiple of group_size"),
        (torch.zeros(4), 1, "group_size must be >= 2"),
        (torch.zeros(4), 0, "group_size must be >= 2"),
        (torch.zeros(2, 4), 4, "1-D"),
    ],
)
def test_group_advantages_bad_sizes_raise(rewards, group_size, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(rewards, group_size)
    with pytest.raises(ValueError, match=message):
        zero_advantage_groups(rewards, group_size)


def test_zero_advantage_groups():
    # Groups: [1,0,0,0] mixed; [0.5]*4 equal; [0]*4 equal; [1, 1, 1, 1 + 1e-3] differs by more than atol.
    rewards = torch.tensor([1.0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5, 0, 0, 0, 0, 1, 1, 1, 1.001])
    assert zero_advantage_groups(rewards, 4).tolist() == [False, True, True, False]
    # A generous atol makes the last group count as flat.
    assert zero_advantage_groups(rewards, 4, atol=1e-2).tolist() == [False, True, True, True]


# --------------------------------------------------------------------------------------------------------
# sequence_logprobs
# --------------------------------------------------------------------------------------------------------


def _hand_logits() -> tuple[torch.Tensor, torch.Tensor]:
    # V = 3, T = 3, B = 1; input_ids = [2, 0, 1].
    # logits[0] = [0, 0, ln 2]  -> exp = [1, 1, 2], predicts token 0 at position 1.
    # logits[1] = [ln 3, 0, 0]  -> exp = [3, 1, 1], predicts token 1 at position 2.
    # logits[2] = anything: it predicts past the end and must be ignored.
    logits = torch.tensor([[[0.0, 0.0, math.log(2)], [math.log(3), 0.0, 0.0], [50.0, -50.0, 7.0]]])
    return logits, torch.tensor([[2, 0, 1]])


def test_sequence_logprobs_by_hand():
    logits, ids = _hand_logits()
    # Position 1: p(0) = 1 / (1 + 1 + 2) = 1/4 -> -ln 4.  Position 2: p(1) = 1 / (3 + 1 + 1) = 1/5 -> -ln 5.
    out = sequence_logprobs(logits, ids)
    assert out.shape == (1, 3) and out.dtype == torch.float32
    close(out, [[0.0, -math.log(4), -math.log(5)]])


def test_sequence_logprobs_temperature_two_by_hand():
    logits, ids = _hand_logits()
    before = logits.clone()
    # Divide logits by 2: position 1 -> [0, 0, ln2 / 2], exp = [1, 1, sqrt 2], p(0) = 1 / (2 + sqrt 2).
    # Position 2 -> [ln3 / 2, 0, 0], exp = [sqrt 3, 1, 1], p(1) = 1 / (2 + sqrt 3).
    out = sequence_logprobs(logits, ids, temperature=2.0)
    close(out, [[0.0, -math.log(2 + math.sqrt(2)), -math.log(2 + math.sqrt(3))]])
    # The temperature division happens on a copy, never in the caller's logits.
    assert torch.equal(logits, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_logprobs_matches_log_softmax_and_grads(dtype, temperature):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=gen) * 3).to(dtype).requires_grad_(True)
    ids = torch.randint(0, 11, (3, 5), generator=gen)
    ref_logits = logits.detach().float().requires_grad_(True)

    out = sequence_logprobs(logits, ids, temperature)
    naive = torch.log_softmax(ref_logits[:, :-1] / temperature, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    assert out.dtype == torch.float32
    close(out[:, 1:], naive.detach(), atol=1e-5)
    assert torch.all(out[:, 0] == 0.0)

    weights = torch.randn(3, 5, generator=gen)
    (out * weights).sum().backward()
    (naive * weights[:, 1:]).sum().backward()
    # float32: two orders of the same arithmetic, 1.1e-6 apart on one CPU; a wrong temperature factor or
    # target would be off by 1e-2 or more.
    close(logits.grad.float(), ref_logits.grad, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    # The last position's logits predict nothing, so they get no gradient.
    assert torch.all(logits.grad[:, -1] == 0)


def test_sequence_logprobs_rejects_bad_input():
    logits, ids = _hand_logits()
    with pytest.raises(ValueError, match="temperature"):
        sequence_logprobs(logits, ids, temperature=0.0)
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        sequence_logprobs(logits, ids[:, :2])


# --------------------------------------------------------------------------------------------------------
# policy_loss
# --------------------------------------------------------------------------------------------------------

NEG_INF = float("-inf")
NAN = float("nan")


def _lp(ratios: list[list[float]], behaviour: float = -1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs with the given ratios against a constant behaviour log-prob (NaN ratio -> garbage)."""
    behaviour_lp = torch.full((len(ratios), len(ratios[0])), behaviour)
    logprobs = behaviour_lp + torch.log(torch.tensor(ratios))
    return logprobs, behaviour_lp


def _hand_case():
    # Sequence 0, A = +1: [masked, r=1.5, r=1.0, r=0.5]
    # Sequence 1, A = -1: [masked, r=0.5, r=1.1, masked]
    logprobs, behaviour = _lp([[1.0, 1.5, 1.0, 0.5], [1.0, 0.5, 1.1, 1.0]])
    logprobs[0, 0] = NEG_INF  # a prompt token whose log-prob came out -inf
    behaviour[0, 0] = NEG_INF  # -inf - -inf = NaN, which must stay out of the loss
    logprobs[1, 0] = NAN  # garbage
    logprobs[1, 3] = 50.0  # padding garbage: ratio would be exp(51)
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
    return logprobs.requires_grad_(True), behaviour, torch.tensor([1.0, -1.0]), mask


def test_policy_loss_by_hand():
    logprobs, behaviour, adv, mask = _hand_case()
    loss, stats = policy_loss(logprobs, behaviour, adv, mask)
    # clip range [1 - 0.2, 1 + 0.28] = [0.8, 1.28]; per token = -min(r * A, clip(r) * A):
    #   seq0 r=1.5, A=+1: -min(1.5, 1.28) = -1.28   (clipped high)
    #   seq0 r=1.0, A=+1: -min(1.0, 1.0)  = -1.0    (unclipped)
    #   seq0 r=0.5, A=+1: -min(0.5, 0.8)  = -0.5    (unclipped: the min keeps the pessimistic 0.5)
    #   seq1 r=0.5, A=-1: -min(-0.5, -0.8) = 0.8    (clipped low)
    #   seq1 r=1.1, A=-1: -min(-1.1, -1.1) = 1.1    (unclipped)
    # sum = -1.28 - 1.0 - 0.5 + 0.8 + 1.1 = -0.88 over 5 loss tokens -> -0.176.
    assert torch.isfinite(loss)
    close(loss, -0.176)
    close(stats["tokens"], 5.0)
    close(stats["clip_fraction"], 2 / 5)  # the r=1.5 and the A<0, r=0.5 tokens
    close(stats["ratio_mean"], (1.5 + 1.0 + 0.5 + 0.5 + 1.1) / 5)  # = 4.6 / 5 = 0.92
    close(stats["ratio_max"], 1.5)
    close(stats["masked_by_cap"], 0.0)
    assert all(not s.requires_grad for s in stats.values())

    loss.backward()
    # d/dlogp of -r * A / n is -r * A / n on unclipped tokens; clipped tokens sit on a flat piece -> 0:
    #   seq0: [masked 0, clipped 0, -1.0 * 1 / 5 = -0.2, -0.5 * 1 / 5 = -0.1]
    #   seq1: [masked 0, clipped 0, -1.1 * -1 / 5 = 0.22, masked 0]
    close(logprobs.grad, [[0.0, 0.0, -0.2, -0.1], [0.0, 0.0, 0.22, 0.0]])
    assert torch.all(logprobs.grad[mask == 0] == 0)


def test_policy_loss_ignores_values_at_masked_positions():
    logprobs, behaviour, adv, mask = _hand_case()
    loss, _ = policy_loss(logprobs, behaviour, adv, mask)
    other = logprobs.detach().clone()
    other[0, 0], other[1, 0], other[1, 3] = -3.0, 7.0, NEG_INF
    loss_other, _ = policy_loss(other, behaviour, adv, mask)
    assert loss.item() == loss_other.item()


def test_policy_loss_gradient_does_not_reach_behaviour_or_advantages():
    logprobs, behaviour, adv, mask = _hand_case()
    behaviour = behaviour.clone().requires_grad_(True)
    adv = adv.clone().requires_grad_(True)
    loss, _ = policy_loss(logprobs, behaviour, adv, mask)
    loss.backward()
    assert behaviour.grad is None and adv.grad is None


def _random_batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    behaviour = -torch.rand(4, 6, generator=gen) * 3
    logprobs = behaviour + torch.randn(4, 6, generator=gen) * 0.4
    adv = torch.randn(4, generator=gen)
    mask = (torch.rand(4, 6, generator=gen) > 0.4).long()
    mask[:, 0] = 0
    logprobs[mask == 0] = NEG_INF
    return logprobs, behaviour, adv, mask


@pytest.mark.parametrize("ratio_cap", [None, 2.0])
def test_policy_loss_micro_batches_match_full_batch(ratio_cap):
    logprobs, behaviour, adv, mask = _random_batch()
    full_lp = logprobs.clone().requires_grad_(True)
    full, _ = policy_loss(full_lp, behaviour, adv, mask, ratio_cap=ratio_cap)
    full.backward()

    split_lp = logprobs.clone().requires_grad_(True)
    n = float(mask.sum())  # loss tokens of the whole batch
    total = torch.zeros(())
    for rows in (slice(0, 1), slice(1, 4)):  # unequal halves: a plain per-micro-batch mean would differ
        part, _ = policy_loss(
            split_lp[rows], behaviour[rows], adv[rows], mask[rows], num_tokens=n, ratio_cap=ratio_cap
        )
        part.backward()
        total = total + part.detach()
    close(total, full.detach())
    close(split_lp.grad, full_lp.grad)
    assert torch.isfinite(full_lp.grad).all()


def test_policy_loss_per_micro_batch_mean_would_differ():
    # Guards the test above: without the whole-batch num_tokens, the sum of micro-batch means is not the
    # full-batch token-mean, so the equality there is really about num_tokens.
    logprobs, behaviour, adv, mask = _random_batch()
    full, _ = policy_loss(logprobs, behaviour, adv, mask)
    parts = [policy_loss(logprobs[r], behaviour[r], adv[r], mask[r])[0] for r in (slice(0, 1), slice(1, 4))]
    assert abs(float(sum(parts)) - float(full)) > 1e-3


def test_policy_loss_ratio_cap_masks_and_counts():
    # One sequence, A = +1, ratios [3.0, 1.0, 0.4, 1.2], cap 2 -> keep ratios within [0.5, 2].
    logprobs, behaviour = _lp([[3.0, 1.0, 0.4, 1.2]])
    logprobs.requires_grad_(True)
    adv, mask = torch.tensor([1.0]), torch.ones(1, 4)
    loss, stats = policy_loss(logprobs, behaviour, adv, mask, ratio_cap=2.0)
    # 3.0 > 2 and 0.4 < 0.5 are dropped. Kept: r=1.0 -> -1.0, r=1.2 (< 1.28, unclipped) -> -1.2.
    # The denominator stays the 4 loss tokens: (-1.0 - 1.2) / 4 = -0.55.
    close(loss, -0.55)
    close(stats["masked_by_cap"], 2.0)
    close(stats["tokens"], 4.0)
    close(stats["clip_fraction"], 0.0)  # neither kept token is clipped
    close(stats["ratio_max"], 3.0)  # ratio stats see the capped tokens too
    loss.backward()
    # Gradient -r * A / 4 on the kept tokens: -1.0 / 4 = -0.25, -1.2 / 4 = -0.3; capped tokens get none.
    close(logprobs.grad, [[0.0, -0.25, 0.0, -0.3]])

    # Without the cap: 3.0 is clipped to 1.28 -> -1.28, 0.4 -> -0.4 (A > 0 keeps the lower value):
    # (-1.28 - 1.0 - 0.4 - 1.2) / 4 = -3.88 / 4 = -0.97.
    uncapped, stats = policy_loss(logprobs, behaviour, adv, mask)
    close(uncapped, -0.97)
    close(stats["masked_by_cap"], 0.0)

    with pytest.raises(ValueError, match="ratio_cap"):
        policy_loss(logprobs, behaviour, adv, mask, ratio_cap=0.5)


def test_policy_loss_mask_selects_doctor_tokens():
    # One sequence, A = +1, alternating doctor / patient tokens with ratios [1.2, 0.9, 1.1, 0.7].
    logprobs, behaviour = _lp([[1.2, 0.9, 1.1, 0.7]])
    logprobs.requires_grad_(True)
    adv = torch.tensor([1.0])
    doctor = torch.tensor([[1, 0, 1, 0]])
    patient = 1 - doctor
    # Doctor tokens: -(1.2 + 1.1) / 2 = -1.15 (both inside [0.8, 1.28]).
    # Patient tokens: -(0.9 + 0.7) / 2 = -0.8 (0.7 < 0.8, but with A > 0 the min keeps 0.7).
    loss_doctor, _ = policy_loss(logprobs, behaviour, adv, doctor)
    loss_patient, _ = policy_loss(logprobs, behaviour, adv, patient)
    close(loss_doctor, -1.15)
    close(loss_patient, -0.8)
    loss_doctor.backward()
    # Only doctor tokens are trained: -r / 2 -> -0.6 and -0.55.
    close(logprobs.grad, [[-0.6, 0.0, -0.55, 0.0]])


def test_policy_loss_no_tokens_is_zero_with_grad():
    logprobs, behaviour, adv, mask = _hand_case()
    empty = torch.zeros_like(mask)
    for num_tokens in (None, 0):
        loss, stats = policy_loss(logprobs, behaviour, adv, empty, num_tokens=num_tokens)
        assert loss.item() == 0.0
        assert loss.grad_fn is not None
        close(stats["tokens"], 0.0)
        close(stats["clip_fraction"], 0.0)
        close(stats["ratio_mean"], 0.0)
        close(stats["ratio_max"], 0.0)
        (grad,) = torch.autograd.grad(loss, logprobs)
        assert torch.all(grad == 0)


def test_policy_loss_rejects_bad_shapes():
    logprobs, behaviour, adv, mask = _hand_case()
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logprobs, behaviour, adv[:1], mask)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        policy_loss(logprobs, behaviour[:, :2], adv, mask)
    with pytest.raises(ValueError, match="num_tokens"):
        policy_loss(logprobs, behaviour, adv, mask, num_tokens=-1)


# --------------------------------------------------------------------------------------------------------
# kl_penalty
# --------------------------------------------------------------------------------------------------------


def test_kl_penalty_zero_when_equal():
    logprobs, _, _, mask = _random_batch()
    ref = logprobs.clone()
    logprobs = logprobs.clone().requires_grad_(True)
    kl = kl_penalty(logprobs, ref, mask)
    assert kl.item() == 0.0
    # At equality the k3 gradient 1 - exp(ref - logp) is zero as well.
    (grad,) = torch.autograd.grad(kl, logprobs)
    assert torch.all(grad == 0)


def test_kl_penalty_by_hand():
    # Token 1: logp = -1, ref = -2 -> d = -1: exp(-1) + 1 - 1 = e^-1 = 0.3678794.
    # Token 2: logp = -ln 2, ref = 0 -> d = ln 2: 2 - ln 2 - 1 = 1 - ln 2 = 0.3068528.
    # Token 0 is masked with -inf on both sides (-inf - -inf = NaN) and token 3 with garbage.
    logprobs = torch.tensor([[NEG_INF, -1.0, -math.log(2), 5.0]], requires_grad=True)
    ref = torch.tensor([[NEG_INF, -2.0, 0.0, NAN]])
    mask = torch.tensor([[0, 1, 1, 0]])
    k1, k2 = math.exp(-1), 1 - math.log(2)
    kl = kl_penalty(logprobs, ref, mask)
    close(kl, (k1 + k2) / 2)
    # Same num_tokens convention as policy_loss: a whole batch of 4 loss tokens divides by 4.
    close(kl_penalty(logprobs, ref, mask, num_tokens=4), (k1 + k2) / 4)
    kl.backward()
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(ref - logp), over n = 2:
    # token 1: (1 - e^-1) / 2 = 0.3160603; token 2: (1 - 2) / 2 = -0.5; masked tokens: 0.
    close(logprobs.grad, [[0.0, (1 - math.exp(-1)) / 2, -0.5, 0.0]])


def test_kl_penalty_masked_tokens_ignored_and_finite_when_wild():
    logprobs = torch.tensor([[-1.0, -200.0]])
    ref = torch.tensor([[-2.0, -0.1]])
    # Masking the wild second token leaves the one-token value e^-1.
    close(kl_penalty(logprobs, ref, torch.tensor([[1, 0]])), math.exp(-1))
    # Unmasked, its log-ratio of 199.9 would overflow exp(); the +-20 clamp keeps the penalty finite.
    assert torch.isfinite(kl_penalty(logprobs, ref, torch.tensor([[1, 1]])))
    # Empty mask: zero, not NaN.
    assert kl_penalty(logprobs, ref, torch.zeros(1, 2)).item() == 0.0


# --------------------------------------------------------------------------------------------------------
# micro_batches
# --------------------------------------------------------------------------------------------------------


def _check_partition(batches: list[list[int]], lengths: list[int], budget: int) -> None:
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    for batch in batches:
        assert batch
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= budget or len(batch) == 1


def test_micro_batches_by_hand():
    lengths = [5, 100, 20, 30, 10]
    # Longest first: 100 (idx 1), 30 (3), 20 (2), 10 (4), 5 (0); budget 60.
    # 100 > 60 -> alone. 30 then 20: 2 * 30 = 60 <= 60; adding 10 gives 3 * 30 = 90 > 60 -> new batch.
    # 10 then 5: 2 * 10 = 20.
    batches = micro_batches(lengths, 60)
    assert batches == [[1], [3, 2], [4, 0]]
    _check_partition(batches, lengths, 60)


def test_micro_batches_deterministic_ties_and_edges():
    # Equal lengths keep index order: 2 * 7 = 14 fits, 3 * 7 = 21 does not.
    assert micro_batches([7, 7, 7], 14) == [[0, 1], [2]]
    assert micro_batches([], 10) == []
    assert micro_batches([50], 10) == [[0]]  # oversize, never dropped
    with pytest.raises(ValueError, match="token_budget"):
        micro_batches([1, 2], 0)
    with pytest.raises(ValueError, match="lengths"):
        micro_batches([1, -2], 10)


def test_micro_batches_random_respects_budget():
    gen = torch.Generator().manual_seed(0)
    for budget in (64, 256, 1000):
        lengths = torch.randint(1, 400, (37,), generator=gen).tolist()
        batches = micro_batches(lengths, budget)
        _check_partition(batches, lengths, budget)
        assert micro_batches(lengths, budget) == batches


def test_aggregation_rule_hand_values():
    counts = torch.tensor([2, 4, 0])
    assert torch.equal(sequence_weights("token-mean", counts), torch.tensor([1.0, 1.0, 1.0]))
    # 1 / L_i; a sequence without loss tokens gets no weight instead of a division by zero.
    assert torch.equal(sequence_weights("sequence-mean", counts), torch.tensor([0.5, 0.25, 0.0]))
    assert loss_denominator("token-mean", tokens=6, sequences=3) == 6.0
    assert loss_denominator("sequence-mean", tokens=6, sequences=3) == 3.0
    assert loss_denominator("token-mean", tokens=0, sequences=0) == 1.0  # an empty batch: 0 / 1


@pytest.mark.parametrize("aggregation", ["token-mean", "sequence-mean"])
def test_aggregation_rule_gives_the_written_out_objective(aggregation):
    generator = torch.Generator().manual_seed(0)
    logprobs = torch.randn(3, 6, generator=generator).clamp(max=0)
    behaviour = logprobs + 0.05 * torch.randn(3, 6, generator=generator)
    reference = logprobs + 0.1 * torch.randn(3, 6, generator=generator)
    mask = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    advantages = torch.tensor([1.0, -0.5, 0.3])
    counts = mask.sum(1)
    weights = sequence_weights(aggregation, counts)
    denominator = loss_denominator(aggregation, int(counts.sum()), 3)
    loss, _ = policy_loss(logprobs, behaviour, advantages * weights, mask, num_tokens=1)
    kl = (kl_per_sequence(logprobs, reference, mask) * weights).sum()
    # The same objective written out: the mean over tokens, or over sequences of each one's token mean.
    per_sequence_loss, per_sequence_kl = [], []
    for i in range(3):
        ratio = torch.exp(logprobs[i] - behaviour[i])[mask[i]]
        per_sequence_loss.append(
            -torch.minimum(ratio * advantages[i], ratio.clamp(0.8, 1.28) * advantages[i])
        )
        d = (reference[i] - logprobs[i])[mask[i]]
        per_sequence_kl.append(torch.exp(d) - d - 1)
    if aggregation == "token-mean":
        expected_loss, expected_kl = torch.cat(per_sequence_loss).mean(), torch.cat(per_sequence_kl).mean()
    else:
        expected_loss = sum(t.mean() for t in per_sequence_loss) / 3
        expected_kl = sum(t.mean() for t in per_sequence_kl) / 3
    assert torch.allclose(loss / denominator, expected_loss, atol=1e-6)
    assert torch.allclose(kl / denominator, expected_kl, atol=1e-6)


def test_gradient_noise_estimates_by_hand():
    # Parts (1, 0), (3, 0), (2, 2): mean (2, 2/3); |x|^2 = 1, 9, 8 -> mean 6; S = (6, 2), |S|^2 = 40.
    signal, noise = gradient_noise_estimates([1.0, 9.0, 8.0], 40.0)
    assert signal == pytest.approx((40 - 3 * 6) / 6)  # 11/3
    assert noise == pytest.approx(6 - 11 / 3)
    # tr Sigma by the usual sample covariance: sum |x - mean|^2 / (k - 1) = (1 + 4/9 + 1 + 4/9 + 0 + 16/9) / 2
    assert noise == pytest.approx((2 + 24 / 9) / 2)
    with pytest.raises(ValueError, match="at least 2"):
        gradient_noise_estimates([1.0], 1.0)


def test_gradient_noise_estimates_are_unbiased():
    """Averaged over many steps of 8 noisy parts, the estimates find the mean and the noise put in."""
    generator = torch.Generator().manual_seed(0)
    mean = torch.tensor([0.3, -0.2, 0.0, 0.1] * 25)  # |G|^2 = 0.14 * 25 = 3.5
    sigma = 0.5  # tr Sigma = 100 * 0.25 = 25
    signals, noises = [], []
    for _ in range(4000):
        parts = mean + sigma * torch.randn(8, 100, generator=generator)
        sq = (parts**2).sum(1).tolist()
        signal, noise = gradient_noise_estimates(sq, float((parts.sum(0) ** 2).sum()))
        signals.append(signal)
        noises.append(noise)
    assert sum(signals) / len(signals) == pytest.approx(3.5, rel=0.05)
    assert sum(noises) / len(noises) == pytest.approx(25.0, rel=0.02)


def test_truncated_importance_weights_by_hand():
    ratio = torch.tensor([[0.5, 1.0, 3.0]])
    assert grpo.truncated_weights(ratio, 2.0).tolist() == [[0.5, 1.0, 2.0]]
    with pytest.raises(ValueError, match=">= 1"):
        grpo.truncated_weights(ratio, 0.5)


def test_truncated_is_loss_gradient_is_the_capped_ratio_times_the_advantage():
    """-min(r, C) * A * log p: d/d(log p) = -min(r, C) * A per token, token-mean over the mask."""
    behaviour = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    ratios = torch.tensor([[0.5, 1.0, 3.0]])
    logprobs = (behaviour + torch.log(ratios)).requires_grad_()
    mask = torch.tensor([[1, 1, 1]])
    loss, stats = grpo.policy_loss(logprobs, behaviour, torch.tensor([2.0]), mask, truncate_at=2.0)
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[-0.5 * 2, -1.0 * 2, -2.0 * 2]]) / 3)
    assert stats["truncated"] == 1 and stats["masked_sequences"] == 0


def test_sequences_whose_geometric_mean_ratio_leaves_the_bounds_are_masked_by_hand():
    # Sequence 0: ratios 2 and 2 (geometric mean 2, out of [0.5, 1.5]); sequence 1: 2 and 0.5 (mean 1);
    # sequence 2: no loss tokens (kept).
    log_ratio = torch.log(torch.tensor([[2.0, 2.0], [2.0, 0.5], [1.0, 1.0]]))
    mask = torch.tensor([[1, 1], [1, 1], [0, 0]])
    keep = grpo.sequence_ratio_keep(log_ratio, mask, (0.5, 1.5))
    assert keep.tolist() == [False, True, True]
    behaviour = torch.zeros(3, 2)
    logprobs = log_ratio.clone().requires_grad_()
    loss, stats = grpo.policy_loss(
        logprobs, behaviour, torch.tensor([1.0, 1.0, 1.0]), mask, sequence_bounds=(0.5, 1.5), clip_high=10.0
    )
    loss.backward()
    assert stats["masked_sequences"] == 1
    assert torch.all(logprobs.grad[0] == 0) and torch.any(logprobs.grad[1] != 0)
    # The masked sequence's tokens still count in the token mean: 4 loss tokens.
    assert loss.item() == pytest.approx(-(2.0 + 0.5) / 4)
    with pytest.raises(ValueError, match="0 < low <= 1 <= high"):
        grpo.sequence_ratio_keep(log_ratio, mask, (1.2, 2.0))
