"""FiLM (Perez et al., AAAI 2018): each encoder layer is modulated as γ_k ⊙ h + β_k, against a loop."""

from __future__ import annotations

import torch

from tests.architecture_properties import (  # noqa: F401
    OBS,
    ArchitectureContract,
    K,
    inputs,
    network,
    one_thread,
    plain_mlp,
)


class TestFiLM(ArchitectureContract):
    architecture = "film"


def test_each_encoder_layer_is_modulated_by_its_tasks_gamma_and_beta():
    net, x = network("film"), inputs()
    gamma, beta = net.modulation()
    out = net(x)
    depth = len(net.encoder)
    for k in range(K):
        e = net.task_embedding.weight[k].clamp_min(0)
        coefficients = plain_mlp(e, net.generator)  # (γ_0, β_0, γ_1, β_1, ...)
        torch.testing.assert_close(gamma[k, 0], coefficients[0::2], rtol=0, atol=1e-14)
        torch.testing.assert_close(beta[k, 0], coefficients[1::2], rtol=0, atol=1e-14)
        h = x[k, :, :OBS]
        for i, layer in enumerate(net.encoder):
            h = h @ layer.weight.T + layer.bias
            if i < depth - 1:
                h = h.clamp_min(0)
            h = coefficients[2 * i] * h + coefficients[2 * i + 1]  # γ_k ⊙ h + β_k
        expected = plain_mlp(torch.cat([h, e.expand(h.shape[0], -1)], -1), net.torso)
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-12)


def test_tasks_are_modulated_differently():
    gamma, beta = network("film").modulation()
    assert not torch.equal(gamma[0], gamma[1]) and not torch.equal(beta[0], beta[1])
