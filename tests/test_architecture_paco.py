"""PaCo (Sun et al., NeurIPS 2022): task k's network is the shared parameter sets composed with w_k."""

from __future__ import annotations

import torch

from tests.architecture_properties import OBS, ArchitectureContract, K, inputs, network, one_thread  # noqa: F401


class TestPaCo(ArchitectureContract):
    architecture = "paco"


def paco():
    """A PaCo network whose shared offset of w is not zero (it starts at zero, which would hide it)."""
    net = network("paco")
    with torch.no_grad():
        net.task_vector_offset.copy_(torch.linspace(-0.5, 0.7, net.task_vector_offset.numel()))
    return net


def test_task_ks_weights_are_the_shared_sets_composed_with_its_vector():
    net = paco()
    sets = net.task_vector.weight.shape[1]
    vectors = net.compositional_vector()
    for k in range(K):
        w = net.task_vector.weight[k] + net.task_vector_offset  # the linear map of the one-hot, with its bias
        torch.testing.assert_close(vectors[k], w, rtol=0, atol=0)
        for layer in net.layers:
            weight, bias = layer.compose(w)
            expected_weight = sum(w[s] * layer.weight[s] for s in range(sets))
            expected_bias = sum(w[s] * layer.bias[s] for s in range(sets))
            torch.testing.assert_close(weight, expected_weight, rtol=0, atol=1e-14)
            torch.testing.assert_close(bias, expected_bias, rtol=0, atol=1e-14)


def test_output_is_task_ks_composed_network_and_the_mixture_of_the_sets_outputs():
    net, x = paco(), inputs()
    sets = net.task_vector.weight.shape[1]
    out = net(x)
    for k in range(K):
        w = net.task_vector.weight[k] + net.task_vector_offset
        composed, mixed = x[k, :, :OBS], x[k, :, :OBS]
        for i, layer in enumerate(net.layers):
            weight = sum(w[s] * layer.weight[s] for s in range(sets))
            bias = sum(w[s] * layer.bias[s] for s in range(sets))
            composed = composed @ weight + bias
            # the reference code's form: every set's layer output, mixed with w_k
            mixed = sum(w[s] * (mixed @ layer.weight[s] + layer.bias[s]) for s in range(sets))
            if i < len(net.layers) - 1:
                composed, mixed = composed.clamp_min(0), mixed.clamp_min(0)
        torch.testing.assert_close(out[k], composed, rtol=0, atol=1e-12)
        torch.testing.assert_close(out[k], mixed, rtol=0, atol=1e-12)
