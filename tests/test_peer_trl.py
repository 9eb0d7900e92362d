"""GRPODx's GRPO loss against TRL's, on identical tensors (docs/peer_trl.md).

TRL is imported unconditionally: it is in the ``bench`` extra that ``make test`` installs, and a missing
TRL must fail this file, not skip it. The loss is TRL's own code: ``GRPOTrainer._compute_loss`` called
on a harness that holds only the attributes it reads (set from a real ``GRPOConfig`` the way
``GRPOTrainer.__init__`` sets them) and hands it our log-probs instead of running a model. TRL's
advantages sit in the middle of its generation method, so they are rebuilt from its ``nanstd`` and the
two lines that use it, and a check on TRL's source keeps that rebuild honest.

Where the conventions agree, the figures must agree to float precision, value and gradient; where they
differ, they must differ exactly as docs/peer_trl.md says.
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import trl
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import nanstd, selective_log_softmax

from grpodx.algo import grpo

TRL_VERSION = "1.16.0"  # the pin of the bench extra (pyproject.toml); docs/peer_trl.md describes it
G = 4


def test_trl_is_the_pinned_version():
    assert trl.__version__ == TRL_VERSION


# ---- TRL's loss, called for real -----------------------------------------------------------------
class _OneProcess:
    """The accelerator calls _compute_loss makes, for one process."""

    num_processes = 1
    sync_gradients = True

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather


class _TrlLossHarness:
    """What ``GRPOTrainer._compute_loss`` reads of ``self``, set from ``args`` as ``__init__`` sets it."""

    def __init__(self, args: GRPOConfig, logprobs: torch.Tensor):
        self.args = args
        self.loss_type = args.loss_type
        self.beta = args.beta
        self.epsilon_low = args.epsilon
        self.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        self.importance_sampling_level = args.importance_sampling_level
        self.top_entropy_quantile = args.top_entropy_quantile
        self.off_policy_mask_threshold = args.off_policy_mask_threshold
        self.max_completion_length = args.max_completion_length
        self.use_vllm = False
        self.vllm_importance_sampling_correction = False
        self._entropy_bonus_enabled = False
        self.aux_loss_enabled = False
        self.current_gradient_accumulation_steps = 1
        self.accelerator = _OneProcess()
        self.model = SimpleNamespace(training=True)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._logprobs = logprobs

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **_):
        assert logits_to_keep == self._logprobs.shape[1]
        return self._logprobs, torch.zeros_like(self._logprobs), None


def trl_args(tmp_path, **overrides) -> GRPOConfig:
    return GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **overrides)


def trl_loss(args, logprobs, old, advantages, mask, ref=None) -> torch.Tensor:
    """TRL's GRPO loss of completion log-probs [B, T] (prompt of one token, no model)."""
    batch = logprobs.shape[0]
    inputs = {
        "prompt_ids": torch.zeros(batch, 1, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 1, dtype=torch.long),
        "completion_ids": torch.zeros(logprobs.shape, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": advantages,
        "old_per_token_logps": old,
        # What _generate_and_score_completions passes: the loss tokens of the whole generation batch.
        "num_items_in_batch": mask.sum(),
    }
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return GRPOTrainer._compute_loss(_TrlLossHarness(args, logprobs), None, inputs)


def trl_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """TRL's advantages (``multi_objective_aggregation="sum_then_normalize"``, one reward function)."""
    mean = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
    std = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return advantages


def test_trl_advantage_rebuild_matches_its_source():
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    for line in (
        "mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)",
        "std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)",
        "advantages = rewards - mean_grouped_rewards",
        "advantages = advantages / (std_rewards + 1e-4)",
    ):
        assert line in source, line
    # nanstd is Bessel-corrected (n - 1): the std of [0, 1] is 0.7071, not 0.5.
    assert nanstd(torch.tensor([0.0, 1.0])).item() == pytest.approx(math.sqrt(0.5))


# ---- the tensors both sides see --------------------------------------------------------------------
def _tensors(seed: int = 0, batch: int = 8, length: int = 12):
    generator = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(batch, length, generator=generator) * 3 - 0.05
    # Ratios from about 0.6 to 1.6: inside the trust region and beyond it on both sides.
    old = logprobs - (torch.rand(batch, length, generator=generator) - 0.5)
    ref = logprobs + (torch.rand(batch, length, generator=generator) - 0.5) * 0.6
    lengths = torch.tensor([12, 3, 7, 12, 1, 9, 5, 10])[:batch]
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.2, 0.9, 0.4, 0.1])[:batch]
    return logprobs, old, ref, mask, rewards


