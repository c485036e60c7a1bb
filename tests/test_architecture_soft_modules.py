"""Soft Modularization (Yang et al., NeurIPS 2020): routing probabilities and the routed modules, against loops."""

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


class TestSoftModules(ArchitectureContract):
    architecture = "soft_modules"


def test_routing_probabilities_sum_to_one_per_layer_and_task():
    net, x = network("soft_modules"), inputs()
    _, probabilities = net.route(x)
    n = net.num_modules
    assert [tuple(p.shape) for p in probabilities] == [(K, x.shape[1], n, n)] * 2 + [(K, x.shape[1], n)]
    for p in probabilities:
        assert (p >= 0).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1], dtype=p.dtype), rtol=0, atol=1e-12)


def reference_routing(net, state: torch.Tensor, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """f(s) and the routing of one sample of task k, written out (the authors' code, skip connections included)."""
    f = plain_mlp(state, net.state_embedding)
    z = net.task_embedding.weight[k] + net.task_embedding_bias
    e = plain_mlp((z * f).clamp_min(0), net.routing_embedding)
    probabilities: list[torch.Tensor] = []
    for layer, out in enumerate(net.routing_out):
        e_l = e
        if layer > 0:
            previous = torch.cat([p.reshape(-1) for p in probabilities])
            e_l = e * (previous @ net.routing_in[layer - 1].weight.T + net.routing_in[layer - 1].bias)
        logits = e_l.clamp_min(0) @ out.weight.T + out.bias
        if layer < len(net.routing_out) - 1:
            logits = logits.reshape(net.num_modules, net.num_modules)
        probabilities.append(logits.exp() / logits.exp().sum(-1, keepdim=True))
    return f, probabilities


def test_output_equals_a_loop_over_modules():
    net, x = network("soft_modules"), inputs()
    out = net(x)
    _, routed = net.route(x)
    n = net.num_modules
    for k in range(K):
        for b in range(x.shape[1]):
            f, probabilities = reference_routing(net, x[k, b, :OBS], k)
            for layer, p in enumerate(probabilities):
                torch.testing.assert_close(routed[layer][k, b], p, rtol=0, atol=1e-12)
            g = [f.clamp_min(0)] * n  # every module of the first layer reads ReLU(f(s))
            for layer, p in enumerate(probabilities[:-1]):
                module = net.base_layers[layer]
                outs = [g[j] @ module.weight[j] + module.bias[j] for j in range(n)]
                g = [sum(p[i, j] * outs[j] for j in range(n)).clamp_min(0) for i in range(n)]
            module = net.base_layers[-1]
            last = sum(probabilities[-1][j] * (g[j] @ module.weight[j] + module.bias[j]) for j in range(n))
            expected = last.clamp_min(0) @ net.head.weight.T + net.head.bias
            torch.testing.assert_close(out[k, b], expected, rtol=0, atol=1e-12)
