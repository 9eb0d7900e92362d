"""Command line: ``grpodx train | eval | build-tiny | bench``."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated

import typer
from pydantic import SecretStr

from grpodx.config import Config, ConfigError, load_config

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="GRPO training of a diagnosing doctor model."
)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="YAML config in configs/")]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        help="key for an API-backed patient/judge; visible to other local users in `ps`: prefer "
        "$OPENAI_API_KEY or --openai-api-key-file",
        show_default=False,
    ),
]
ApiKeyFileOption = Annotated[
    Path | None,
    typer.Option(help="a file holding the API key (its first line), e.g. one only you can read"),
]
Overrides = Annotated[list[str] | None, typer.Argument(help="section.key=value overrides, e.g. grpo.lr=1e-3")]


# The config key each flag sets, by the flag's name: a bad value is blamed on the flag.
FLAG_NAMES = {
    "train.max_steps": "--max-steps",
    "train.save_steps": "--save-steps",
    "train.batch_size": "--batch-size",
    "lora.rank": "--lora-rank",
    "grpo.num_generations": "--num-generations",
    "ray.num_rollout_workers": "--num-rollout-workers",
    "train.eval_cases": "--cases",
    "train.eval_temperature": "--temperature",
}


def _default_of(key: str) -> str:
    """ "(config; default N)" for a flag's help, N read from the config model so that it cannot drift.
    Parentheses, not brackets: typer renders help as rich markup, where "[...]" is a style tag and
    vanishes."""
    section, name = key.split(".")
    return f"(config; default {Config.model_fields[section].default_factory().model_fields[name].default})"


def _load(config_path: Path, overrides: list[str] | None, flags: dict[str, object]) -> Config:
    given = {key: value for key, value in flags.items() if value is not None}
    extra = [f"{key}={value}" for key, value in given.items()]
    origins = {f"{key}={value}": f"{FLAG_NAMES.get(key, key)} {value}" for key, value in given.items()}
    return load_config(config_path, extra + list(overrides or []), origins)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _api_key(flag: str | None, key_file: Path | None) -> str | None:
    """The key from --openai-api-key, --openai-api-key-file or $OPENAI_API_KEY (in that order)."""
    if flag and key_file:
        _fail("pass --openai-api-key or --openai-api-key-file, not both")
    if key_file is not None:
        try:
            lines = key_file.read_text().splitlines()
        except OSError as exc:
            _fail(f"--openai-api-key-file {key_file}: cannot read it ({exc.strerror or exc})")
        key = lines[0].strip() if lines else ""
        if not key:
            _fail(f"--openai-api-key-file {key_file}: the file is empty; put the key on its first line")
        return key
    return flag or os.environ.get("OPENAI_API_KEY") or None


def _check_api_key(cfg: Config, api_key: str | None) -> SecretStr | None:
    """The key as a SecretStr when a patient or judge is API-backed (a ConfigError if it has none)."""
    from grpodx.env import require_api_key

    secret = SecretStr(api_key) if api_key else None
    roles = [role for role in ("patient", "judge") if getattr(cfg, role).kind == "openai"]
    for role in roles:
        require_api_key(secret, role)
    return secret if roles else None


def _number_or_auto(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is neither a number nor auto") from None


def _job_args(
    config_path: Path,
    overrides: list[str] | None,
    flags: dict[str, object],
    load_checkpoint: str | None,
    cfg: Config,
) -> list[str]:
    """The arguments of ``grpodx train`` inside the job: the same run, as the job's cwd sees it."""
    from grpodx.submit import path_in_project, project_root

    args = ["--config", path_in_project(config_path, project_root())]
    if load_checkpoint:  # a path or URI on the cluster's storage, not checked here
        args += ["--load-checkpoint", load_checkpoint]
    args += [f"{key}={value}" for key, value in flags.items() if value is not None]
    args += list(overrides or [])
    if cfg.ray.address:  # inside the job, RAY_ADDRESS names the cluster itself
        args.append("ray.address=null")
    return args


