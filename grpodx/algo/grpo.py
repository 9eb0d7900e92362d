"""The GRPO algorithm as small pure tensor functions.

Everything here takes tensors and returns tensors: no model, no config object, no device placement. The
trainer composes them; the tests check each against numbers worked out by hand.

Conventions shared by the losses:

- ``loss_mask`` [B, T] selects the tokens the doctor generated; prompt, patient and padding tokens are 0.
- Losses are token-means: the sum over masked tokens divided by ``num_tokens``. ``num_tokens`` defaults to
  the mask's own count, but a caller that splits a batch into micro-batches passes the count of the whole
  batch, so that the micro-batch gradients add up to exactly the full-batch gradient.
- Masked positions may hold ``-inf`` or NaN log-probabilities (prompt tokens, padding). They are replaced
  with ``torch.where`` before any arithmetic, never multiplied by zero, because ``0 * inf`` is NaN in both
  the value and the gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

# exp() of a log-ratio beyond this is already ~5e8 per token; clamping keeps one wild token from
# turning the KL term into inf (float32 overflows near exp(88)) and wrecking the whole step.
_KL_MAX_LOG_RATIO = 20.0


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """View flat rewards [N] as [n_groups, group_size], validating the layout."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has no baseline), got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"number of rewards ({rewards.numel()}) is not a multiple of group_size ({group_size}); "
            "rewards must be consecutive blocks of one group each"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: Tensor, group_size: int, *, scale_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """Advantage of each completion relative to the other completions of its prompt.

    ``A = (r - mean_group) / (std_group + eps)`` (GRPO) or ``A = r - mean_group`` when ``scale_by_std`` is
    False (Dr.GRPO, which drops the std because it up-weights near-unanimous groups). The group mean is the
    baseline that replaces a learned critic. The std is the population std (``correction=0``): it is defined
    for a group of two, and it is the std of the rewards actually seen rather than an estimate of a wider
    distribution. ``rewards`` [N] holds consecutive groups of ``group_size``; returns float [N].
    """
    groups = _grouped(rewards, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        centered = centered / (groups.std(dim=1, correction=0, keepdim=True) + eps)
    return centered.reshape(-1)


def zero_advantage_groups(rewards: Tensor, group_size: int, atol: float = 1e-8) -> Tensor:
    """bool [n_groups]: True where every reward in the group is equal (within ``atol``).

    Such groups have all-zero advantages, so they contribute no gradient; the trainer counts them to see
    how much of each batch is wasted on prompts that are too easy or too hard.
    """
    groups = _grouped(rewards, group_size)
    return (groups.amax(dim=1) - groups.amin(dim=1)) <= atol


LossAggregation = Literal["token-mean", "sequence-mean"]


def sequence_weights(aggregation: LossAggregation, loss_token_counts: Tensor) -> Tensor:
    """The weight of each episode's tokens in its batch's summed loss; with :func:`loss_denominator`
    this is the whole aggregation rule:

        batch loss = sum_i w_i * sum_t loss_it / D,
        token-mean:     w_i = 1,      D = loss tokens of the batch (every token weighs the same);
        sequence-mean:  w_i = 1 / L_i, D = episodes of the batch (every episode weighs the same).

    Why sequence-mean exists: under a token mean, a group whose failures are longer than its successes
    puts net negative weight on the tokens all its episodes share (the markup, the phrasing of
    questions), which drives a small policy towards garbage. The clipped objective is positively
    homogeneous in the advantage, so weighting an episode's advantage weights its policy-loss tokens.
    An episode without loss tokens gets weight 0 rather than a division by zero.
    """
    counts = loss_token_counts.float()
    if aggregation == "token-mean":
        return torch.ones_like(counts)
    return torch.where(counts > 0, 1.0 / counts.clamp(min=1), 0.0)


def loss_denominator(aggregation: LossAggregation, tokens: int, sequences: int) -> float:
    """``D`` of :func:`sequence_weights`, over the whole batch (every micro-batch and accumulate call);
    1 for an empty batch, whose summed loss is 0."""
    return float(max(1, sequences if aggregation == "sequence-mean" else tokens))


def target_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(logits / temperature)[target]`` along the last dimension, in float32.

    ``logits`` is [..., V] and ``targets`` its leading shape. Computed as ``gathered logit - logsumexp``
    so that only one float32 copy of the logits is ever built (a full ``log_softmax`` would add a
    second one). The temperature must match the sampler's, otherwise the importance ratio against the
    sampler's log-probs is biased.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"expected logits [..., V] for targets {tuple(targets.shape)}, got {tuple(logits.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = logits
    if scaled.dtype != torch.float32 or temperature != 1.0:
        # copy=True so the in-place division never writes into the caller's logits.
        scaled = scaled.to(torch.float32, copy=True)
        if temperature != 1.0:
            scaled.div_(temperature)
    return scaled.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


def sequence_logprobs(logits: Tensor, input_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each token given the tokens before it: [B, T] float32, position 0 is 0.0.

    Position t holds ``log softmax(logits[:, t-1] / temperature)[input_ids[t]]``; the first token has no
    prediction (see :func:`target_logprobs`).
    """
    if logits.dim() != 3 or input_ids.dim() != 2 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"expected logits [B, T, V] and input_ids [B, T], got {tuple(logits.shape)} "
            f"and {tuple(input_ids.shape)}"
        )
    token_logprobs = target_logprobs(logits[:, :-1], input_ids[:, 1:], temperature)
    first = token_logprobs.new_zeros(input_ids.shape[0], 1)
    return torch.cat([first, token_logprobs], dim=1)


def _token_denominator(loss_mask: Tensor, num_tokens: float | None) -> Tensor | float:
    """Denominator of a token-mean; an empty batch divides a zero sum by 1 rather than 0."""
    if num_tokens is None:
        # Stays a tensor so the default path never forces a device sync.
        return loss_mask.sum().clamp(min=1).to(torch.float32)
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    return float(num_tokens) if num_tokens > 0 else 1.0


def _check_token_shapes(logprobs: Tensor, other: Tensor, loss_mask: Tensor, other_name: str) -> None:
    if logprobs.dim() != 2 or other.shape != logprobs.shape or loss_mask.shape != logprobs.shape:
        raise ValueError(
            f"logprobs, {other_name} and loss_mask must all be [B, T], got {tuple(logprobs.shape)}, "
            f"{tuple(other.shape)} and {tuple(loss_mask.shape)}"
        )


def truncated_weights(ratio: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling weights ``min(ratio, cap)``, detached.

    The sampler (vLLM in bf16, say) and the learner (float32) give the same token slightly different
    probabilities; the ratio of the two corrects for it, and truncating it at ``cap`` bounds the
    variance a rare large ratio would add (Yao et al., 2025, "off-policy RL training" by mismatch).
    """
    if cap < 1.0:
        raise ValueError(f"the truncation cap must be >= 1, got {cap}")
    return torch.clamp(ratio.detach(), max=cap)


def sequence_ratio_keep(log_ratio: Tensor, loss_mask: Tensor, bounds: tuple[float, float]) -> Tensor:
    """[B] True for the sequences whose geometric-mean ratio over their loss tokens lies in ``bounds``.

    One token's ratio says little, the whole sequence's says whether the sampler and the learner
    disagree about the episode: such an episode is left out of the step rather than reweighted.
    A sequence without loss tokens is kept (it adds nothing anyway).
    """
    low, high = bounds
    if not 0.0 < low <= 1.0 <= high:
        raise ValueError(f"sequence ratio bounds must satisfy 0 < low <= 1 <= high, got {bounds}")
    mask = loss_mask.bool()
    counts = mask.sum(dim=1)
    mean_log = torch.where(mask, log_ratio.detach().float(), 0.0).sum(dim=1) / counts.clamp(min=1)
    geometric = torch.exp(mean_log)
    return (counts == 0) | ((geometric >= low) & (geometric <= high))


def policy_loss(
    logprobs: Tensor,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    num_tokens: float | None = None,
    ratio_cap: float | None = None,
    truncate_at: float | None = None,
    sequence_bounds: tuple[float, float] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped GRPO surrogate, token-mean over the loss mask; returns ``(loss, stats)``.

    Per token ``-min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A)`` with ``r = exp(logp - logp_old)``,
    ``logp_old`` the behaviour (sampler) log-prob and A the advantage of the token's sequence: the min is a
    pessimistic bound that stops a stale sample from pushing the policy past the trust region.
    ``clip_high > clip_low`` (DAPO's clip-higher) leaves room to raise unlikely tokens, which keeps
    exploration alive. ``ratio_cap``, if set, drops tokens
    whose ratio is above ``ratio_cap`` or below ``1 / ratio_cap`` from the sum, because their importance
    weights are too stale to trust; they still count in the default denominator, so the normalisation does
    not depend on the ratios and matches what a micro-batching caller passes as ``num_tokens``.

    Two corrections for a sampler whose probabilities differ from the learner's (see
    :func:`truncated_weights`, :func:`sequence_ratio_keep`): ``truncate_at`` replaces the clipped
    surrogate by the truncated-importance-sampling policy gradient ``-min(r, C) * A * log p`` (its
    gradient is ``min(r, C) * A`` times the score); ``sequence_bounds`` drops whole sequences whose
    geometric-mean ratio leaves ``[low, high]``. Dropped tokens and sequences still count in the default
    denominator, like the cap's.

    ``behaviour_logprobs`` and ``advantages`` are constants of the objective and are detached. Stats are
    detached float32 scalars: ``clip_fraction`` (share of kept tokens where the clipped term won and differs),
    ``ratio_mean`` and ``ratio_max`` (over all loss tokens, before the cap, so the cap does not hide
    staleness; 0 with no tokens), ``masked_by_cap`` (count), ``truncated`` (tokens whose ratio was above
    ``truncate_at``), ``masked_sequences`` (count) and ``tokens`` (loss tokens in this call).
    """
    _check_token_shapes(logprobs, behaviour_logprobs, loss_mask, "behaviour_logprobs")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logprobs.shape[0]}], got {tuple(advantages.shape)}")
    if ratio_cap is not None and ratio_cap < 1.0:
        raise ValueError(f"ratio_cap must be >= 1 (it bounds the ratio to [1/cap, cap]), got {ratio_cap}")

    mask = loss_mask.bool()
    log_ratio = torch.where(mask, logprobs.float() - behaviour_logprobs.detach().float(), 0.0)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().float().unsqueeze(1)

    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    if truncate_at is None:
        per_token = -torch.minimum(unclipped, clipped)
    else:
        per_token = -truncated_weights(ratio, truncate_at) * adv * logprobs.float()

    ratio_d = ratio.detach()
    within_cap = mask
    if ratio_cap is not None:
        within_cap = mask & (ratio_d <= ratio_cap) & (ratio_d >= 1.0 / ratio_cap)
    sequences_kept = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
    if sequence_bounds is not None:
        sequences_kept = sequence_ratio_keep(log_ratio, mask, sequence_bounds)
    keep = within_cap & sequences_kept.unsqueeze(1)

    loss = torch.where(keep, per_token, 0.0).sum() / _token_denominator(loss_mask, num_tokens)

    with torch.no_grad():
        n_mask = mask.sum()
        n_keep = keep.sum()
        clip_chosen = keep & (clipped < unclipped)
        stats = {
            "clip_fraction": clip_chosen.sum().float() / n_keep.clamp(min=1).float(),
            "ratio_mean": torch.where(mask, ratio_d, 0.0).sum() / n_mask.clamp(min=1).float(),
            # Ratios are positive, so zero-filling the masked positions leaves the max of the rest intact.
            "ratio_max": torch.where(mask, ratio_d, 0.0).max(),
            "masked_by_cap": (mask & ~within_cap).sum().float(),
            "truncated": (mask & (ratio_d > (truncate_at or math.inf))).sum().float(),
            "masked_sequences": (~sequences_kept & mask.any(dim=1)).sum().float(),
            "tokens": n_mask.float(),
        }
    return loss, stats


def kl_penalty(
    logprobs: Tensor, ref_logprobs: Tensor, loss_mask: Tensor, *, num_tokens: float | None = None
) -> Tensor:
    """KL(policy || reference) by the k3 estimator, token-mean over the mask like ``policy_loss``.

    Per token ``exp(d) - d - 1`` with ``d = ref_logp - logp``: unbiased for the KL on tokens sampled from
    the policy and, unlike ``-d`` (k1), never negative, so it has far lower variance. The log-ratio is
    clamped to +-20 so that one wild token gives a large but finite penalty instead of inf.
    """
    return kl_per_sequence(logprobs, ref_logprobs, loss_mask).sum() / _token_denominator(
        loss_mask, num_tokens
    )


def kl_per_sequence(logprobs: Tensor, ref_logprobs: Tensor, loss_mask: Tensor) -> Tensor:
    """[B]: each sequence's k3 KL summed over its masked tokens (see :func:`kl_penalty`)."""
    _check_token_shapes(logprobs, ref_logprobs, loss_mask, "ref_logprobs")
    mask = loss_mask.bool()
    delta = torch.where(mask, ref_logprobs.detach().float() - logprobs.float(), 0.0)
    delta = delta.clamp(-_KL_MAX_LOG_RATIO, _KL_MAX_LOG_RATIO)
    per_token = torch.exp(delta) - delta - 1.0
    return torch.where(mask, per_token, 0.0).sum(dim=-1)


def micro_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Split sequence indices into micro-batches whose padded size ``len(batch) * max_len`` fits the budget.

    Long multi-turn episodes would otherwise run the trainer out of memory. Indices are sorted by length,
    longest first (ties by index, so the split is deterministic), and packed greedily: neighbours in that
    order have similar lengths, which keeps padding low. A sequence longer than the budget on its own gets a
    micro-batch of its own rather than being dropped. Every index appears exactly once.
    """
    if token_budget <= 0:
        raise ValueError(f"token_budget must be > 0, got {token_budget}")
    if any(length < 0 for length in lengths):
        raise ValueError("sequence lengths must be >= 0")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # The first index of a batch is its longest, so it sets the padded width.
        if current and (len(current) + 1) * lengths[current[0]] > token_budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def gradient_noise_estimates(part_sq_norms: Sequence[float], total_sq_norm: float) -> tuple[float, float]:
    """Unbiased ``(|G|^2, tr Sigma)`` from the squared norms of k independent gradient parts and of their sum.

    With parts ``x_1 .. x_k`` drawn i.i.d. with mean G and covariance Sigma (here: one GRPO group's summed
    gradient each) and ``S = x_1 + .. + x_k``, ``E|x_c|^2 = |G|^2 + tr Sigma`` and ``E|S|^2 = k^2 |G|^2 +
    k tr Sigma``, so ``|G|^2 = (|S|^2 - k mean|x_c|^2) / (k (k - 1))`` and ``tr Sigma = mean|x_c|^2 - |G|^2``.
    Only norms are needed, never the parts themselves. ``tr Sigma / |G|^2`` is the gradient noise scale
    (McCandlish et al., 2018): the number of parts per step at which a step's noise equals its signal.
    One step's estimates are noisy, |G|^2 can come out negative: average over steps before the ratio.
    """
    k = len(part_sq_norms)
    if k < 2:
        raise ValueError(f"need at least 2 gradient parts to separate signal from noise, got {k}")
    mean_part = sum(part_sq_norms) / k
    signal = (total_sq_norm - k * mean_part) / (k * (k - 1))
    return signal, mean_part - signal
