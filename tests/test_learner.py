"""The learner: GRPO step on LoRA, masks, zero-advantage groups, checkpoints, other backbones."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch

from grpodx.config import load_config
from grpodx.data.trajectory import TRAJECTORY_SCHEMA
from grpodx.learner import Learner
from grpodx.models import AdapterKeysError


def _config(**overrides):
    items = {"lora.rank": 4, "lora.alpha": 8, "grpo.lr": 1e-2, "train.max_steps": 10, "grpo.token_budget": 64}
    items.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


def _rows(rewards, group_size, learner=None, seed=0, prompt_len=6, gen_len=5):
    """Synthetic trajectories: a prompt (mask 0) then doctor tokens (mask 1), on-policy logprobs."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index, reward in enumerate(rewards):
        ids = torch.randint(5, 300, (prompt_len + gen_len,), generator=generator).tolist()
        mask = [0] * prompt_len + [1] * gen_len
        logprobs = learner.token_logprobs(ids) if learner else [0.0] * len(ids)
        rows.append(
            {
                "group_id": f"g{index // group_size}",
                "reward": float(reward),
                "valid": True,
                "token_ids": ids,
                "loss_mask": mask,
                "behaviour_logprobs": [lp if m else 0.0 for lp, m in zip(logprobs, mask, strict=True)],
            }
        )
    return rows


def _table(rows):
    columns = {}
    for field in TRAJECTORY_SCHEMA:
        if field.name in rows[0]:
            columns[field.name] = [r[field.name] for r in rows]
        else:
            columns[field.name] = [None] * len(rows)
    return pa.table(columns, schema=TRAJECTORY_SCHEMA)


def _adapter_vector(learner):
    return torch.cat([t.flatten() for t in learner.adapter().state_dict.values()])


def test_step_updates_lora_only_and_advances_version(small_model_dir):
    learner = Learner(_config(), str(small_model_dir), device="cpu")
    base_before = {k: v.clone() for k, v in learner.model.named_parameters() if not v.requires_grad}
    before = _adapter_vector(learner)
    metrics = learner.train_step(_table(_rows([1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5], 4, learner)))
    assert learner.version == 1
    assert not torch.equal(before, _adapter_vector(learner))
    for name, value in learner.model.named_parameters():
        if not value.requires_grad:
            assert torch.equal(value, base_before[name]), name
    assert metrics["groups/zero_advantage"] == 1.0
    assert metrics["groups/trained"] == 1.0
    # Every valid episode's doctor tokens count in the token mean; only the non-zero group is computed.
    assert metrics["learner/tokens"] == 8 * 5
    assert metrics["learner/sequences_computed"] == 4
    # On-policy: the ratio is 1 up to float noise, so nothing is clipped.
    assert metrics["learner/ratio_max"] == pytest.approx(1.0, abs=1e-4)


def test_all_equal_rewards_give_no_update(small_model_dir):
    learner = Learner(_config(), str(small_model_dir), device="cpu")
    before = _adapter_vector(learner)
    metrics = learner.train_step(_table(_rows([1, 1, 1, 1], 4, learner)))
    assert torch.equal(before, _adapter_vector(learner))
    assert metrics["groups/zero_advantage"] == 1.0 and metrics["learner/sequences_computed"] == 0


def test_patient_tokens_do_not_affect_the_update(small_model_dir):
    """Changing the behaviour logprobs or ids of masked (patient) positions must change nothing."""
    results = []
    for corrupt in (False, True):
        torch.manual_seed(0)
        learner = Learner(_config(), str(small_model_dir), device="cpu")
        rows = _rows([1, 0, 0, 0], 4, learner)
        if corrupt:
            for row in rows:
                row["behaviour_logprobs"] = [
                    lp if m else -50.0
                    for lp, m in zip(row["behaviour_logprobs"], row["loss_mask"], strict=True)
                ]
        learner.train_step(_table(rows))
        results.append(_adapter_vector(learner))
    assert torch.allclose(results[0], results[1])


