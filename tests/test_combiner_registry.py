"""The registry and `make_combiner`: names, hyper-parameters and the errors a config author sees."""

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mtrl.combiners import (
    COMBINERS,
    HyperParameters,
    check_hyper_parameter_names,
    check_hyper_parameters,
    make_combiner,
)
from mtrl.combiners.base import check_number
from mtrl.combiners.cagrad import CAGradParameters
from mtrl.combiners.sdmgrad import SDMGradParameters
from mtrl.combiners.simplex import SimplexProgram

TESTS = Path(__file__).parent

DEFAULTS = {
    "mean": {},
    "cagrad": {"c": 0.4, "rescale": 1, "solver": "exact"},
    "conicgrad": {"c": 0.5},
    "sdmgrad": {"lam": 0.6, "solver": "exact"},
    "sdmgrad_os": {"lam": 0.6, "n": 4, "solver": "exact"},
    "imgrad": {"c": 0.8, "variant": "paper", "rescale": 1},
    "mgda": {},
    "pcgrad": {},
    "nashmtl": {},
    "famo": {"logit_lr": 0.025, "logit_decay": 0.01, "min_loss": 0.0, "variant": "paper"},
    "gradnorm": {"alpha": 0.12, "weight_lr": 3e-4, "min_loss": 0.0, "variant": "paper"},
}


def test_registry_names_and_defaults():
    """The combiners shipped so far keep their names and defaults; any combiner comes with its test file."""
    assert set(DEFAULTS) <= set(COMBINERS)
    assert all((TESTS / f"test_combiner_{name}.py").is_file() for name in COMBINERS)
    for name, defaults in DEFAULTS.items():
        assert make_combiner(name).hyper_parameters == defaults
        assert dataclasses.asdict(check_hyper_parameters(name, {})) == defaults


def test_each_combiner_declares_its_hyper_parameters_as_a_frozen_dataclass():
    for name, combiner in COMBINERS.items():
        parameters = combiner.Parameters
        assert issubclass(parameters, HyperParameters) and parameters.__dataclass_params__.frozen, name
        assert all(f.metadata.get("help") for f in dataclasses.fields(parameters)), name
        with pytest.raises(dataclasses.FrozenInstanceError):
            parameters().c = 1.0  # type: ignore[attr-defined]


def test_checking_hyper_parameters_gives_their_checked_values():
    assert check_hyper_parameters("cagrad", {"c": 1, "solver": "mtrl"}) == CAGradParameters(c=1.0, solver="mtrl")
    assert isinstance(check_hyper_parameters("cagrad", {"c": 1}).c, float)
    assert make_combiner("sdmgrad", lam=0.2).parameters == SDMGradParameters(lam=0.2)
    check_hyper_parameter_names("sdmgrad_os", ["n", "lam"])
    with pytest.raises(ValueError, match="^unknown hyper-parameter 'c' for combiner 'sdmgrad_os'; accepted: lam, "):
        check_hyper_parameter_names("sdmgrad_os", ["n", "c"])
    with pytest.raises(ValueError, match="^unknown combiner 'fancy'"):
        check_hyper_parameters("fancy", {})


def test_a_combiner_takes_only_its_own_hyper_parameters_type():
    with pytest.raises(TypeError) as info:
        COMBINERS["sdmgrad_os"](SDMGradParameters())
    assert str(info.value) == "SDMGradOS takes SDMGradOSParameters, found SDMGradParameters"


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError) as info:
        make_combiner("foo")
    assert str(info.value) == f"unknown combiner 'foo'; choose from: {', '.join(sorted(COMBINERS))}"
    assert set(DEFAULTS) <= set(str(info.value).split("choose from: ")[1].split(", "))


def test_unknown_hyper_parameter_names_it_and_the_accepted_ones():
    with pytest.raises(ValueError) as info:
        make_combiner("cagrad", lam=0.5)
    assert str(info.value) == "unknown hyper-parameter 'lam' for combiner 'cagrad'; accepted: c, rescale, solver"
    with pytest.raises(ValueError, match="accepted: none"):
        make_combiner("mgda", c=0.5)


