"""The update as one function of tensors (`CompiledUpdate.apply`, what `train.compile` compiles).

`apply` takes every step on the device: the finiteness flag is never read inside it, so a skipped
update is written through `torch.where`. These tests hold it (`CompiledUpdate(update)`, and
compiled) to the eager update, which steps with `torch.optim.Adam` only after reading the flag on
the host, and check that torch.compile captures it whole (`fullgraph=True`: no graph break, no host
read).
"""

from __future__ import annotations

import pytest
import torch

from mtrl.combiners import Combiner, make_combiner
from mtrl.compiled import CompiledUpdate
from mtrl.config import ConfigError
from mtrl.optim import Optimization
from mtrl.sac import SACUpdate, UpdateHook, UpdateResult, policy_noise
from tests.conftest import toy_config
from tests.test_sac import ACT, B, K, make_batch, make_update


def _bad_batch(seed: int):
    batch = make_batch(seed)
    batch.reward[:, 2] = float("nan")  # in every task: a sampling combiner draws some of them
    return batch


BATCHES = [make_batch(1), make_batch(2), _bad_batch(9), make_batch(3)]

CASES = {
    "mean": dict(variant="multihead", combiner="mean"),
    "pcgrad-clipped": dict(variant="conditioned", combiner="pcgrad", grad_clip_norm=0.5),
    "sdmgrad_os": dict(variant="multihead", combiner="sdmgrad_os"),  # 2 of the 3 tasks per update
    "adatask-clipped": dict(variant="multihead", combiner="mean", optimizer="adatask", grad_clip_norm=0.5),
}


def _update(case: str, compile: str = "none", device_steps: bool = False) -> SACUpdate | CompiledUpdate:
    spec = dict(CASES[case])
    if spec["combiner"] == "sdmgrad_os":
        spec["combiner"] = make_combiner("sdmgrad_os", n=2)
    update = make_update(**spec)
    if compile == "none" and not device_steps:
        return update
    return CompiledUpdate(update, compile)


def _run_apply(update: SACUpdate, batches, apply=None, diagnostics: bool = False) -> list[bool]:
    """What `CompiledUpdate.__call__` does, with `apply` (default: the uncompiled one)."""
    generator, combiner_generator = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    apply = apply or CompiledUpdate(update).apply
    flags = []
    for batch in batches:
        next_noise = policy_noise((K, B, ACT), generator, batch.obs.device)
        tasks = update.draw_tasks(K, combiner_generator, batch.obs.device)
        actor_noise = policy_noise((K, B, ACT), generator, batch.obs.device)
        draws = update.draw_combiner(K if tasks is None else tasks.numel(), combiner_generator, batch.obs.device)
        update.optimization.prepare_device_steps()
        finite, _ = apply(batch, next_noise, actor_noise, tasks, draws, diagnostics)
        assert torch.is_tensor(finite) and finite.dim() == 0
        flags.append(bool(finite))
    return flags


def _run(update: SACUpdate | CompiledUpdate, batches, diagnostics: bool = False) -> list[UpdateResult]:
    """`update` called as the trainer calls it, on each batch in turn."""
    generator, combiner_generator = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    return [update(batch, generator, combiner_generator, diagnostics) for batch in batches]


def _run_eager(update: SACUpdate | CompiledUpdate, batches) -> list[bool]:
    return [result.finite for result in _run(update, batches)]


def _tensors(update: SACUpdate | CompiledUpdate) -> dict[str, torch.Tensor]:
    """Every weight (targets and temperatures included) and every optimizer state tensor, by name."""
    out = {f"agent.{name}": t for name, t in update.agent.state_dict().items()}
    for net, state in update.optimization.state_dict().items():
        for part, optimizer_state in state.items():
            for index, values in optimizer_state["state"].items():
                out.update({f"{net}.{part}.{index}.{key}": v for key, v in values.items() if torch.is_tensor(v)})
    return out


