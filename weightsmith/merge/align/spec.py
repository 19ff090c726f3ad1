"""Permutation specs: which axes of which tensors share one permutation (Git Re-Basin, Ainsworth et al. 2022).

Specs are derived from the torch modules: plain MLPs and ResNet-style CNNs through a torch.fx trace
(channels tied through residual adds and BatchNorm share one group), the Llama family by walking its modules.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import WeightsmithError

LLAMA_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class Axis:
    """Axis ``dim`` of a tensor is ``n`` units of ``block`` consecutive entries, permuted by ``group``."""
    group: str
    dim: int
    block: int = 1


@dataclass
class Group:
    name: str
    size: int  # units
    partial: bool = True  # PLeaS may keep some units of both models separately (widen the group)


@dataclass
class Layer:
    """A linear map PLeaS refits: ``weight`` name, its input/output group (None: fixed axis), and, for convs
    followed by BatchNorm, the norm module whose output is the refit target."""
    module: str
    in_group: str | None
    out_group: str | None
    in_block: int = 1
    out_block: int = 1
    norm: str | None = None


@dataclass
class PermSpec:
    groups: dict[str, Group]
    axes: dict[str, list[Axis]]  # tensor name -> its permuted axes
    layers: list[Layer] = field(default_factory=list)
    kind: str = "module"

    def tensors_of(self, group: str) -> list[tuple[str, Axis]]:
        return [(name, ax) for name, axs in self.axes.items() for ax in axs if ax.group == group]


def spec_for(model: nn.Module) -> PermSpec:
    """The permutation spec of ``model``: Llama/Mistral/Qwen2 causal LMs or an fx-traceable MLP/CNN."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in LLAMA_TYPES:
        return llama_spec(model)
    if model_type is not None:
        raise WeightsmithError(f"permutation alignment supports model types {', '.join(LLAMA_TYPES)} and plain "
                               f"torch MLPs/CNNs; got model_type {model_type!r}")
    return traced_spec(model)


# ----------------------------------------------------------------------------------------------- Llama family

def llama_spec(model: nn.Module) -> PermSpec:
    """Residual stream: one group over all blocks; per block, attention heads (whole heads, grouped by kv head
    under GQA, since RoPE forbids permuting inside a head) and MLP intermediate units."""
    cfg = model.config
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "embed_tokens"):
        raise WeightsmithError(f"{type(model).__name__}: expected .model.embed_tokens and .model.layers "
                               "(a *ForCausalLM of the Llama family)")
    hidden = cfg.hidden_size
    n_heads, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // n_heads
    rep = n_heads // n_kv
    groups = {"residual": Group("residual", hidden, partial=False)}
    axes: dict[str, list[Axis]] = {}
    layers: list[Layer] = []

    def linear(name: str, mod: nn.Module, out_ax: Axis | None, in_ax: Axis | None) -> None:
        if not isinstance(mod, nn.Linear):
            raise WeightsmithError(f"{name}: expected nn.Linear, found {type(mod).__name__}; not a supported "
                                   "Llama-family layer for permutation alignment")
        w = [a for a in (out_ax, in_ax) if a is not None]
        axes[f"{name}.weight"] = w
        if mod.bias is not None:
            axes[f"{name}.bias"] = [Axis(out_ax.group, 0, out_ax.block)] if out_ax else []
        layers.append(Layer(name, in_ax.group if in_ax else None, out_ax.group if out_ax else None,
                            in_ax.block if in_ax else 1, out_ax.block if out_ax else 1))

    res_in, res_out = Axis("residual", 1), Axis("residual", 0)
    axes["model.embed_tokens.weight"] = [Axis("residual", 1)]
    for i, block in enumerate(base.layers):
        p = f"model.layers.{i}"
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, k) for k in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                or not all(hasattr(mlp, k) for k in ("gate_proj", "up_proj", "down_proj")):
            raise WeightsmithError(f"{p}: expected self_attn.{{q,k,v,o}}_proj and mlp.{{gate,up,down}}_proj")
        heads, inter = f"{p}.heads", f"{p}.mlp"
        groups[heads] = Group(heads, n_kv, partial=False)
        groups[inter] = Group(inter, mlp.gate_proj.out_features)
        linear(f"{p}.self_attn.q_proj", attn.q_proj, Axis(heads, 0, rep * head_dim), res_in)
        linear(f"{p}.self_attn.k_proj", attn.k_proj, Axis(heads, 0, head_dim), res_in)
        linear(f"{p}.self_attn.v_proj", attn.v_proj, Axis(heads, 0, head_dim), res_in)
        linear(f"{p}.self_attn.o_proj", attn.o_proj, res_out, Axis(heads, 1, rep * head_dim))
        linear(f"{p}.mlp.gate_proj", mlp.gate_proj, Axis(inter, 0), res_in)
        linear(f"{p}.mlp.up_proj", mlp.up_proj, Axis(inter, 0), res_in)
        linear(f"{p}.mlp.down_proj", mlp.down_proj, res_out, Axis(inter, 1))
        axes[f"{p}.input_layernorm.weight"] = [Axis("residual", 0)]
        axes[f"{p}.post_attention_layernorm.weight"] = [Axis("residual", 0)]
    axes["model.norm.weight"] = [Axis("residual", 0)]
    if getattr(cfg, "tie_word_embeddings", False):  # the head is the embedding: merged with it, never refit alone
        axes["lm_head.weight"] = [Axis("residual", 1)]
    else:
        linear("lm_head", model.lm_head, None, res_in)
    params = dict(model.named_parameters(remove_duplicate=False))
    extra = [n for n in params if n not in axes]
    if extra:
        raise WeightsmithError(f"{type(model).__name__} has parameters the Llama permutation spec does not cover "
                               f"(e.g. {extra[0]}); this variant is not supported")
    return PermSpec(groups, axes, layers, kind="llama")