def _grad(loss_fn, logprobs):
    leaf = logprobs.clone().requires_grad_(True)
    loss = loss_fn(leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


# ---- advantages --------------------------------------------------------------------------------------
def test_advantages_population_std_vs_trl_bessel():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.2, 0.9, 0.4, 0.1, 1.0, 1.0, 1.0, 1.0])
    ours = grpo.group_advantages(rewards, G)  # eps 1e-6 (the config default)
    theirs = trl_advantages(rewards, G)
    groups = rewards.view(-1, G)
    centered = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)
    population = ((groups - groups.mean(dim=1, keepdim=True)) ** 2).mean(dim=1).sqrt()
    bessel = population * math.sqrt(G / (G - 1))
    # GRPODx: the population std, eps added to it.
    assert torch.allclose(ours, centered / (population.repeat_interleave(G) + 1e-6), atol=1e-6)
    # TRL: the Bessel std, 1e-4 added to it; so TRL's advantages are ours times sqrt((G-1)/G) up to eps.
    assert torch.allclose(theirs, centered / (bessel.repeat_interleave(G) + 1e-4), atol=1e-6)
    assert torch.allclose(theirs, ours * math.sqrt((G - 1) / G), atol=1e-3)
    assert not torch.allclose(theirs, ours, atol=1e-2)  # 0.866 × for G = 4: not a rounding matter
    # A tied group has zero advantages in both.
    assert ours[-G:].abs().max() == 0 and theirs[-G:].abs().max() == 0


def test_advantages_without_std_agree():
    """Dr.GRPO's centring alone (TRL scale_rewards="none", GRPODx scale_rewards=false) is the same."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.2, 0.9, 0.4, 0.1])
    assert torch.allclose(
        grpo.group_advantages(rewards, G, scale_by_std=False), trl_advantages(rewards, G, "none"), atol=1e-7
    )


# ---- the clipped surrogate and its aggregation -----------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["dapo", "bnpo"])
def test_token_mean_loss_agrees_with_dapo_and_bnpo(tmp_path, loss_type):
    logprobs, old, _, mask, rewards = _tensors()
    advantages = grpo.group_advantages(rewards, G)
    args = trl_args(tmp_path, loss_type=loss_type, epsilon=0.2, epsilon_high=0.28)

    def ours(lp):
        return grpo.policy_loss(lp, old, advantages, mask, clip_low=0.2, clip_high=0.28)[0]

    def theirs(lp):
        return trl_loss(args, lp, old, advantages, mask)

    ours_value, ours_grad = _grad(ours, logprobs)
    theirs_value, theirs_grad = _grad(theirs, logprobs)
    ratio = (logprobs - old).exp()[mask]
    assert ratio.min() < 0.8 and ratio.max() > 1.28  # both clip edges are exercised
    assert theirs_value == pytest.approx(ours_value.item(), abs=1e-6)
    assert torch.allclose(ours_grad, theirs_grad, atol=1e-7)


def test_trl_default_clip_is_symmetric(tmp_path):
    """TRL's default upper clip is epsilon (0.2); GRPODx's is DAPO's clip-higher 0.28."""
    logprobs, old, _, mask, rewards = _tensors()
    advantages = grpo.group_advantages(rewards, G)
    args = trl_args(tmp_path)
    assert (args.loss_type, args.epsilon, args.epsilon_high, args.beta) == ("dapo", 0.2, None, 0.0)
    assert args.scale_rewards == "group" and args.use_bias_correction_kl is True
    ours = grpo.policy_loss(logprobs, old, advantages, mask)[0]  # clip_low 0.2, clip_high 0.28
    symmetric = grpo.policy_loss(logprobs, old, advantages, mask, clip_low=0.2, clip_high=0.2)[0]
    theirs = trl_loss(args, logprobs, old, advantages, mask)
    assert theirs.item() == pytest.approx(symmetric.item(), abs=1e-6)
    assert abs(theirs.item() - ours.item()) > 1e-4


def test_grpo_loss_type_is_sequence_mean(tmp_path):
    """TRL's "grpo" (each sequence's token mean, then the batch mean) is GRPODx's sequence-mean."""
    logprobs, old, _, mask, rewards = _tensors()
    advantages = grpo.group_advantages(rewards, G)
    args = trl_args(tmp_path, loss_type="grpo", epsilon=0.2, epsilon_high=0.28)
    counts = mask.sum(dim=1)

    def ours(lp):  # the learner's rule: A_i * w_i summed over tokens, divided by D
        weighted = advantages * grpo.sequence_weights("sequence-mean", counts)
        loss = grpo.policy_loss(lp, old, weighted, mask, clip_low=0.2, clip_high=0.28, num_tokens=1)[0]
        return loss / grpo.loss_denominator("sequence-mean", int(counts.sum()), len(counts))

    ours_value, ours_grad = _grad(ours, logprobs)
    theirs_value, theirs_grad = _grad(lambda lp: trl_loss(args, lp, old, advantages, mask), logprobs)
    assert theirs_value == pytest.approx(ours_value.item(), abs=1e-6)
    assert torch.allclose(ours_grad, theirs_grad, atol=1e-7)
    token_mean = grpo.policy_loss(logprobs, old, advantages, mask, clip_low=0.2, clip_high=0.28)[0]
    assert abs(theirs_value.item() - token_mean.item()) > 1e-3  # lengths differ: the two weightings do


