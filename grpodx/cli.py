"""Command line: ``grpodx train | eval | build-tiny``."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated

import typer

from grpodx.config import Config, ConfigError, load_config

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="GRPO training of a diagnosing doctor model."
)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="YAML config in configs/")]
Overrides = Annotated[list[str] | None, typer.Argument(help="section.key=value overrides, e.g. grpo.lr=1e-3")]


def _load(config_path: Path, overrides: list[str] | None, flags: dict[str, object]) -> Config:
    extra = [f"{key}={value}" for key, value in flags.items() if value is not None]
    return load_config(config_path, extra + list(overrides or []))


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def train(
    config: ConfigOption = Path("configs/tiny-cpu.yaml"),
    overrides: Overrides = None,
    openai_api_key: Annotated[
        str | None,
        typer.Option(help="key for API-backed patient/judge (default: $OPENAI_API_KEY)", show_default=False),
    ] = None,
    load_checkpoint: Annotated[
        str | None, typer.Option(help="resume from runs/<run>/checkpoints/step-N")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="training steps [config, default 1000]")] = None,
    save_steps: Annotated[
        int | None, typer.Option(help="checkpoint every N steps [config, default 100]")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="scenarios (groups) per step [config, default 2]")
    ] = None,
    lora_rank: Annotated[int | None, typer.Option(help="LoRA rank [config, default 16]")] = None,
    num_generations: Annotated[
        int | None, typer.Option(help="episodes per group, G [config, default 4]")
    ] = None,
    num_rollout_workers: Annotated[int | None, typer.Option(help="rollout worker actors [config]")] = None,
) -> None:
    """Train the doctor with GRPO on Ray (local unless RAY_ADDRESS or ray.address is set)."""
    try:
        cfg = _load(
            config,
            overrides,
            {
                "train.max_steps": max_steps,
                "train.save_steps": save_steps,
                "train.batch_size": batch_size,
                "lora.rank": lora_rank,
                "grpo.num_generations": num_generations,
                "ray.num_rollout_workers": num_rollout_workers,
            },
        )
        api_key = openai_api_key or os.environ.get("OPENAI_API_KEY")
        if "openai" in (cfg.patient.kind, cfg.judge.kind) and not api_key:
            raise ConfigError(
                "the patient or judge uses an OpenAI-compatible API but no key was given; "
                "pass --openai-api-key or set OPENAI_API_KEY"
            )
        from pydantic import SecretStr

        from grpodx.orchestrator import Orchestrator

        orchestrator = Orchestrator(
            cfg, load_checkpoint=load_checkpoint, api_key=SecretStr(api_key) if api_key else None
        )
    except (ConfigError, FileNotFoundError) as exc:
        _fail(str(exc))
        return
    try:
        orchestrator.train()
    finally:
        orchestrator.shutdown()


@app.command("eval")
def evaluate(
    config: ConfigOption = Path("configs/tiny-cpu.yaml"),
    overrides: Overrides = None,
    checkpoint: Annotated[
        str | None, typer.Option(help="a checkpoint dir (its adapter is evaluated)")
    ] = None,
    cases: Annotated[int | None, typer.Option(help="held-out cases [config train.eval_cases]")] = None,
    temperature: Annotated[
        float | None, typer.Option(help="sampling temperature [config, 0 = greedy]")
    ] = None,
    openai_api_key: Annotated[
        str | None,
        typer.Option(help="key for API-backed patient/judge (default: $OPENAI_API_KEY)", show_default=False),
    ] = None,
) -> None:
    """Run the doctor on held-out cases and print accuracy, reward, turns, finished and leak shares."""
    from pydantic import SecretStr

    from grpodx.local import evaluate_locally

    api_key = openai_api_key or os.environ.get("OPENAI_API_KEY")
    try:
        cfg = _load(config, overrides, {"train.eval_cases": cases, "train.eval_temperature": temperature})
        summary = asyncio.run(evaluate_locally(cfg, checkpoint, SecretStr(api_key) if api_key else None))
    except ConfigError as exc:
        _fail(str(exc))
        return
    from grpodx.evaluation import format_summary

    typer.echo(
        format_summary(summary, "evaluation" + (f" of {checkpoint}" if checkpoint else " of the base doctor"))
    )


@app.command("build-tiny")
def build_tiny(config: ConfigOption = Path("configs/tiny-cpu.yaml"), overrides: Overrides = None) -> None:
    """Build (or find in the cache) the warm-started tiny doctor and print its directory."""
    try:
        cfg = _load(config, overrides, {})
    except ConfigError as exc:
        _fail(str(exc))
        return
    from grpodx.models import doctor_source

    typer.echo(doctor_source(cfg))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