# ------------------------------------------------------------------------------------- traced MLPs and CNNs

_PASS_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Identity, nn.Dropout,
                 nn.MaxPool2d, nn.AvgPool2d, nn.MaxPool1d, nn.AvgPool1d)
_PASS_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.gelu, torch.tanh, torch.sigmoid,
                   torch.nn.functional.silu, torch.nn.functional.max_pool2d, torch.nn.functional.avg_pool2d}
_ADD = {operator.add, operator.iadd, torch.add}
_PASS_METHODS = {"relu", "relu_", "contiguous", "clone", "tanh", "sigmoid"}
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)


class _Channels:
    """Union-find over channel ids; the ids ``in`` and ``out`` are the model's fixed input/output axes."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {"in": "in", "out": "out"}

    def new(self, name: str) -> str:
        self.parent[name] = name
        return name

    def find(self, x: str) -> str:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb in ("in", "out"):  # fixed ids stay roots so a group tied to them is recognised as fixed
            ra, rb = rb, ra
        self.parent[rb] = ra


_UNSUPPORTED_MODULE = ("is not supported by permutation alignment (supported: Linear, Conv2d, BatchNorm, LayerNorm, "
                       "activations, pooling, residual adds, flatten after global pooling)")
_GLOBAL_MEAN_DIMS = (((2, 3),), ([2, 3],), ((-2, -1),), ([-2, -1],))


class _ChannelTrace:
    """Walks an fx graph and records which tensors share a channel axis (union-find ``uf``), plus one entry
    (module, kind, in_id, out_id) per Linear/Conv2d ("linear") and norm ("norm") and the norm after a layer."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.mods = model, dict(model.named_modules())
        self.uf = _Channels()
        self.chan: dict = {}  # fx node -> channel id
        self.pooled: set = set()  # nodes whose spatial size is 1 (global pooling), safe to flatten
        self.flat: set = set()
        self.entries: list[tuple[str, str, str | None, str | None]] = []
        self.users_norm: dict[str, str] = {}

    def run(self, graph) -> _ChannelTrace:
        for node in graph.nodes:
            if node.op == "placeholder":
                self.chan[node] = "in"
            elif node.op == "output":
                self.uf.union(self.chan[self.src(node.args[0])], "out")
            elif node.op == "get_attr":
                raise WeightsmithError(f"{type(self.model).__name__}: direct parameter use ({node.target}) is not "
                                       "supported")
            elif node.op in ("call_module", "call_function", "call_method"):
                self.chan[node] = getattr(self, node.op)(node)
        return self

    def src(self, node):
        if not hasattr(node, "op") or node not in self.chan:
            raise WeightsmithError(f"{type(self.model).__name__}: unsupported graph input {node!r} for a "
                                   "permutation spec")
        return node

    def same(self, node) -> str:
        """Channel of the node's first input (elementwise and pooling ops keep it)."""
        return self.chan[self.src(node.args[0])]

    def flatten(self, node) -> str:
        return _flatten(node, self.src(node.args[0]), self.chan, self.pooled, self.flat)

    def call_module(self, node) -> str:
        mod, x = self.mods[node.target], self.src(node.args[0])
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            if isinstance(mod, nn.Conv2d) and mod.groups != 1:
                raise WeightsmithError(f"{node.target}: grouped convolutions are not supported for alignment")
            out = self.uf.new(node.target)
            self.entries.append((node.target, "linear", self.chan[x], out))
            return out
        if isinstance(mod, _NORMS):
            if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) != 1:
                raise WeightsmithError(f"{node.target}: LayerNorm over more than one axis is not supported")
            self.entries.append((node.target, "norm", self.chan[x], self.chan[x]))
            if x.op == "call_module" and isinstance(self.mods[x.target], (nn.Linear, nn.Conv2d)) and len(x.users) == 1:
                self.users_norm[x.target] = node.target
            return self.chan[x]
        if isinstance(mod, nn.AdaptiveAvgPool2d) and mod.output_size in (1, (1, 1)):
            self.pooled.add(node)
        if isinstance(mod, (*_PASS_MODULES, nn.AdaptiveAvgPool2d)):
            return self.chan[x]
        if isinstance(mod, nn.Flatten):
            return self.flatten(node)
        raise WeightsmithError(f"{node.target}: {type(mod).__name__} {_UNSUPPORTED_MODULE}")

    def call_function(self, node) -> str:
        if node.target in _ADD:
            a, b = (self.src(v) for v in node.args[:2])
            self.uf.union(self.chan[a], self.chan[b])
            return self.chan[a]
        if node.target is torch.flatten:
            return self.flatten(node)
        if node.target is torch.nn.functional.adaptive_avg_pool2d:
            if node.args[1] in (1, (1, 1)):
                self.pooled.add(node)
            return self.same(node)
        if node.target in _PASS_FUNCTIONS:
            return self.same(node)
        raise WeightsmithError(f"{type(self.model).__name__}: operation {getattr(node.target, '__name__', node.target)} "
                               "is not supported by permutation alignment")

    def call_method(self, node) -> str:
        if node.target in _PASS_METHODS:
            return self.same(node)
        if node.target in ("flatten", "view", "reshape"):
            return self.flatten(node)
        if node.target == "mean" and node.args[1:] in _GLOBAL_MEAN_DIMS:
            out = self.same(node)
            self.pooled.add(node)
            return out
        raise WeightsmithError(f"{type(self.model).__name__}: method .{node.target}() is not supported by "
                               "permutation alignment")


