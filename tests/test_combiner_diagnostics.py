"""The conflict statistics logged under `combiner/<network>/`, on gradients whose cosines are known exactly."""

import math

import pytest
import torch

from mtrl.combiners.diagnostics import gradient_diagnostics


def test_pairwise_cosines_norms_and_the_updates_angle():
    # task 0 and 2 point in opposite directions, task 1 is orthogonal to both
    matrix = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    weights = torch.tensor([0.2, 0.3, 0.5])
    out = gradient_diagnostics("critic", matrix, torch.tensor([1.0, 1.0]), weights)
    assert set(out) == {
        f"combiner/critic/{key}"
        for key in ("cos_mean", "cos_min", "conflict_share", "grad_norm", "update_angle_deg", "update_norm", "weights")
    }
    # ordered pairs i != j: two of the six have cosine -1, the others 0
    assert out["combiner/critic/cos_mean"].item() == pytest.approx(-1 / 3)
    assert out["combiner/critic/cos_min"].item() == -1.0
    assert out["combiner/critic/conflict_share"].item() == pytest.approx(1 / 3)
    assert out["combiner/critic/grad_norm"].tolist() == [1.0, 2.0, 1.0]
    # the mean gradient is (0, 2/3): 45 degrees from the update (1, 1)
    assert out["combiner/critic/update_angle_deg"].item() == pytest.approx(45.0, abs=1e-4)
    assert out["combiner/critic/update_norm"].item() == pytest.approx(math.sqrt(2))
    assert out["combiner/critic/weights"] is weights


def test_one_task_has_nothing_in_conflict_and_no_weights_means_no_weights_metric():
    gradients = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    out = gradient_diagnostics("actor", gradients, torch.tensor([-3.0, -4.0], dtype=torch.float64), None)
    assert "combiner/actor/weights" not in out
    assert out["combiner/actor/cos_mean"].item() == out["combiner/actor/cos_min"].item() == 1.0
    assert out["combiner/actor/conflict_share"].item() == 0.0
    assert out["combiner/actor/conflict_share"].dtype == torch.float32  # as with K > 1, whatever the gradients' dtype
    assert out["combiner/actor/grad_norm"].tolist() == [5.0]
    assert out["combiner/actor/update_angle_deg"].item() == pytest.approx(180.0, abs=1e-3)


def test_an_update_along_the_mean_gradient_is_at_zero_degrees_where_rounding_puts_the_cosine_above_one():
    matrix = torch.ones(2, 3)
    update = 3 * matrix.mean(0)
    assert (update @ matrix.mean(0) / (update.norm() * matrix.mean(0).norm())).item() > 1  # float32 rounding
    assert gradient_diagnostics("critic", matrix, update, None)["combiner/critic/update_angle_deg"].item() == 0.0