def test_dr_grpo_divides_by_the_max_length(tmp_path):
    """TRL's "dr_grpo" divides the token sum by B × max_completion_length, not by the tokens there are."""
    logprobs, old, _, mask, rewards = _tensors()
    advantages = grpo.group_advantages(rewards, G, scale_by_std=False)
    args = trl_args(tmp_path, loss_type="dr_grpo", scale_rewards="none", max_completion_length=16)
    ours = grpo.policy_loss(logprobs, old, advantages, mask, clip_low=0.2, clip_high=0.2)[0]
    theirs = trl_loss(args, logprobs, old, trl_advantages(rewards, G, "none"), mask)
    scale = mask.sum().item() / (mask.shape[0] * 16)
    assert theirs.item() == pytest.approx(ours.item() * scale, abs=1e-6)


# ---- the KL term ---------------------------------------------------------------------------------------
BETA = 0.04


def test_kl_without_ratio_agrees(tmp_path):
    """k3 KL added to the token mean: the same with TRL's use_bias_correction_kl=False."""
    logprobs, old, ref, mask, rewards = _tensors()
    advantages = grpo.group_advantages(rewards, G)
    args = trl_args(tmp_path, beta=BETA, epsilon_high=0.28, use_bias_correction_kl=False)

    def ours(lp):
        policy = grpo.policy_loss(lp, old, advantages, mask, clip_low=0.2, clip_high=0.28)[0]
        return policy + BETA * grpo.kl_penalty(lp, ref, mask)

    ours_value, ours_grad = _grad(ours, logprobs)
    theirs_value, theirs_grad = _grad(lambda lp: trl_loss(args, lp, old, advantages, mask, ref), logprobs)
    assert theirs_value == pytest.approx(ours_value.item(), abs=1e-6)
    assert torch.allclose(ours_grad, theirs_grad, atol=1e-7)


def test_trl_default_kl_is_multiplied_by_the_ratio(tmp_path):
    """TRL's default (use_bias_correction_kl=True) weights each token's k3 by r = exp(logp - logp_old)."""
    logprobs, old, ref, mask, rewards = _tensors()
    advantages = grpo.group_advantages(rewards, G)
    args = trl_args(tmp_path, beta=BETA, epsilon_high=0.28)
    assert args.use_bias_correction_kl

    def policy(lp, behaviour):
        return grpo.policy_loss(lp, behaviour, advantages, mask, clip_low=0.2, clip_high=0.28)[0]

    def k3(lp):
        delta = ref - lp
        return torch.exp(delta) - delta - 1

    # Off-policy: the value differs by the ratio weighting, which the formula below reproduces exactly.
    theirs = trl_loss(args, logprobs, old, advantages, mask, ref)
    ours = policy(logprobs, old) + BETA * grpo.kl_penalty(logprobs, ref, mask)
    weighted = (k3(logprobs) * (logprobs - old).exp())[mask].sum() / mask.sum()
    assert theirs.item() == pytest.approx((policy(logprobs, old) + BETA * weighted).item(), abs=1e-6)
    unweighted = grpo.kl_penalty(logprobs, ref, mask)
    assert theirs.item() - ours.item() == pytest.approx(BETA * (weighted - unweighted).item(), abs=1e-6)
    assert abs(weighted.item() - unweighted.item()) > 0.01 * unweighted.item()

    # On-policy (old = logp, r = 1): equal values, different gradients. d(r·k3)/dlogp = k3 + dk3/dlogp at
    # r = 1, so TRL's gradient is GRPODx's plus beta·k3 per token (over the token count).
    def ours_fn(lp):
        return policy(lp, lp.detach()) + BETA * grpo.kl_penalty(lp, ref, mask)

    def theirs_fn(lp):
        return trl_loss(args, lp, lp.detach(), advantages, mask, ref)

    ours_value, ours_grad = _grad(ours_fn, logprobs)
    theirs_value, theirs_grad = _grad(theirs_fn, logprobs)
    assert theirs_value == pytest.approx(ours_value.item(), abs=1e-6)
    extra = torch.where(mask, BETA * k3(logprobs) / mask.sum(), 0.0)
    assert torch.allclose(theirs_grad, ours_grad + extra, atol=1e-7)
    assert (theirs_grad - ours_grad).abs().max() > 1e-5


