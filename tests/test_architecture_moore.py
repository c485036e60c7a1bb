"""MOORE (Hendawy et al., ICLR 2024): orthonormal experts and the task mixture, against plain loops."""

from __future__ import annotations

import pytest
import torch

from mtrl.networks import check_architecture
from tests.architecture_properties import (  # noqa: F401
    OBS,
    ArchitectureContract,
    K,
    inputs,
    network,
    one_thread,
    plain_expert,
)


class TestMOORE(ArchitectureContract):
    architecture = "moore"
    # The feature tanh(Σ_e w_e u_e) has norm about ‖w_k‖ whatever the state (the u_e are orthonormal), so
    # each of its 64 entries starts near 0.1 and the heads must grow to reach the toy's Q-values: at
    # 3e-4 the 2500-step run reaches 0 successes (returns 11.5 -> 15.1), at 1e-3 it solves 93%.
    toy_overrides = ("agent.actor_lr=1e-3", "agent.critic_lr=1e-3")


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_each_samples_experts_are_orthonormal_after_gram_schmidt(dtype, tolerance):
    net = network("moore", dtype=dtype, num_experts=5)
    basis = net.orthonormal_experts(inputs(dtype=dtype))  # [K, E, B, d]
    gram = torch.einsum("kebd,kfbd->kbef", basis, basis)
    identity = torch.eye(5, dtype=dtype).expand_as(gram)
    assert (gram - identity).abs().max() < tolerance


def test_output_equals_a_plain_loop_over_experts():
    net, x = network("moore"), inputs()
    num_experts = net.task_weights.weight.shape[1]
    out = net(x)
    for k in range(K):
        for b in range(x.shape[1]):
            state = x[k, b, :OBS]
            basis = []
            for e in range(num_experts):  # classic Gram–Schmidt, paper Eq. 4
                v = plain_expert(state, net.experts, e)
                u = v - sum(((q @ v) * q for q in basis), torch.zeros_like(v))
                basis.append(u / max(u.norm(), 1e-8))
            mixed = sum(net.task_weights.weight[k, e] * basis[e] for e in range(num_experts))
            expected = torch.tanh(mixed) @ net.head.weight[k] + net.head.bias[k]
            torch.testing.assert_close(out[k, b], expected, rtol=0, atol=1e-12)


def test_more_experts_than_dimensions_is_refused():
    with pytest.raises(ValueError, match=r"`num_experts` \(9\) must be at most the last hidden width \(8\)"):
        check_architecture("moore", {"num_experts": 9}, [16, 8])