@pytest.mark.parametrize(
    ("name", "hyper_parameters", "message"),
    [
        ("cagrad", {"c": -0.1}, "`c` must be >= 0, found -0.1"),
        ("cagrad", {"c": "0.4"}, "`c` must be a number, found '0.4'"),
        ("cagrad", {"rescale": 3}, "`rescale` must be one of 0, 1, 2, found 3"),
        ("cagrad", {"solver": "cvxpy"}, "`solver` must be one of 'exact', 'mtrl', found 'cvxpy'"),
        ("conicgrad", {"c": 0.0}, "`c` must be in (0, 1], found 0.0"),
        ("conicgrad", {"c": 1.3}, "`c` must be in (0, 1], found 1.3"),
        ("sdmgrad", {"lam": -1}, "`lam` must be >= 0, found -1"),
        ("sdmgrad", {"lam": float("nan")}, "`lam` must be >= 0, found nan"),
        ("sdmgrad_os", {"n": 0}, "`n` must be >= 1, found 0"),
        ("sdmgrad_os", {"n": 2.5}, "`n` must be an integer, found 2.5"),
        ("imgrad", {"variant": "both"}, "`variant` must be one of 'paper', 'code', found 'both'"),
        ("imgrad", {"c": True}, "`c` must be a number, found True"),
    ],
)
def test_out_of_range_values_name_the_parameter_and_the_value(name, hyper_parameters, message):
    with pytest.raises(ValueError) as info:
        make_combiner(name, **hyper_parameters)
    assert str(info.value) == message


def test_integral_values_are_accepted_for_real_parameters():
    assert make_combiner("cagrad", c=1).hyper_parameters["c"] == 1.0
    assert make_combiner("cagrad", rescale=2.0).hyper_parameters["rescale"] == 2


def test_gramian_of_large_gradients_over_many_parameters_stays_finite():
    from mtrl.combiners.base import gramian

    # Every entry of G Gᵀ is 1000 x 1e36: fine in float64, past float32's range if the product were formed in float32.
    matrix = torch.full((2, 1000), 1e18, dtype=torch.float32)
    result = gramian(matrix)
    assert result.dtype == torch.float64 and torch.isfinite(result).all()
    torch.testing.assert_close(result, matrix.double() @ matrix.double().T, rtol=1e-6, atol=0)


@pytest.mark.parametrize("huge", [3e38, -3e38, torch.finfo(torch.float32).max])
def test_gramian_of_a_huge_finite_float32_entry_is_finite(huge):
    from mtrl.combiners.base import gramian

    # Within a factor 2 of float32's largest number, the power of two that scales G does not exist in float32.
    matrix = torch.tensor([[huge, 1.0, -2.0], [1.0, 2.0, 3.0]], dtype=torch.float32)
    reference = matrix.double() @ matrix.double().T  # representable in float64
    result = gramian(matrix)
    assert torch.isfinite(result).all()
    # float32's precision relative to the largest entry (the small ones underflow in the scaled product)
    torch.testing.assert_close(result, reference, rtol=1e-6, atol=1e-6 * reference.abs().max().item())


@pytest.mark.parametrize(
    ("huge", "small", "product"),
    [(1e200, 0.5, 5e199), (torch.finfo(torch.float64).max, 2.0, torch.inf)],  # max x 2 overflows float64
)
def test_gramian_beyond_float64_is_infinite_where_it_overflows_and_raises_nothing(huge, small, product):
    from mtrl.combiners.base import gramian

    matrix = torch.tensor([[huge, 0.0, 0.0], [0.0, 2.0, 0.0], [small, 0.0, 0.0]], dtype=torch.float64)
    result = gramian(matrix)
    assert not result.isnan().any()
    assert result[0, 0] == torch.inf and result[0, 1] == result[1, 0] == 0  # 0, not 0 x inf
    assert result[0, 2] == result[2, 0] == pytest.approx(product, rel=1e-15)