def _spec_from_trace(t: _ChannelTrace) -> PermSpec:
    """Groups (one per channel set, named after its first writer), axes of every parameter, and layers."""
    groups: dict[str, Group] = {}
    axes: dict[str, list[Axis]] = {}
    layers: list[Layer] = []
    label: dict[str, str] = {}  # union root -> the first module writing the group, a readable group name
    for name, kind, _, cout in t.entries:
        if kind == "linear":
            label.setdefault(t.uf.find(cout), name)

    def gid(c: str | None) -> str | None:
        r = t.uf.find(c)
        return None if r in ("in", "out") else label[r]

    for name, kind, cin, cout in t.entries:
        mod = t.mods[name]
        gin, gout = gid(cin), gid(cout)
        if kind == "linear":
            out_n = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
            if gout is not None:
                groups.setdefault(gout, Group(gout, out_n))
            axes[f"{name}.weight"] = [a for a in (Axis(gout, 0) if gout else None, Axis(gin, 1) if gin else None) if a]
            if mod.bias is not None:
                axes[f"{name}.bias"] = [Axis(gout, 0)] if gout else []
            layers.append(Layer(name, gin, gout, norm=t.users_norm.get(name)))
        else:
            for pname, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                if pname != "num_batches_tracked":
                    axes[f"{name}.{pname}"] = [Axis(gin, 0)] if gin else []
    for name in dict(t.model.named_parameters()):
        if name not in axes:
            raise WeightsmithError(f"{type(t.model).__name__}: parameter {name} is not covered by the traced spec")
    return PermSpec(groups, axes, layers, kind="traced")


def traced_spec(model: nn.Module) -> PermSpec:
    """Spec of a plain torch model built from Linear/Conv2d, BatchNorm/LayerNorm, elementwise activations,
    pooling, residual adds and a final flatten after global pooling: trace the channels, then build the spec."""
    from torch import fx

    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many types on dynamic control flow
        raise WeightsmithError(f"{type(model).__name__}: cannot trace the model for a permutation spec ({exc})") from exc
    return _spec_from_trace(_ChannelTrace(model).run(graph))


def _flatten(node, x, chan, pooled: set, flat: set) -> str:
    # Flattening C×H×W mixes channels with positions; only a 1×1 map (or the raw input) keeps units intact.
    if chan[x] == "in" or x in pooled or x in flat:
        flat.add(node)
        return chan[x]
    raise WeightsmithError(f"flatten at {node.name}: only flattening after global pooling (1×1 maps) keeps channel "
                           "units whole; pool to 1×1 before the classifier")