def _submit_job(address: str, job_args: list[str], cfg: Config, api_key: str | None) -> int:
    from grpodx.submit import submit_training

    if "://" not in cfg.train.run_dir:
        typer.secho(
            f"warning: train.run_dir={cfg.train.run_dir} is a directory on the cluster's nodes, not on "
            "this machine, and each node would write its own; set a storage URI every node shares, "
            "e.g. train.run_dir=s3://<bucket>/grpodx-runs",
            fg=typer.colors.YELLOW,
            err=True,
        )
    # The key reaches the job only through its runtime env (see docs/cluster.md).
    return submit_training(address, job_args, env_vars={"OPENAI_API_KEY": api_key} if api_key else None)


@app.command()
def train(
    config: ConfigOption = Path("configs/tiny-cpu.yaml"),
    overrides: Overrides = None,
    openai_api_key: ApiKeyOption = None,
    openai_api_key_file: ApiKeyFileOption = None,
    load_checkpoint: Annotated[
        str | None, typer.Option(help="resume from runs/<run>/checkpoints/step-N")
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option(help=f"training steps {_default_of('train.max_steps')}")
    ] = None,
    save_steps: Annotated[
        int | None, typer.Option(help=f"checkpoint every N steps {_default_of('train.save_steps')}")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help=f"scenarios (groups) per step {_default_of('train.batch_size')}")
    ] = None,
    lora_rank: Annotated[int | None, typer.Option(help=f"LoRA rank {_default_of('lora.rank')}")] = None,
    num_generations: Annotated[
        int | None, typer.Option(help=f"episodes per group, G {_default_of('grpo.num_generations')}")
    ] = None,
    num_rollout_workers: Annotated[
        str | None,
        typer.Option(
            help="rollout worker actors: a number, or auto (one per rollout node) (config)",
            callback=_number_or_auto,
        ),
    ] = None,
    submit: Annotated[
        bool | None,
        typer.Option(
            "--submit/--no-submit",
            help="run as a Ray job; default: when RAY_ADDRESS or ray.address is Ray's Jobs API, "
            "http(s)://<head>:8265",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Train the doctor with GRPO on Ray: locally, on the cluster at RAY_ADDRESS / ray.address, or as a
    Ray job when that address is the Jobs API's (http://<head>:8265)."""
    flags = {
        "train.max_steps": max_steps,
        "train.save_steps": save_steps,
        "train.batch_size": batch_size,
        "lora.rank": lora_rank,
        "grpo.num_generations": num_generations,
        "ray.num_rollout_workers": num_rollout_workers,
    }
    try:
        cfg = _load(config, overrides, flags)
        api_key = _api_key(openai_api_key, openai_api_key_file)
        secret = _check_api_key(cfg, api_key)
        from grpodx.submit import decide_submit

        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        if decide_submit(address, submit):
            job_args = _job_args(config, overrides, flags, load_checkpoint, cfg)
            exit_code = _submit_job(address, job_args, cfg, api_key if secret else None)
            raise typer.Exit(exit_code)
        from grpodx.orchestrator import Orchestrator

        orchestrator = Orchestrator(cfg, load_checkpoint=load_checkpoint, api_key=secret)
    except (ConfigError, FileNotFoundError) as exc:
        _fail(str(exc))
        return
    from grpodx.stopping import TrainingHalted, TrainingInterrupted
    from grpodx.storage import RunDirectoryInUse

    try:
        orchestrator.train()
    except (ConfigError, RunDirectoryInUse) as exc:
        _fail(str(exc))
    except TrainingInterrupted as exc:
        typer.secho(str(exc), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None  # the shell's code for "stopped by Ctrl-C"
    except TrainingHalted as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    finally:
        orchestrator.shutdown()


@app.command("eval")
def evaluate(
    config: ConfigOption = Path("configs/tiny-cpu.yaml"),
    overrides: Overrides = None,
    checkpoint: Annotated[
        str | None, typer.Option(help="a checkpoint dir (its adapter is evaluated)")
    ] = None,
    cases: Annotated[
        int | None,
        typer.Option(
            help="held-out cases (config train.eval_cases); with --cases-file, its first N (default all)"
        ),
    ] = None,
    cases_file: Annotated[
        Path | None,
        typer.Option(
            "--cases-file",
            help="evaluate on the cases of this JSONL file: case cards of the knowledge base, or AgentClinic "
            "OSCE vignettes (needs patient.kind=openai)",
        ),
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="sampling temperature (config, 0 = greedy)")
    ] = None,
    compare: Annotated[
        str | None,
        typer.Option(
            help="a second doctor, 'base' or a checkpoint dir, run on the same cases and seeds; "
            "prints the paired difference (--checkpoint minus --compare)"
        ),
    ] = None,
    openai_api_key: ApiKeyOption = None,
    openai_api_key_file: ApiKeyFileOption = None,
    out: Annotated[
        Path | None,
        typer.Option(help="where the episodes go, one Parquet file per doctor (default: runs/eval-<time>)"),
    ] = None,
) -> None:
    """Run the doctor on held-out cases and print accuracy, reward, turns, finished and leak shares."""
    from grpodx.evaluation import format_paired, format_summary, paired_difference, summarize
    from grpodx.local import evaluate_doctors
    from grpodx.medical.knowledge import load_knowledge_base

    api_key = _api_key(openai_api_key, openai_api_key_file)
    doctors = [checkpoint] if compare is None else [checkpoint, None if compare == "base" else compare]
    if compare is not None and doctors[0] == doctors[1]:
        _fail("--compare names the doctor being evaluated; pass --checkpoint DIR to compare it with the base")
    try:
        cfg = _load(config, overrides, {"train.eval_cases": cases, "train.eval_temperature": temperature})
        # valid for training (no evaluation), not for `eval`; a cases file alone means all its cases
        if cfg.train.eval_cases < 1 and (cases_file is None or cases is not None):
            given = f"--cases {cases}" if cases is not None else f"train.eval_cases={cfg.train.eval_cases}"
            _fail(f"{given}: nothing to evaluate; pass --cases N with N >= 1")
        file_cases = None
        if cases_file is not None:
            from grpodx.medical.case_file import load_case_file

            label = f"--cases-file {cases_file}"
            loaded = load_case_file(cases_file, load_knowledge_base(), label)
            loaded.check_playable(cfg, label)
            file_cases = list(loaded.cards if cases is None else loaded.cards[:cases])
        results = asyncio.run(evaluate_doctors(cfg, doctors, _check_api_key(cfg, api_key), file_cases))
    except ConfigError as exc:
        _fail(str(exc))
        return
    import time

    from grpodx.storage import RunStorage

    num_conditions = len(load_knowledge_base().conditions)
    name = time.strftime("eval-%Y%m%d-%H%M%S")
    storage = RunStorage(out) if out else RunStorage(cfg.train.run_dir).child(name)
    written: list[str] = []
    for doctor, episodes in zip(doctors, results, strict=True):
        title = "evaluation" + (f" of {doctor}" if doctor else " of the base doctor")
        typer.echo(format_summary(summarize(episodes, num_conditions), title))
        name = "base" if doctor is None else Path(str(doctor).rstrip("/")).name
        if name in written:  # two checkpoints may share a base name (step-000100 of two runs)
            name += f"-{len(written) + 1}"
        written.append(name)
        storage.write_parquet(f"{name}.parquet", episodes)
        typer.echo(f"episodes: {storage.display(f'{name}.parquet')}")
    if compare is not None:
        paired = paired_difference(results[0], results[1])
        typer.echo(format_paired(paired, f"{doctors[0] or 'base'} minus {compare}"))


@app.command("build-tiny")
def build_tiny(
    config: ConfigOption = Path("configs/tiny-cpu.yaml"),
    overrides: Overrides = None,
    rebuild: Annotated[
        bool,
        typer.Option(
            "--rebuild",
            help="build from the recipe even if the doctor is shipped or cached, then compare it with "
            "the shipped one",
        ),
    ] = False,
    ship: Annotated[
        bool,
        typer.Option("--ship", help="with --rebuild: replace the doctor shipped in grpodx/tiny/doctor/"),
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="with --rebuild: where to build (default: the cache)")
    ] = None,
) -> None:
    """Find the warm-started tiny doctor (shipped with the package, or built once per recipe into the
    cache) and print its directory; --rebuild builds it again from its recipe."""
    try:
        cfg = _load(config, overrides, {})
    except ConfigError as exc:
        _fail(str(exc))
        return
    if (ship or out) and not rebuild:
        _fail("--ship and --out apply to a rebuild; add --rebuild")
    if not rebuild:
        from grpodx.models import doctor_source

        typer.echo(doctor_source(cfg))
        return
    from grpodx.tiny import build

    wanted = build.recipe_hash(cfg.model, cfg.episode)
    target = build.SHIPPED_DIR if ship else out or build.cache_root(cfg.model) / f"tiny-doctor-{wanted}"
    shipped = build.shipped_recipe()
    # Kept aside before a --ship overwrites it, to say what changed.
    reference = build.snapshot(build.SHIPPED_DIR) if shipped and shipped["recipe_hash"] == wanted else None
    build.rebuild(cfg.model, cfg.episode, target)
    typer.echo(f"built {target} (recipe {wanted})")
    if reference is None:
        typer.echo("the shipped doctor has another recipe; nothing to compare with")
        return
    typer.echo(build.compare(reference, build.snapshot(target)))


@app.command()
def bench(
    config: ConfigOption = Path("configs/tiny-cpu.yaml"),
    overrides: Overrides = None,
    quick: Annotated[bool, typer.Option("--quick", help="small sizes, 1 repeat (1-2 minutes)")] = False,
    smoke: Annotated[bool, typer.Option("--smoke", hidden=True, help="the tests' smallest sizes")] = False,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="run only this benchmark (repeat, or a,b)")
    ] = None,
    repeats: Annotated[
        int | None, typer.Option(min=1, help="repeats per measurement (3; with --quick 1)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default: runs/bench-<timestamp>)")] = None,
    device: Annotated[str, typer.Option(help="learner benchmark device: cpu, or cuda for a GPU")] = "cpu",
) -> None:
    """Benchmark rollouts under API latency, weight push, rollout overhead and the learner."""
    import time

    from grpodx.bench import select
    from grpodx.bench.core import BenchContext, invocation, run_suite

    names = [name for item in only or [] for name in item.split(",") if name]
    try:
        benchmarks = select(names)
    except ValueError as exc:
        _fail(str(exc))
        return
    if device not in ("cpu", "cuda"):
        _fail(f"--device {device}: use cpu or cuda")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            _fail("--device cuda needs a CUDA GPU and a CUDA build of torch; none is visible here")
    run_dir = out or Path("runs") / time.strftime("bench-%Y%m%d-%H%M%S")
    try:
        ctx = BenchContext(
            config,
            overrides or [],
            scale="smoke" if smoke else "quick" if quick else "full",
            repeats=repeats,
            device=device,
            out_dir=run_dir,
        )
    except ConfigError as exc:
        _fail(str(exc))
        return
    typer.echo(f"benchmark run directory: {run_dir}")
    report = run_suite(benchmarks, ctx, invocation(), run_dir)
    typer.echo(f"\nwrote {run_dir / 'bench.json'} and {run_dir / 'bench.md'} ({report['duration_s']:.0f} s)")
    if report["failed"]:
        _fail(f"benchmark(s) failed: {', '.join(report['failed'])} (see {run_dir / 'bench.json'})")


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Option(help="a checkpoint dir, runs/<run>/checkpoints/step-N")],
    out: Annotated[Path, typer.Option(help="a new or empty directory to write to")],
    merge: Annotated[
        bool,
        typer.Option("--merge", help="merge the adapter into the base weights: a plain transformers model"),
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="the run's config (default: the run's config.yaml, else configs/tiny-cpu.yaml)",
        ),
    ] = None,
    overrides: Overrides = None,
) -> None:
    """Write a checkpoint's adapter alone (peft format), or merged into the base model (--merge)."""
    from grpodx.export import export_checkpoint, run_config_of

    config_path = config or run_config_of(checkpoint) or Path("configs/tiny-cpu.yaml")
    try:
        cfg = _load(config_path, overrides, {})
        info = export_checkpoint(cfg, checkpoint, out, merge=merge)
    except ConfigError as exc:
        _fail(str(exc))
        return
    if merge:
        typer.echo(f"wrote {out}: {info['base_model']} with the adapter of {checkpoint} merged in")
        typer.echo(f"load it with AutoModelForCausalLM.from_pretrained('{out}') (no peft needed)")
    else:
        typer.echo(f"wrote {out}: the LoRA adapter of {checkpoint} (peft), for {info['base_model']}")
        typer.echo(f"serve it with vLLM: --enable-lora --lora-modules doctor={out}")