def test_the_update_raises_the_likelihood_of_rewarded_episodes(small_model_dir):
    learner = Learner(_config(**{"grpo.lr": 5e-3}), str(small_model_dir), device="cpu")
    rows = _rows([1, 0, 0, 0], 4, learner)

    def doctor_logprob(row):
        lps = learner.token_logprobs(row["token_ids"])
        return sum(lp for lp, m in zip(lps, row["loss_mask"], strict=True) if m)

    good_before, bad_before = doctor_logprob(rows[0]), doctor_logprob(rows[1])
    for _ in range(3):
        rows = [
            dict(
                r,
                behaviour_logprobs=[
                    lp if m else 0.0
                    for lp, m in zip(learner.token_logprobs(r["token_ids"]), r["loss_mask"], strict=True)
                ],
            )
            for r in rows
        ]
        learner.train_step(_table(rows))
    assert doctor_logprob(rows[0]) > good_before
    assert doctor_logprob(rows[1]) < bad_before


def test_failed_episodes_are_excluded(small_model_dir):
    learner = Learner(_config(), str(small_model_dir), device="cpu")
    rows = _rows([1, 0, 0, 0], 4, learner)
    for row in rows[1:]:
        row["valid"] = False  # a group left with one valid episode has no baseline
    metrics = learner.train_step(_table(rows))
    assert metrics["learner/sequences"] == 0


def test_micro_batching_matches_one_batch(small_model_dir):
    # Compared on the accumulated gradient, not on the weights after the step: Adam's first update is
    # about lr * sign(g) per weight, so it magnifies float rounding on small gradient entries. On an
    # AVX2-only CPU the two gradients differed by at most 8.8e-8, yet the weights after the step were
    # not within 1e-6 of each other.
    gradients, micro_batch_counts = [], []
    for budget in (10_000, 22):
        torch.manual_seed(0)
        learner = Learner(_config(**{"grpo.token_budget": budget}), str(small_model_dir), device="cpu")
        learner.accumulate(_table(_rows([1, 0, 0.2, 0.7], 4, learner)))
        gradients.append(torch.cat([p.grad.flatten() for p in learner.model.parameters() if p.requires_grad]))
        micro_batch_counts.append(learner._pending.micro_batches)
    assert micro_batch_counts == [1, 2]  # 4 episodes of 11 tokens: one batch, or two of 22 tokens
    assert gradients[0].abs().max() > 1e-3  # a real gradient, not two zero vectors
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-5, atol=1e-6)


def test_checkpoint_restores_adapter_optimizer_and_version(small_model_dir, tmp_path):
    learner = Learner(_config(), str(small_model_dir), device="cpu")
    learner.train_step(_table(_rows([1, 0, 0, 0], 4, learner)))
    learner.save(tmp_path / "ckpt")
    saved_vector = _adapter_vector(learner)
    exp_avg = [s["exp_avg"].clone() for s in learner.optimizer.state.values()]

    resumed = Learner(_config(), str(small_model_dir), device="cpu")
    resumed.load(tmp_path / "ckpt")
    assert resumed.version == 1
    assert torch.equal(saved_vector, _adapter_vector(resumed))
    for before, after in zip(exp_avg, [s["exp_avg"] for s in resumed.optimizer.state.values()], strict=True):
        assert torch.equal(before, after)
    assert resumed.scheduler.last_epoch == learner.scheduler.last_epoch

    # Both take the same next step.
    rows = _rows([0, 1, 0, 0], 4, learner, seed=1)
    learner.train_step(_table(rows))
    resumed.train_step(_table(rows))
    assert torch.allclose(_adapter_vector(learner), _adapter_vector(resumed))


