"""The one-hot-conditioned MLP: every parameter shared, the output a plain MLP of [state, one-hot]."""

from __future__ import annotations

import torch

from tests.architecture_properties import ArchitectureContract, inputs, network, one_thread  # noqa: F401


class TestConditioned(ArchitectureContract):
    architecture = "conditioned"


def test_output_is_the_mlp_of_state_and_one_hot():
    net, x = network("conditioned"), inputs()
    layers = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    h = x
    for i, layer in enumerate(layers):
        h = h @ layer.weight.T + layer.bias
        if i < len(layers) - 1:
            h = h.clamp_min(0)
    torch.testing.assert_close(net(x), h, rtol=0, atol=1e-12)