@app.command()
def report(
    run_dir: Annotated[
        str, typer.Argument(help="the run directory: a path, or a URI such as s3://bucket/runs/<run>")
    ],
) -> None:
    """Write <run>/report/report.html, one self-contained page (learning curves, held-out results,
    per-condition accuracy, demographic slices, transcripts, API cost), and print its path."""
    from grpodx.report import NotARunDirectory, write_report

    try:
        typer.echo(write_report(run_dir))
    except NotARunDirectory as exc:
        _fail(str(exc))


@app.command()
def chat(
    config: ConfigOption = Path("configs/tiny-cpu.yaml"),
    overrides: Overrides = None,
    checkpoint: Annotated[
        str | None, typer.Option(help="a checkpoint dir whose adapter talks (default: the base doctor)")
    ] = None,
    simulate: Annotated[
        bool, typer.Option("--simulate", help="watch the doctor interview a simulated patient instead")
    ] = False,
    case: Annotated[int | None, typer.Option(help="with --simulate: held-out case number (0)")] = None,
    condition: Annotated[
        str | None, typer.Option(help="with --simulate: the first held-out case of this condition")
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="sampling temperature (config train.eval_temperature)")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="where conversations.jsonl goes (the checkpoint's run)/chats")
    ] = None,
    openai_api_key: ApiKeyOption = None,
    openai_api_key_file: ApiKeyFileOption = None,
) -> None:
    """Talk with the doctor as its patient (its reasoning hidden; /reasoning shows it), or with
    --simulate watch it interview a simulated patient. Conversations are saved as JSONL."""
    from grpodx import chat as chatting
    from grpodx.medical.knowledge import load_knowledge_base

    if (case is not None or condition is not None) and not simulate:
        _fail("--case and --condition choose the simulated patient; add --simulate")
    try:
        cfg = _load(config, overrides, {"train.eval_temperature": temperature})
        api_key = _api_key(openai_api_key, openai_api_key_file)
        secret = _check_api_key(cfg, api_key) if simulate else None
        directory = chatting.conversation_dir(cfg, checkpoint, out)
        console = chatting.Console(
            read=_read_line, write=typer.echo, dim=lambda text: typer.style(text, dim=True)
        )
        if simulate:
            console.show_reasoning = True  # dimmed: the point of watching is to see it think
            card = chatting.find_case(load_knowledge_base(), case, condition)
            asyncio.run(
                chatting.simulate_interview(
                    cfg, checkpoint, card, console, directory, cfg.train.eval_temperature, secret
                )
            )
            return
        saved = asyncio.run(
            chatting.chat_with_doctor(cfg, checkpoint, console, directory, cfg.train.eval_temperature)
        )
    except ConfigError as exc:
        _fail(str(exc))
        return
    typer.echo(f"conversations saved to {saved}" if saved else "nothing was said; nothing saved")


def _read_line(prompt: str) -> str | None:
    """A line typed at the console; None at the end of the input (Ctrl-D, or piped input ran out)."""
    try:
        return input(prompt)
    except EOFError:
        typer.echo("")
        return None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
