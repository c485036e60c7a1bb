"""CARE (Sodhani et al., ICML 2021): attention over encoders from a task context, against a loop;
the context from a user's file of task embeddings, kept fixed, and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtrl.combiners import make_combiner
from mtrl.config import ConfigError, load_config
from mtrl.optim import Optimization
from mtrl.sac import SACUpdate
from tests.architecture_properties import (  # noqa: F401
    OBS,
    ArchitectureContract,
    K,
    agent,
    batch,
    inputs,
    network,
    one_thread,
    plain_expert,
    plain_mlp,
)


class TestCARE(ArchitectureContract):
    architecture = "care"


def test_attention_weights_sum_to_one_per_task():
    _, attention = network("care").task_context()
    assert attention.shape == (K, 1, 3) and (attention >= 0).all()
    torch.testing.assert_close(attention.sum(-1), torch.ones(K, 1, dtype=attention.dtype), rtol=0, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_the_mixture_equals_a_loop_over_encoders(temperature):
    net, x = network("care", temperature=temperature), inputs()
    out = net(x)
    num_experts = net.attention[-1].out_features
    for k in range(K):
        context = plain_mlp(net.task_embedding.weight[k].clamp_min(0), net.context)
        logits = plain_mlp(context, net.attention) / temperature
        attention = logits.exp() / logits.exp().sum()
        state = x[k, :, :OBS]
        mixture = sum(attention[j] * plain_expert(state, net.encoders, j) for j in range(num_experts))
        expected = plain_mlp(torch.cat([mixture, context.expand(state.shape[0], -1)], -1), net.torso)
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-12)


def test_a_context_file_gives_each_task_its_row_and_training_leaves_it_unchanged(tmp_path):
    contexts = np.random.default_rng(0).normal(size=(K, 7)).astype(np.float32)
    np.save(tmp_path / "context.npy", contexts)
    torch.save(torch.from_numpy(contexts), tmp_path / "context.pt")
    for name in ("context.npy", "context.pt"):
        model = agent("care", context_file=str(tmp_path / name))
        for net in (model.actor.net, model.critic.q1.net, model.critic.q2.net):
            torch.testing.assert_close(net.task_embedding.weight, torch.from_numpy(contexts).double(), rtol=0, atol=0)
    optimization = Optimization(model.params, "adam", model.learning_rates, K)
    update = SACUpdate(model, optimization, make_combiner("cagrad"), ("critic", "actor"))
    before = {n: p.clone() for n, p in model.named_parameters()}
    for i in range(2):
        assert update(batch(i), torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)).finite
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == name.endswith("task_embedding.weight"), name


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (None, "`context_file` not found"),
        (lambda p: np.save(p, np.zeros(5, dtype=np.float32)), "must hold a 2-d float matrix"),
        (lambda p: np.save(p, np.full((3, 4), np.nan, dtype=np.float32)), "holds non-finite values"),
        (lambda p: p.write_bytes(b"not numpy"), "cannot be read"),
    ],
)
def test_a_bad_context_file_is_one_line_naming_the_key(tmp_path, write, message):
    path = tmp_path / "context.npy"
    if write is not None:
        write(path)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, ["agent.architecture=care", f"agent.context_file={path}"])
    assert "\n" not in str(err.value) and str(err.value).startswith("agent:")


def test_a_context_file_with_another_number_of_tasks_is_refused(tmp_path):
    np.save(tmp_path / "context.npy", np.zeros((K + 1, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=rf"has {K + 1} rows; one per task needed: {K}"):
        network("care", context_file=str(tmp_path / "context.npy"))