@pytest.mark.parametrize(
    "name, given, kept",
    [
        ("imgrad", {"c": 1, "rescale": 2.0}, {"c": 1.0, "rescale": 2}),
        ("sdmgrad", {"lam": 1}, {"lam": 1.0}),
        ("sdmgrad_os", {"lam": 2, "n": np.int64(3)}, {"lam": 2.0, "n": 3}),
    ],
)
def test_numeric_hyper_parameters_are_kept_in_their_checked_form(name, given, kept):
    parameters = make_combiner(name, **given).hyper_parameters
    for key, value in kept.items():
        assert parameters[key] == value and type(parameters[key]) is type(value), (key, parameters[key])


def test_a_half_open_range_is_written_as_such_in_the_refusal():
    with pytest.raises(ValueError, match=re.escape("`x` must be in (0, 1), found 1.0")):
        check_number("x", 1.0, low=0.0, high=1.0, low_open=True, high_open=True)
    with pytest.raises(ValueError, match=re.escape("`x` must be in [0, 1], found 2")):
        check_number("x", 2, low=0.0, high=1.0)


def test_every_hyper_parameter_has_the_help_that_train_help_prints():
    for name in COMBINERS:
        for f in dataclasses.fields(make_combiner(name).parameters):
            assert f.metadata["help"].strip(), (name, f.name)


def test_a_simplex_programs_objective_at_a_batch_of_points():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randn(3, 3, generator=g, dtype=torch.float64)
    linear, quadratic, root = torch.randn(3, generator=g, dtype=torch.float64), a @ a.T, b @ b.T
    program = SimplexProgram(size=3, linear=linear, quadratic=quadratic, root_weight=0.7, root_matrix=root)
    points = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.0, 0.4, 0.6]], dtype=torch.float64)
    expected = [float(x @ linear + 0.5 * x @ quadratic @ x + 0.7 * (x @ root @ x).sqrt()) for x in points]
    assert program.value(points).tolist() == pytest.approx(expected, rel=1e-12)


def test_a_combiner_shows_its_name_and_hyper_parameters():
    assert repr(make_combiner("cagrad", c=0.3)) == "CAGrad(c=0.3, rescale=1, solver='exact')"
    assert repr(make_combiner("mean")) == "Mean()"


def test_mean_weights_every_task_alike():
    gramian = torch.tensor([[4.0, -1.0, 0.0], [-1.0, 1.0, 0.5], [0.0, 0.5, 9.0]], dtype=torch.float64)
    assert make_combiner("mean").weights(gramian).tolist() == [1 / 3] * 3


def test_random_draws_are_made_on_the_generators_device_whatever_torchs_default_device():
    gramian = torch.tensor([[4.0, -1.0, 0.5], [-1.0, 1.0, 0.2], [0.5, 0.2, 2.0]], dtype=torch.float64)
    pcgrad, sdmgrad_os = make_combiner("pcgrad"), make_combiner("sdmgrad_os", n=2)
    keys = pcgrad.draw(3, torch.Generator().manual_seed(3))
    expected = pcgrad.weights(gramian, keys)
    drawn = sdmgrad_os.select_tasks(6, torch.Generator().manual_seed(1))
    with torch.device("meta"):  # a default device with no data, where the CPU generators cannot draw
        selected = make_combiner("mean").select_tasks(4, torch.Generator(device="cpu"))
        keys_here = pcgrad.draw(3, torch.Generator(device="cpu").manual_seed(3))
        assert keys_here.device == torch.device("cpu") and torch.equal(keys_here, keys)
        assert torch.equal(pcgrad.weights(gramian, keys_here), expected)
        assert torch.equal(sdmgrad_os.select_tasks(6, torch.Generator(device="cpu").manual_seed(1)), drawn)
    assert selected.device == torch.device("cpu") and selected.tolist() == [0, 1, 2, 3]