def test_kl_log_ratio_clamp(tmp_path):
    """GRPODx clamps the k3 log-ratio to ±20; TRL does not (exp(30) is used as is)."""
    logprobs = torch.full((1, 2), -31.0)
    ref = torch.full((1, 2), -1.0)
    mask = torch.ones(1, 2, dtype=torch.bool)
    args = trl_args(tmp_path, beta=1.0, use_bias_correction_kl=False)
    advantages = torch.zeros(1)
    theirs = trl_loss(args, logprobs, logprobs, advantages, mask, ref)
    ours = grpo.kl_penalty(logprobs, ref, mask)
    assert ours.item() == pytest.approx(math.exp(20) - 21, rel=1e-6)
    assert theirs.item() == pytest.approx(math.exp(30) - 31, rel=1e-6)


# ---- log-probabilities ------------------------------------------------------------------------------
def test_token_logprobs_agree_with_temperature():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 50, generator=generator) * 4
    targets = torch.randint(0, 50, (3, 5), generator=generator)
    for temperature in (1.0, 0.5):
        ours = grpo.target_logprobs(logits, targets, temperature)
        theirs = selective_log_softmax(logits, targets, temperature=temperature)
        assert torch.allclose(ours, theirs, atol=1e-5)


# ---- the peer_trl benchmark, smallest size (figures positive and consistent; no speed asserted) -------
def test_peer_trl_benchmark_smoke(small_model_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from grpodx.bench import REGISTRY
    from grpodx.cli import app

    assert "peer_trl" in [b.name for b in REGISTRY]
    out = tmp_path / "bench"
    overrides = [f"model.name={small_model_dir}", "grpo.num_generations=2", "lora.rank=4"]
    result = CliRunner().invoke(
        app, ["bench", "--smoke", "--only", "peer_trl", "--out", str(out), *overrides]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    assert report["failed"] == []
    (entry,) = report["benchmarks"]
    theirs, ours = entry["rows"]
    assert theirs["trainer"].startswith("TRL") and ours["trainer"].startswith("GRPODx")
    for row in (theirs, ours):
        assert row["completions"] == 2  # one prompt × 2 completions
        for key in ("step_s", "completions_per_s", "tokens_per_s", "completion_tokens"):
            assert all(math.isfinite(v) and v > 0 for v in row[key]["values"]), key
        assert row["completions_per_s"]["median"] == pytest.approx(
            row["completions"] / row["step_s"]["median"]
        )
    rate = ours["completions_per_s"]["median"] / theirs["completions_per_s"]["median"]
    assert ours["ratio"]["median"] == pytest.approx(rate)
    assert math.isfinite(ours["ratio"]["median"]) and ours["ratio"]["median"] > 0


def test_peer_trl_multiturn_benchmark_smoke(small_model_dir, tmp_path):
    """Both sides hold real interviews with the loopback API patient (2 turns at most) and train on them:
    one warm-up step, then a serial and a gathered TRL step, each followed by a GRPODx step."""
    import json

    from typer.testing import CliRunner

    from grpodx.cli import app

    out = tmp_path / "bench"
    overrides = [f"model.name={small_model_dir}", "lora.rank=4"]
    result = CliRunner().invoke(
        app, ["bench", "--smoke", "--only", "peer_trl_multiturn", "--out", str(out), *overrides]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    assert report["failed"] == []
    (entry,) = report["benchmarks"]
    serial, gathered, ours = entry["rows"]
    assert "serial" in serial["trainer"] and "gathered" in gathered["trainer"]
    assert ours["trainer"].startswith("GRPODx")
    for row in (serial, gathered, ours):
        assert row["episodes"] == 2  # one case × 2 episodes
        assert 1.0 <= row["turns"]["median"] <= 2.0
        for key in ("step_s", "episodes_per_s", "tokens_per_s", "doctor_tokens"):
            assert all(math.isfinite(v) and v > 0 for v in row[key]["values"]), key
    for mode, row in (("serial", serial), ("gathered", gathered)):
        rate = row["episodes_per_s"]["values"][0]
        # One repeat: GRPODx's step right after this TRL step is the pair the ratio is taken over.
        assert ours[f"ratio_{mode}"]["median"] > 0 and math.isfinite(ours[f"ratio_{mode}"]["median"])
        assert rate == pytest.approx(row["episodes"] / row["step_s"]["values"][0])
