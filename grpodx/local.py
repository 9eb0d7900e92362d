"""In-process runs without Ray: doctors (the base, trained adapters) evaluated on the same held-out cases."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
from pydantic import SecretStr

from grpodx.config import Config, ConfigError
from grpodx.engines.base import AdapterWeights
from grpodx.env import make_judge, make_patient
from grpodx.learner import ADAPTER_DIR
from grpodx.medical.case_file import load_cases_for
from grpodx.medical.cases import CaseCard, eval_cases
from grpodx.medical.knowledge import load_knowledge_base
from grpodx.models import AdapterKeysError, best_device, doctor_source
from grpodx.preflight import check_api_backends
from grpodx.rollout import RolloutWorker

_PEFT_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "task_type")


def read_adapter(checkpoint: str | Path, version: int = 1) -> AdapterWeights:
    """A saved adapter (peft ``save_pretrained`` layout) as in-memory weights; ``checkpoint`` may be a
    local directory or a URI of the run storage (s3://..., file://...)."""
    if "://" in str(checkpoint):
        from grpodx.storage import RunStorage

        with tempfile.TemporaryDirectory(prefix="grpodx-adapter-") as tmp:
            RunStorage(str(checkpoint)).download_dir("", tmp)
            return read_adapter(tmp, version)
    from peft.utils import load_peft_weights

    directory = Path(checkpoint)
    if (directory / ADAPTER_DIR).is_dir():
        directory = directory / ADAPTER_DIR
    config_file = directory / "adapter_config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"{checkpoint} holds no adapter (no adapter_config.json); pass a checkpoint directory"
        )
    saved = json.loads(config_file.read_text())
    peft_config = {key: saved[key] for key in _PEFT_KEYS if key in saved}
    return AdapterWeights(version, load_peft_weights(str(directory), device="cpu"), peft_config)


async def evaluate_doctors(
    config: Config,
    checkpoints: Sequence[str | None],
    api_key: SecretStr | None = None,
    cases: Sequence[CaseCard] | None = None,
) -> list[pa.Table]:
    """Episodes of each doctor (``None``: the base doctor, else a checkpoint's adapter) on the same
    held-out cases with the same sampling seeds, so that their rewards pair up case by case; as
    trajectory records (``TRAJECTORY_SCHEMA``), like a training run's. ``cases`` (a user's, see
    grpodx.medical.case_file) replace the held-out set: the first ``train.eval_cases`` of the eval
    share of ``train.cases_file`` when that is set, else of the generated cards."""
    if cases is None:
        kb = load_knowledge_base()
        cases = eval_cases(kb, config.train.eval_cases, cases=load_cases_for(config, kb))
    source = doctor_source(config)
    await check_api_backends(config, api_key)
    patient, judge = make_patient(config, api_key), make_judge(config, api_key)
    device = best_device(config.ray.rollout_num_gpus)
    worker = RolloutWorker("eval", config, source, patient, judge, device=device)
    results = []
    try:
        for version, checkpoint in enumerate(checkpoints, start=1):
            if checkpoint is None:
                results.append(_table(await worker.evaluate(cases, 0, config.train.eval_temperature)))
                continue
            # Each adapter loads as the next version; the worker serves the newest one.
            try:
                worker.load_adapter(read_adapter(checkpoint, version))
            except AdapterKeysError as exc:  # name the checkpoint the user passed, not a version number
                message = str(exc).replace(f"adapter version {version}", str(checkpoint), 1)
                raise AdapterKeysError(message) from None
            results.append(_table(await worker.evaluate(cases, version, config.train.eval_temperature)))
    finally:
        for part in (patient, judge):
            close = getattr(part, "aclose", None)
            if close is not None:
                await close()
        await worker.engine.close()
    return results


def _table(batch: pa.RecordBatch) -> pa.Table:
    return pa.Table.from_batches([batch])
