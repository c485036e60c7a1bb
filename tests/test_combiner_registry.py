"""The registry and `make_combiner`: names, hyper-parameters and the errors a config author sees."""

import dataclasses
from pathlib import Path

import pytest
import torch

from mtrl.combiners import (
    COMBINERS,
    HyperParameters,
    check_hyper_parameter_names,
    check_hyper_parameters,
    make_combiner,
)
from mtrl.combiners.cagrad import CAGradParameters
from mtrl.combiners.sdmgrad import SDMGradParameters

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
