"""Soft Modularization (Yang, Xu, Wu & Wang, NeurIPS 2020), in the form of the authors' code."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtrl.combiners.base import HyperParameters, check_number, hyper_parameter
from mtrl.networks.base import Architecture, ExpertLinear, NetworkShape, TaskEmbedding, mlp


@dataclass(frozen=True)
class SoftModulesParameters(HyperParameters):
    num_layers: int = hyper_parameter(2, "layers L of modules in the base network (MT10: 2, MT50: 4)")
    num_modules: int = hyper_parameter(2, "modules n per layer (MT10: 2, MT50: 4)")
    module_width: int = hyper_parameter(256, "output width d of each module")
    routing_width: int = hyper_parameter(256, "width of the routing network's task embedding and layers")

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_modules", "module_width", "routing_width"):
            self._store(name, check_number(name, getattr(self, name), low=1, integer=True))


class SoftModules(Architecture):
    """A base network of L layers of n modules, softly routed per task and sample.

    f(s) = MLP over `agent.hidden_sizes` (its last width is D); z_k = task-owned row + shared bias
    (the linear map of the one-hot); routing embedding e = MLP(ReLU(z_k ⊙ f(s))). Routing layer l
    gives p^l = softmax(W_d^l ReLU(e ⊙ W_u^l [p^0..p^{l−1}])) (paper Eq. 5–7; W_u absent for l = 0),
    an n×n row-stochastic matrix for l < L−1 and an n-vector for the last layer. Modules: g^{l+1}_i =
    ReLU(Σ_j p^l_ij W^l_j g^l_j), every module of layer 0 reading ReLU(f(s)); output = head(ReLU(Σ_j
    p^{L−1}_j W^{L−1}_j g^{L−1}_j)). The authors' code differs from the paper in the extra routing
    embedding, the ReLU after the weighted sum, the routing skip connections and the final weighted sum;
    this follows the code. Its loss re-weighting by the temperatures is a loss choice, not part of the network.
    """

    Parameters = SoftModulesParameters

    def __init__(self, shape: NetworkShape, hidden_sizes: list[int], parameters: SoftModulesParameters):
        super().__init__()
        p = parameters
        n, width = p.num_modules, hidden_sizes[-1]
        self.shape, self.num_modules = shape, n
        self.state_embedding = mlp(shape.state_dim, hidden_sizes[:-1], width)
        self.task_embedding = TaskEmbedding(shape.num_tasks, width)
        self.task_embedding_bias = nn.Parameter(torch.zeros(width))
        self.routing_embedding = mlp(width, [p.routing_width], p.routing_width)
        last = p.num_layers - 1
        self.routing_in = nn.ModuleList(nn.Linear(layer * n * n, p.routing_width) for layer in range(1, p.num_layers))
        self.routing_out = nn.ModuleList(
            nn.Linear(p.routing_width, n if layer == last else n * n) for layer in range(p.num_layers)
        )
        self.base_layers = nn.ModuleList(
            ExpertLinear(n, width if layer == 0 else p.module_width, p.module_width, shared_input=layer == 0)
            for layer in range(p.num_layers)
        )
        self.head = nn.Linear(p.module_width, shape.out_dim)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """ReLU(f(s)) `[K, B, D]` and the routing probabilities of each layer: `[K, B, n, n]` (row i:
        how module i of the next layer reads this layer's modules), the last one `[K, B, n]` (how the
        output reads the last layer's modules)."""
        state = self.state_embedding(self.shape.without_one_hot(x))
        task = self.task_embedding() + self.task_embedding_bias
        embedding = self.routing_embedding(torch.relu(task * state))
        probabilities: list[torch.Tensor] = []
        for layer, out in enumerate(self.routing_out):
            e = embedding
            if layer > 0:  # the skip connections: every earlier layer's routing
                previous = torch.cat([p.flatten(-2) for p in probabilities], dim=-1)
                e = e * self.routing_in[layer - 1](previous)
            logits = out(torch.relu(e))
            if layer < len(self.routing_out) - 1:
                logits = logits.unflatten(-1, (self.num_modules, self.num_modules))
            probabilities.append(torch.softmax(logits, dim=-1))
        return torch.relu(state), probabilities

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, probabilities = self.route(x)  # the modules' outputs are expert-major: [K, n, B, d]
        for layer, p in zip(self.base_layers[:-1], probabilities[:-1], strict=True):
            # module i of the next layer reads Σ_j p_ij out_j; p [K, B, i, j] as [K, i, j, B, 1]
            g = torch.relu((p.movedim(-3, -1).unsqueeze(-1) * layer(g).unsqueeze(-4)).sum(-3))
        last = probabilities[-1].transpose(-1, -2).unsqueeze(-1)  # [K, B, n] as [K, n, B, 1]
        return self.head(torch.relu((last * self.base_layers[-1](g)).sum(-3)))