def test_kl_to_the_adapter_free_model_is_reported(small_model_dir):
    learner = Learner(_config(**{"grpo.kl_coef": 0.1}), str(small_model_dir), device="cpu")
    first = learner.train_step(_table(_rows([1, 0, 0, 0], 4, learner)))
    assert first["learner/kl"] == pytest.approx(0.0, abs=1e-6)  # fresh LoRA: B = 0, same model
    second = learner.train_step(_table(_rows([1, 0, 0, 0], 4, learner, seed=2)))
    assert second["learner/kl"] > 0.0


def test_resume_refuses_an_adapter_with_missing_or_foreign_tensors(small_model_dir, tmp_path):
    """peft loads non-strictly: the missing half of an adapter would silently restart from zero."""
    from safetensors.torch import load_file, save_file

    learner = Learner(_config(), str(small_model_dir), device="cpu")
    learner.save(tmp_path / "ckpt")
    weights_file = tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors"
    weights = load_file(weights_file)
    names = sorted(weights)
    for kept, match in (
        ({name: weights[name] for name in names[: len(names) // 2]}, rf"{len(names) - len(names) // 2} of"),
        ({**weights, "base_model.model.extra.lora_A.weight": weights[names[0]].clone()}, "no place for"),
    ):
        save_file(kept, weights_file)
        with pytest.raises(AdapterKeysError, match=match):
            Learner(_config(), str(small_model_dir), device="cpu").load(tmp_path / "ckpt")


def test_missing_checkpoint_has_clear_error(small_model_dir, tmp_path):
    learner = Learner(_config(), str(small_model_dir), device="cpu")
    with pytest.raises(FileNotFoundError, match="load-checkpoint"):
        learner.load(tmp_path)


@pytest.mark.parametrize("aggregation", ["token-mean", "sequence-mean"])
def test_group_by_group_accumulation_equals_one_batch(small_model_dir, aggregation):
    """Streaming groups into accumulate() one at a time gives the same step as the whole batch at once
    (groups of different lengths, so a wrong normaliser would show), with KL on."""
    overrides = {"grpo.loss_aggregation": aggregation, "grpo.kl_coef": 0.1, "grpo.max_grad_norm": 100.0}
    whole = Learner(_config(**overrides), str(small_model_dir), device="cpu")
    streamed = Learner(_config(**overrides), str(small_model_dir), device="cpu")
    streamed.model.load_state_dict(whole.model.state_dict())
    # One step first, so the adapter is not zero and the KL term has a gradient.
    warm = _table(_rows([1, 0, 0.5, 0.2], 4, whole, seed=3))
    whole.train_step(warm)
    streamed.train_step(warm)
    groups = [
        _rows([1, 0, 0, 0.3], 4, whole, seed=1, gen_len=3),
        _rows([0.2, 0.9, 0.1, 0.4], 4, whole, seed=2, gen_len=9),
        _rows([0.5, 0.0, 1.0, 0.5], 4, whole, seed=4, gen_len=6),
    ]
    for index, rows in enumerate(groups):
        for row in rows:
            row["group_id"] = f"g{index}"
    whole_metrics = whole.train_step(_table([row for rows in groups for row in rows]))
    for rows in reversed(groups):  # arrival order must not matter either
        streamed.accumulate(_table(rows))
    streamed_metrics = streamed.step()
    assert streamed.version == whole.version == 2
    # Float noise of summing in another order, which Adam's normalisation lifts to ~1e-6 on some
    # initialisations; a wrong normaliser moves the adapter by ~lr (1e-2).
    assert torch.allclose(_adapter_vector(streamed), _adapter_vector(whole), atol=1e-5)
    assert streamed_metrics["learner/tokens"] == whole_metrics["learner/tokens"] == 4 * (3 + 9 + 6)
    assert streamed_metrics["groups/total"] == whole_metrics["groups/total"] == 3
    assert streamed_metrics["learner/loss"] == pytest.approx(whole_metrics["learner/loss"], abs=1e-6)


def test_accumulated_gradient_is_the_token_mean_of_the_batch(small_model_dir):
    """The gradient step() applies equals the gradient of the batch's token-mean loss computed directly
    (Adam hides a wrong scale in the weights, so compare gradient norms before clipping)."""
    from grpodx.algo import grpo

    config = _config(**{"grpo.kl_coef": 0.0, "grpo.max_grad_norm": 1e6, "grpo.token_budget": 10_000})
    learner = Learner(config, str(small_model_dir), device="cpu")
    reference = Learner(config, str(small_model_dir), device="cpu")
    reference.model.load_state_dict(learner.model.state_dict())
    learner.train_step(_table(_rows([1, 0, 0.5, 0.2], 4, learner, seed=3)))  # a non-zero adapter
    reference.model.load_state_dict(learner.model.state_dict())
    first = _rows([1, 0, 0, 0.3], 4, learner, seed=1, gen_len=3)
    second = _rows([0.2, 0.9, 0.1, 0.4], 4, learner, seed=2, gen_len=9)
    for row in second:
        row["group_id"] = "g1"
    learner.accumulate(_table(first))
    learner.accumulate(_table(second))
    streamed_norm = learner.step()["learner/grad_norm"]

    rows = first + second
    rewards = torch.tensor([r["reward"] for r in rows])
    advantages = torch.cat([grpo.group_advantages(rewards[:4], 4), grpo.group_advantages(rewards[4:], 4)])
    width = max(len(r["token_ids"]) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention, mask = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    behaviour = torch.zeros((len(rows), width))
    for i, row in enumerate(rows):
        n = len(row["token_ids"])
        ids[i, :n], attention[i, :n] = torch.tensor(row["token_ids"]), 1
        mask[i, :n] = torch.tensor(row["loss_mask"], dtype=torch.bool)
        behaviour[i, :n] = torch.tensor(row["behaviour_logprobs"])
    reference.model.train()
    logits = reference.model(input_ids=ids, attention_mask=attention).logits
    logprobs = grpo.sequence_logprobs(logits, ids, reference.temperature)
    loss, _ = grpo.policy_loss(logprobs, behaviour, advantages, mask, clip_low=0.2, clip_high=0.28)
    loss.backward()
    grads = [p.grad for p in reference.model.parameters() if p.requires_grad and p.grad is not None]
    reference_norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
    assert reference_norm > 0
    assert streamed_norm == pytest.approx(reference_norm, rel=1e-4)


def test_a_saved_adapter_reads_back_from_a_path_and_a_uri(small_model_dir, tmp_path):
    """``grpodx eval --checkpoint`` takes a checkpoint directory or its URI in the run storage."""
    from grpodx.local import read_adapter

    learner = Learner(_config(), str(small_model_dir), device="cpu")
    learner.train_step(_table(_rows([1, 0, 0.5, 0.2], 4, learner)))
    learner.save(tmp_path / "step-000001")
    expected = learner.adapter().state_dict
    for location in (tmp_path / "step-000001", f"file://{tmp_path}/step-000001"):
        adapter = read_adapter(location)
        assert adapter.peft_config["r"] == 4
        assert set(adapter.state_dict) == set(expected)
        assert all(torch.equal(adapter.state_dict[k], expected[k]) for k in expected)


def test_noise_scale_comes_from_each_groups_own_gradient(small_model_dir):
    """The learner separates signal from noise with each streamed group's own gradient; checked against
    those gradients computed one group at a time on a copy of the learner."""
    import math

    from grpodx.algo import grpo

    config = _config(**{"grpo.kl_coef": 0.1, "grpo.max_grad_norm": 1e6})
    # The LoRA's initial A matrices come from torch's global generator: seeded, so the draw does not
    # depend on the tests before this one.
    torch.manual_seed(0)
    learner = Learner(config, str(small_model_dir), device="cpu")
    reference = Learner(config, str(small_model_dir), device="cpu")
    reference.model.load_state_dict(learner.model.state_dict())
    warm = learner.train_step(_table(_rows([1, 0, 0.5, 0.2], 4, learner, seed=3)))
    assert math.isnan(warm["learner/noise_scale"])  # one call holding one group: nothing to compare
    reference.model.load_state_dict(learner.model.state_dict())
    groups = [_rows([1, 0, 0, 0.3], 4, learner, seed=s, gen_len=3 + 2 * s) for s in (1, 2, 4)]
    for index, rows in enumerate(groups):
        for row in rows:
            row["group_id"] = f"g{index}"
        learner.accumulate(_table(rows))
    metrics = learner.step()

    trainable = [p for p in reference.model.parameters() if p.requires_grad]
    parts = []
    for rows in groups:
        reference.accumulate(_table(rows))
        parts.append(torch.cat([p.grad.flatten() for p in trainable]).clone())
        reference.optimizer.zero_grad(set_to_none=True)
    total = sum(parts)
    signal, noise = grpo.gradient_noise_estimates([float(x @ x) for x in parts], float(total @ total))
    assert noise > 0
    assert metrics["learner/grad_signal_sq"] == pytest.approx(signal, rel=1e-4, abs=1e-12)
    assert metrics["learner/grad_noise_trace"] == pytest.approx(noise, rel=1e-4)
    # The first averaged step: the ratio of the two estimates, in groups. The |G|^2 estimate is unbiased,
    # so with 3 groups it can come out negative (about half of the LoRA draws here): then no scale.
    if signal > 0:
        assert metrics["learner/noise_scale"] == pytest.approx(noise / signal, rel=1e-3)
    else:
        assert math.isnan(metrics["learner/noise_scale"])


def test_skipping_tied_groups_is_training_on_the_others_alone(small_model_dir):
    """With a KL term, a tied group (all rewards equal) still pulls towards the reference unless it is
    skipped; skipped, a batch with one is exactly the batch without it, and it costs no computation."""
    settings = {"grpo.kl_coef": 0.5, "grpo.skip_tied_groups": "true"}
    vectors, metrics = [], []
    for rewards in ([1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5], [1, 0, 0, 1]):
        torch.manual_seed(0)
        learner = Learner(_config(**settings), str(small_model_dir), device="cpu")
        reference = Learner(_config(), str(small_model_dir), device="cpu")
        # The policy must differ from the reference for the KL to pull at all: perturb the adapter.
        with torch.no_grad():
            for name, parameter in learner.model.named_parameters():
                if "lora_B" in name:
                    parameter.add_(0.05)
        rows = _rows(rewards, 4, reference)
        metrics.append(learner.train_step(_table(rows)))
        vectors.append(_adapter_vector(learner))
    assert torch.equal(vectors[0], vectors[1])
    assert metrics[0]["groups/zero_advantage"] == 1.0 and metrics[0]["learner/sequences_computed"] == 4
    assert metrics[0]["learner/tokens"] == metrics[1]["learner/tokens"] == 4 * 5
    # Without skipping, the tied group's KL term changes the update.
    torch.manual_seed(0)
    learner = Learner(_config(**{"grpo.kl_coef": 0.5}), str(small_model_dir), device="cpu")
    with torch.no_grad():
        for name, parameter in learner.model.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.05)
    kept = learner.train_step(_table(_rows([1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5], 4, reference)))
    assert kept["learner/sequences_computed"] == 8
    assert not torch.equal(_adapter_vector(learner), vectors[0])
    # A batch of tied groups alone computes nothing and says so (no ratio), instead of a ratio of 0.
    learner = Learner(_config(**settings), str(small_model_dir), device="cpu")
    empty = learner.train_step(_table(_rows([0.5, 0.5, 0.5, 0.5], 4, reference)))
    assert empty["learner/sequences_computed"] == 0 and empty["learner/grad_norm"] == 0.0
    assert math.isnan(empty["learner/ratio_mean"]) and math.isnan(empty["learner/clip_fraction"])