def _assert_same(
    a: SACUpdate | CompiledUpdate, b: SACUpdate | CompiledUpdate, rtol: float = 1e-12, atol: float = 1e-15
) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for name, value in ta.items():
        torch.testing.assert_close(tb[name].to(value.device, value.dtype), value, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_device_steps_step_as_the_eager_update(case):
    """Same weights, moments, step counts, target critics and metrics after four updates, one of
    them skipped: Adam's arithmetic on the device is torch.optim.Adam's; undrawn tasks and clipping
    as eagerly."""
    eager, fused = _update(case), _update(case, device_steps=True)
    eager_results, fused_results = _run(eager, BATCHES, diagnostics=True), _run(fused, BATCHES, diagnostics=True)
    assert [r.finite for r in eager_results] == [r.finite for r in fused_results] == [True, True, False, True]
    _assert_same(eager, fused)
    for eager_result, fused_result in zip(eager_results, fused_results, strict=True):
        assert eager_result.metrics.keys() == fused_result.metrics.keys()
        for key, value in eager_result.metrics.items():
            torch.testing.assert_close(fused_result.metrics[key], value, rtol=1e-12, atol=1e-15, equal_nan=True)


@pytest.mark.parametrize("case", ["mean", "adatask-clipped", "sdmgrad_os"])
def test_a_non_finite_update_moves_nothing(case):
    update = _update(case, device_steps=True)
    _run(update, BATCHES[:2])
    before = {name: t.clone() for name, t in _tensors(update).items()}
    assert [r.finite for r in _run(update, [_bad_batch(5)])] == [False]
    after = _tensors(update)
    for name, value in before.items():
        assert torch.equal(after[name], value), name  # step counts too: the skipped step is not counted
    assert all(p.grad is None for p in update.agent.parameters())


def test_a_finite_update_moves_every_network_and_the_targets():
    # The other half of the skip: `where` must not hold the weights back when the flag is true.
    update = _update("mean", device_steps=True)
    _run(update, BATCHES[:1])
    before = {name: t.clone() for name, t in update.agent.state_dict().items()}
    _run(update, BATCHES[1:2])
    for name, value in update.agent.state_dict().items():
        assert not torch.equal(value, before[name]), name


def _compiled_apply(update: SACUpdate):
    # The "eager" backend runs what Dynamo captured as it is: these tests are about capture, not codegen.
    return torch.compile(CompiledUpdate(update).apply, fullgraph=True, backend="eager", dynamic=False)


@pytest.mark.parametrize(
    "case",  # mean with the Jacobian and diagnostics; PCGrad's random orders and clipping; AdaTask (slow)
    ["mean", "pcgrad-clipped", pytest.param("adatask-clipped", marks=pytest.mark.slow)],
)
def test_the_whole_update_compiles_as_one_graph(case):
    """fullgraph=True fails on any graph break, and a host read of a tensor is one: the update,
    steps and skip decision included, has none. The captured graph steps as the eager update."""
    torch._dynamo.reset()
    eager, compiled = _update(case), _update(case)
    diagnostics = case == "mean"  # the Jacobian of the mean and the diagnostics, in the graph too
    flags = _run_apply(compiled, BATCHES, _compiled_apply(compiled), diagnostics)
    assert flags == _run_eager(eager, BATCHES) == [True, True, False, True]
    _assert_same(eager, compiled)


@pytest.mark.slow  # tracing takes 15-25 s each: the combiners' solvers unroll into the graph
@pytest.mark.parametrize("combiner", ["cagrad", "nashmtl", "sdmgrad_os", "fairgrad", "alignedmtl", "upgrad"])
def test_the_whole_update_compiles_as_one_graph_with_an_iterative_combiner(combiner):
    torch._dynamo.reset()

    def build() -> SACUpdate:
        chosen = make_combiner("sdmgrad_os", n=2) if combiner == "sdmgrad_os" else combiner
        return make_update("multihead", chosen)

    eager, compiled = build(), build()
    assert _run_apply(compiled, BATCHES, _compiled_apply(compiled)) == _run_eager(eager, BATCHES)
    _assert_same(eager, compiled, rtol=1e-10, atol=1e-13)


@pytest.mark.slow  # inductor generates and builds C++ for the whole update: minutes on 2 cores
def test_compiled_with_inductor_on_the_cpu_matches_the_eager_update():
    torch._dynamo.reset()
    eager, compiled = _update("mean"), _update("mean", compile="default")
    assert _run_eager(compiled, BATCHES) == _run_eager(eager, BATCHES) == [True, True, False, True]
    _assert_same(eager, compiled, rtol=1e-9, atol=1e-12)


def test_unknown_compile_modes_are_refused(tmp_path):
    update = _update("mean")
    with pytest.raises(ValueError, match="^unknown compile mode 'fast'; choose from: none, default, reduce-overhead$"):
        CompiledUpdate(update, "fast")
    with pytest.raises(
        ConfigError, match="^train.compile must be one of none, default, reduce-overhead; found 'fast'$"
    ):
        toy_config(tmp_path, "train.compile=fast")
    # YAML reads `off` as false: the modes are words it keeps as strings, and the refusal says why
    with pytest.raises(ConfigError, match=r"found 'False' \(YAML reads on/off/yes/no as a boolean\)$"):
        toy_config(tmp_path, "train.compile=off")
    assert toy_config(tmp_path, "train.compile=none").train.compile == "none"
    assert toy_config(tmp_path, "train.compile=reduce-overhead").train.compile == "reduce-overhead"


@pytest.mark.slow  # inductor builds the update: about a minute on 2 cores
def test_a_toy_run_with_a_compiled_update_trains_as_the_eager_run(tmp_path):
    from mtrl.trainer import Trainer

    # reduce-overhead builds as default on a CPU (CUDA graphs need a GPU), and runs the trainer's
    # reduce-overhead path: Nash-MTL's warm start, an output of the graph, is kept as a copy.
    runs = {}
    for mode in ("none", "reduce-overhead"):
        cfg = toy_config(
            tmp_path / mode,
            "train.warmup_steps=41",
            "train.total_steps=60",
            "eval.every=0",
            "eval.episodes=2",
            "checkpoint.every=0",
            "combiner.name=nashmtl",
            f"train.compile={mode}",
        )
        trainer = Trainer(cfg, tmp_path / mode)
        assert trainer.train() == 0
        runs[mode] = trainer
    eager, compiled = runs["none"], runs["reduce-overhead"]
    assert compiled.counters.updates == eager.counters.updates == 20
    for name, p in eager.agent.state_dict().items():
        torch.testing.assert_close(compiled.agent.state_dict()[name], p, rtol=1e-4, atol=1e-5, msg=name)
    warm_starts = [run.parts.combiner.state_dict()["warm_start"] for run in (eager, compiled)]
    torch.testing.assert_close(warm_starts[1], warm_starts[0], rtol=1e-4, atol=1e-6)


class _RecordingCombiner(Combiner):
    """Samples two tasks and draws one number per drawn task for every call; records what it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[torch.Tensor] = []

    def select_tasks(self, num_tasks: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randperm(num_tasks, generator=generator)[:2].sort().values

    def draw(self, num_tasks: int, generator: torch.Generator | None) -> torch.Tensor:
        return torch.rand(num_tasks, generator=generator, dtype=torch.float64)

    def weights(self, gramian: torch.Tensor, draws: torch.Tensor | None = None) -> torch.Tensor:
        self.received.append(draws.clone())
        return gramian.new_full((gramian.shape[0],), 1.0 / gramian.shape[0])


class _StepRecorder(UpdateHook):
    def __init__(self) -> None:
        self.steps: list[tuple[str, list[torch.nn.Parameter]]] = []

    def on_step(self, network: str, parameters: list[torch.nn.Parameter]) -> None:
        self.steps.append((network, parameters))


@pytest.mark.parametrize("device_steps", [False, True])
def test_the_combiners_draws_come_from_the_combiner_generator_in_network_order(device_steps):
    """Tasks, then the critic's draws, then the actor's, for the drawn rows only; each reaches its call."""
    combiner, recorder = _RecordingCombiner(), _StepRecorder()
    agent = make_update("multihead").agent
    optimization = Optimization(agent.params, "adam", agent.learning_rates, K)
    update = SACUpdate(agent, optimization, combiner, hooks=[recorder])
    update = CompiledUpdate(update) if device_steps else update
    results = _run(update, BATCHES[:2])
    assert all(result.finite for result in results)
    replay = torch.Generator().manual_seed(4)  # the combiner generator of `_run`
    expected = []
    for _ in range(2):
        torch.randperm(K, generator=replay)
        expected += [torch.rand(2, generator=replay, dtype=torch.float64) for _network in ("critic", "actor")]
    assert len(combiner.received) == 4
    for received, drawn in zip(combiner.received, expected, strict=True):
        assert torch.equal(received, drawn)
    # the hooks see each network, with its parameters, as it steps
    assert [network for network, _ in recorder.steps] == ["critic", "actor", "alpha"] * 2
    for network, parameters in recorder.steps:
        assert parameters == agent.params[network].all()


@pytest.mark.parametrize("device_steps", [False, True])
def test_an_update_without_diagnostics_reports_no_combiner_metrics(device_steps):
    update = _update("pcgrad-clipped", device_steps=device_steps)
    generator, combiner_generator = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    plain = update(make_batch(1), generator, combiner_generator)
    assert plain.metrics and not any(key.startswith("combiner/") for key in plain.metrics)
    diagnosed = update(make_batch(2), generator, combiner_generator, diagnostics=True)
    assert any(key.startswith("combiner/") for key in diagnosed.metrics)


def _state_layout(optimization: Optimization) -> list[tuple]:
    return [
        (key, value.dtype, value.device, tuple(value.shape))
        for optimizer in optimization.optimizers()
        for state in optimizer.state.values()
        for key, value in sorted(state.items())
    ]


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64, torch.float16])  # float16: counts in float32
@pytest.mark.parametrize("optimizer", ["adam", "adatask"])
def test_state_made_for_device_steps_is_the_state_the_optimizers_make(optimizer, default_dtype):
    """The same keys, dtypes (step counts follow torch's default dtype, as in torch.optim), shapes and
    devices as after an eager first step: checkpoints of either path load into the other."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        eager = make_update("multihead", optimizer=optimizer)
        eager(make_batch(1), torch.Generator().manual_seed(0), torch.Generator().manual_seed(0))
        prepared = make_update("multihead", optimizer=optimizer)
        prepared.optimization.prepare_device_steps()
    finally:
        torch.set_default_dtype(previous)
    assert _state_layout(prepared.optimization) == _state_layout(eager.optimization)
    tensors = prepared.optimization.state_tensors()  # what a CUDA graph must hold at fixed addresses
    assert len(tensors) == len(_state_layout(prepared.optimization))
    held = [v for o in prepared.optimization.optimizers() for state in o.state.values() for v in state.values()]
    assert all(any(t is v for v in held) for t in tensors)


@pytest.mark.parametrize("optimizer", ["adam", "adatask"])
def test_device_steps_keep_every_tensor_on_the_parameters_device(optimizer):
    """On torch's meta device (shapes, no data): the state, the step counts and the undrawn-task mask
    are made where the parameters live, so nothing crosses to the host on a GPU."""
    with torch.device("meta"):
        update = make_update("multihead", optimizer=optimizer)
    optimization = update.optimization
    optimization.prepare_device_steps()
    assert {device.type for _, _, device, _ in _state_layout(optimization)} == {"meta"}
    finite = torch.ones((), dtype=torch.bool, device="meta")
    for net in ("critic", "actor", "alpha"):
        for p in update.agent.params[net].all():
            p.grad = torch.zeros_like(p)
        matrix = torch.zeros(K, sum(p.numel() for p in update.agent.params[net].shared.values()), device="meta")
        optimization.step_where(net, matrix, torch.tensor([0, 2], device="meta"), finite)
    assert {p.device.type for p in update.agent.parameters()} == {"meta"}
    assert {device.type for _, _, device, _ in _state_layout(optimization)} == {"meta"}


def test_adatask_device_steps_need_the_task_gradients():
    update = make_update("multihead", optimizer="adatask")
    update.optimization.prepare_device_steps()
    finite = torch.ones((), dtype=torch.bool)
    with pytest.raises(ValueError, match="^AdaTask steps on the per-task gradient matrix; none was given$"):
        update.optimization.step_where("critic", None, None, finite)


def test_state_for_device_steps_is_made_once_and_again_after_a_load():
    """Not on every update (the hot path), but again after `load_state_dict` (a resume), whose step
    counts come back on the host."""
    update = _update("adatask-clipped", device_steps=True)
    optimization = update.optimization
    assert optimization.prepare_device_steps() and not optimization.prepare_device_steps()
    _run(update, BATCHES[:1])
    saved = optimization.state_dict()
    optimization.load_state_dict(saved)
    assert optimization.prepare_device_steps() and not optimization.prepare_device_steps()
    # the loaded state goes on counting: a second update is the second step of every optimizer
    assert [r.finite for r in _run(update, BATCHES[1:2])] == [True]
    counts = {float(c) for o in optimization.optimizers() for s in o.state.values() for c in s["step"].reshape(-1)}
    assert counts == {2.0}
