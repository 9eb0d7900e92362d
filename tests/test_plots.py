"""The learning curve: a PNG drawn from metrics.jsonl alone, with the moving average it shows."""

from __future__ import annotations

import io
import json
import math

import pytest

from grpodx.plots import LEARNING_CURVE_FILE, learning_curve_png, moving_average, write_learning_curve


def test_moving_average_is_a_trailing_mean_that_skips_missing_values():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    averaged = moving_average([1.0, float("nan"), 5.0], 3)
    assert averaged[:2] == [1.0, 1.0] and averaged[2] == 3.0
    assert math.isnan(moving_average([float("nan")], 3)[0])


def _rows(steps: int) -> list[dict]:
    rows = [{"step": 0, "eval/mean_reward": 0.40, "eval/reward_stderr": 0.015, "eval/accuracy": 0.38}]
    rows.append({"step": 0, "eval_greedy/mean_reward": 0.52, "eval_greedy/reward_stderr": 0.015})
    for step in range(1, steps + 1):
        rows.append(
            {
                "step": step,
                "reward/mean": 0.4 + 0.002 * step,
                "reward/accuracy": 0.35 + 0.002 * step,
                "learner/kl": 0.001 * step if step != 3 else None,  # a step without a value
                "episodes/turns": 2.5 + 0.01 * step,
                "interview/information_gain": 0.8 + 0.005 * step,
            }
        )
    rows.append({"step": steps, "eval/mean_reward": 0.55, "eval/reward_stderr": 0.015, "eval/accuracy": 0.5})
    rows.append({"step": steps, "eval_paired/reward_diff": 0.15, "eval_paired/reward_diff_stderr": 0.012})
    return rows


def test_learning_curve_is_a_png_of_the_runs_metrics(tmp_path):
    from matplotlib.image import imread

    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(row) for row in _rows(40)) + "\n")
    path = write_learning_curve(str(tmp_path))
    assert path == str(tmp_path / LEARNING_CURVE_FILE)
    image = imread(path)
    height, width = image.shape[:2]
    assert width > 800 and height > 800
    # Not a blank canvas: the curves put many distinct colours on it.
    assert len({tuple(pixel) for pixel in image[::7, ::7].reshape(-1, image.shape[2]).tolist()}) > 50


def test_learning_curve_of_a_run_without_evaluations():
    rows = [row for row in _rows(5) if "reward/mean" in row]
    png = learning_curve_png(rows)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    from matplotlib.image import imread

    assert imread(io.BytesIO(png)).shape[0] > 0


@pytest.mark.parametrize("missing", ["learner/kl", "interview/information_gain"])
def test_learning_curve_tolerates_missing_series(missing):
    rows = [{k: v for k, v in row.items() if k != missing} for row in _rows(4)]
    assert learning_curve_png(rows).startswith(b"\x89PNG")
