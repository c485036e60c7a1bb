"""`mtrl toy`: the landscape against values worked out by hand and finite differences, its Pareto set
against its optimality conditions, the stepping loop, and the command line (figure, table, --json, errors)."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from mtrl import toy
from mtrl.cli import main
from mtrl.combiners import COMBINERS, make_combiner
from mtrl.combiners.base import TaskLosses

CONFIGS = Path(__file__).parents[1] / "configs"


def test_losses_at_points_worked_out_by_hand():
    lower = math.tanh(4.0)  # the bowls' weight on the line x₂ = −8
    losses = toy.task_losses(torch.tensor([[7.0, -8.0], [-7.0, -8.0], [3.0, 0.0]], dtype=torch.float64))
    # Each bowl's centre: its own loss −20·tanh(4); the other bowl there: (14²/10 − 20)·tanh(4).
    expected = [[-20 * lower, (196 / 10 - 20) * lower], [(196 / 10 - 20) * lower, -20 * lower], [0.0, 0.0]]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-15, atol=1e-15)
    # The bottom of task 1's valley at x₂ = 2: (x₁ + 7)/2 = tanh(2), where the logarithm is floored.
    x1 = 2 * math.tanh(2.0) - 7
    valley = toy.task_losses(torch.tensor([x1, 2.0], dtype=torch.float64))[0]
    assert valley.item() == pytest.approx((math.log(5e-6) + 6) * math.tanh(1.0), rel=1e-12)


def test_gradients_match_central_differences():
    points = torch.tensor([[-8.5, 7.5], [-8.5, -5.0], [9.0, 9.0], [1.0, -8.3], [-2.0, 0.7]], dtype=torch.float64)
    _, gradients = toy.losses_and_gradients(points)
    step = 1e-6
    for coordinate in range(2):
        shift = torch.zeros(2, dtype=torch.float64)
        shift[coordinate] = step
        difference = (toy.task_losses(points + shift) - toy.task_losses(points - shift)) / (2 * step)
        torch.testing.assert_close(gradients[..., coordinate], difference, rtol=1e-7, atol=1e-8)


def test_the_pareto_set_meets_its_optimality_conditions():
    curve = toy.pareto_set(41)
    _, gradients = toy.losses_and_gradients(curve)
    first, second = gradients[:, 0], gradients[:, 1]
    # Inside, the two gradients are opposed (cosine −1); at the ends one of them vanishes: each end is a
    # task's minimiser (task 2's at x₁ = −7, task 1's at x₁ = 7).
    inside = slice(1, -1)
    cosine = (first * second).sum(-1)[inside] / (first.norm(dim=-1) * second.norm(dim=-1))[inside]
    torch.testing.assert_close(cosine, -torch.ones_like(cosine), rtol=0, atol=1e-12)
    assert second[0].norm() < 1e-12 and first[-1].norm() < 1e-12
    # Its middle minimises the average loss: the mean gradient vanishes there.
    assert curve[20, 0] == 0 and gradients[20].mean(0).norm() < 1e-12
    assert -8.37 < curve[20, 1] < -8.34  # the paper draws the set at x₂ = −8.3552


def test_each_start_steps_as_if_alone():
    # One Adam over every (method, start) point steps each as its own Adam would.
    together = toy.simulate(["mean", "pcgrad"], steps=50, learning_rate=0.05)
    for m, method in enumerate(["mean", "pcgrad"]):
        for s, start in enumerate(toy.STARTS):
            alone = toy.simulate([method], steps=50, learning_rate=0.05, starts=[start], seed=s)
            torch.testing.assert_close(together.points[m, s], alone.points[0, 0], rtol=0, atol=0)


def test_a_direction_that_serves_task_one_reaches_its_minimiser():
    # The seam for other kinds of methods: any function of a start's task gradients and losses. This one
    # follows task 1 alone.
    def task_one(method, generator):
        def direction(gradients, losses):
            assert gradients.shape == (2, 2) and losses.shape == (2,)
            return gradients[0]

        return direction

    trajectories = toy.simulate(["task one"], task_one, steps=400, learning_rate=0.1, starts=[(3.0, -7.0)])
    end = toy.pareto_set()[-1]
    assert (trajectories.final[0, 0] - end).norm() < 0.05


TOY_ONLY = {"cagrad": {"c": 0.5}, "famo": {"variant": "paper", "min_loss": -21.0}, "gradnorm": {"min_loss": -21.0}}
"""CAGrad's c from the paper's toy; a loss offset below the toy's losses (≥ −20) and FAMO's paper weights."""


def test_the_hyper_parameters_are_the_mt10_presets_with_cagrads_c_from_the_paper():
    for name in set(COMBINERS) - {"mean"}:  # mean's preset is mt10_mtsac.yaml, with no combiner keys
        expected = yaml.safe_load((CONFIGS / f"mt10_{name}.yaml").read_text())["combiner"]
        assert expected.pop("name") == name
        expected.pop("networks", None)  # which networks a combiner weighs: there are none in the toy
        expected.update(TOY_ONLY.get(name, {}))
        assert toy.TOY_HYPER_PARAMETERS.get(name, {}) == expected, name


def test_command_line_writes_the_figure_and_one_record_per_method_and_start(tmp_path, capsys):
    out = tmp_path / "figures" / "toy.png"
    assert (
        main(["toy", "--combiners", "mean,alignedmtl", "--steps", "100", "--lr", "0.05", "--out", str(out), "--json"])
        == 0
    )
    records = json.loads(capsys.readouterr().out)
    assert out.is_file() and out.stat().st_size > 10_000
    assert [(r["combiner"], r["start"]) for r in records] == [
        (name, list(start)) for name in ("mean", "alignedmtl") for start in toy.STARTS
    ]
    for record in records:
        assert set(record) == {"combiner", "start", "steps", "final_x", "final_f1", "final_f2", "final_mean"}
        assert record["steps"] == 100
        f1, f2 = toy.task_losses(torch.tensor(record["final_x"], dtype=torch.float64)).tolist()
        assert (record["final_f1"], record["final_f2"]) == (f1, f2) and record["final_mean"] == (f1 + f2) / 2
    assert main(["toy", "--combiners", "mean", "--steps", "20", "--out", str(tmp_path / "t.png")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["combiner", "start", "final", "x", "mean", "loss", "to", "Pareto"]
    assert len(table) == 1 + 3 + 2 and table[1].startswith("mean        (-8.5, 7.5)")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--combiners", "mean,fancy"], "--combiners: unknown combiner(s) 'fancy'; choose from: "),
        (["--steps", "0"], "--steps must be >= 1, found 0"),
        (["--lr", "-1"], "--lr must be a positive number, found -1.0"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "toy.png"
    assert main(["toy", *argv, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"mtrl: error: {message}") and error.count("\n") == 1
    assert not out.exists()


def test_the_loss_weighting_methods_learn_from_each_step_in_the_toy():
    """FAMO's logits and GradNorm's weights are committed after each step (`after_step`): a FAMO that
    never learns them follows another path from the same start."""
    learning = toy.simulate(["famo", "gradnorm"], steps=300, learning_rate=0.05, starts=[(-8.5, 7.5)])
    assert torch.isfinite(learning.points).all()
    frozen_famo = make_combiner("famo", **toy.TOY_HYPER_PARAMETERS["famo"])

    def frozen(name, generator):
        return lambda gradients, losses: frozen_famo(gradients, losses=TaskLosses("toy", losses, (("x", 2),)))

    never = toy.simulate(["famo"], frozen, steps=300, learning_rate=0.05, starts=[(-8.5, 7.5)])
    assert (never.final[0, 0] - learning.final[0, 0]).norm() > 1e-3
