"""Configuration: YAML + overrides, and errors that name the bad key or value."""

from pathlib import Path

import pytest

from grpodx.config import ConfigError, load_config

CONFIGS = Path(__file__).parents[1] / "configs"


def test_shipped_configs_load():
    for path in CONFIGS.glob("*.yaml"):
        load_config(path)


def test_overrides_apply_with_yaml_types():
    config = load_config(
        CONFIGS / "tiny-cpu.yaml", ["grpo.lr=1e-3", "grpo.scale_rewards=false", "lora.rank=4"]
    )
    assert config.grpo.lr == pytest.approx(1e-3)
    assert config.grpo.scale_rewards is False
    assert config.lora.rank == 4


def test_nested_override():
    config = load_config(None, ["episode.sampling.temperature=0.7"])
    assert config.episode.sampling.temperature == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("grpo.lrr=1", "grpo.lrr"),
        ("nosuch.key=1", "nosuch.key"),
        ("grpo.lr.deep=1", "grpo.lr.deep"),
    ],
)
def test_unknown_override_key_is_named(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_value_names_key_and_value():
    with pytest.raises(ConfigError, match=r"grpo\.num_generations.*1"):
        load_config(None, ["grpo.num_generations=1"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["grpo.lr"])


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("grpo:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'grpo\.learning_rate'"):
        load_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_cross_section_rule_names_the_keys():
    with pytest.raises(ConfigError, match=r"top_p=1\.0 or engine\.kind=hf") as error:
        load_config(None, ["engine.kind=vllm", "episode.sampling.top_p=0.9"])
    assert "{" not in str(error.value)  # the message, not a dump of the whole config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # pydantic alone reads true as 1: a one-step run would start.
        ("train.max_steps=true", r"'train\.max_steps': true is a boolean; this setting takes a number"),
        ("episode.sampling.temperature=false", r"'episode\.sampling\.temperature': false is a boolean"),
        ("model.name=true", r"'model\.name': true is a boolean; this setting takes text"),
        # 0 or -3 workers would evaluate nothing and wait forever for the first step.
        ("ray.num_rollout_workers=0", r"'ray\.num_rollout_workers': .*greater than or equal to 1.*'auto'"),
        ("ray.num_rollout_workers=-3", r"'ray\.num_rollout_workers': .*greater than or equal to 1"),
    ],
)
def test_booleans_and_worker_counts_that_are_not_numbers_stop_the_run(override, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(CONFIGS / "tiny-cpu.yaml", [override])
    # One sentence about the setting, without pydantic's union-branch tags.
    assert "constrained-int" not in str(error.value) and "\n" not in str(error.value)


def test_booleans_still_set_switches_and_numbers_still_parse():
    config = load_config(None, ["train.eval_greedy=true", "grpo.lr=1e-3", "ray.num_rollout_workers=3"])
    assert config.train.eval_greedy is True and config.grpo.lr == pytest.approx(1e-3)
    assert config.ray.num_rollout_workers == 3


@pytest.mark.parametrize(
    "override",
    ["grpo.advantage_eps=-1", "grpo.weight_decay=-0.1", "grpo.ratio_cap=1.0", "grpo.ratio_cap=0.5"],
)
def test_settings_whose_sign_breaks_the_math_are_bounded(override):
    # advantage_eps=-1 would flip the sign of every advantage; a ratio cap <= 1 would drop every token.
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])
