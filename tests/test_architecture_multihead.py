"""Multi-head: a shared trunk and task k's samples through task k's own output head."""

from __future__ import annotations

import torch

from tests.architecture_properties import ArchitectureContract, K, inputs, network, one_thread  # noqa: F401


class TestMultiHead(ArchitectureContract):
    architecture = "multihead"


def test_task_k_is_read_by_head_k():
    net, x = network("multihead"), inputs()
    trunk = net.trunk(x)
    for k in range(K):
        expected = trunk[k] @ net.head.weight[k] + net.head.bias[k]
        torch.testing.assert_close(net(x)[k], expected, rtol=0, atol=1e-12)
