"""Channel dependency groups, derived by tracing the model's forward (DepGraph, Fang et al. 2023).

A *group* is a set of conv output channels that must be pruned together: every conv whose output
feeds the same residual sum shares one channel mask (the stem and the convs2 of layer1 in ResNet-18,
a stage's downsample conv and its blocks' last convs, ...), so that the masked network can be
physically slimmed (`vpns_jax.structured.slim`).

How: `jax.make_jaxpr` of the eval-mode forward (XLA convolutions, batch 2) with every parameter and
BatchNorm statistic as a named input; one data-flow pass follows each activation's channel axis
through conv / BatchNorm arithmetic / relu / add / pool / transpose / reshape / dot. Every conv
output starts a node; an elementwise op combining two tracked activations (a residual add) unions
their nodes (union-find); a per-channel parameter vector combined with an activation (BN scale,
bias, running mean/var, conv bias) is attached to that activation's node; a conv or dense that
contracts a tracked channel axis is a consumer. No layer list is written by hand.

Differences from the reference's research code (vpns_reference.md §6): it gives a downsample conv
the block's conv2 mask but leaves identity shortcuts unmasked, so the channels a block adds to an
unpruned identity stay alive and its masks cannot all be removed physically. Here the whole residual
chain of a stage (stem included for layer1) is one group with one mask.

Cap (`ChannelGroup.capped`): ResNet: groups holding the stem conv or any conv of layer1 (the
reference caps 'conv1' and the four layer1 convs). VGG (not in the reference): the convs of the
first stage, whose output has the input's resolution (features_0 and features_2/3), the analogue of
ResNet's full-resolution stem and layer1.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.extend import core as jex_core

from vpns_jax.errors import ConfigError
from vpns_jax.models.resnet import ResNet
from vpns_jax.models.vgg import VGG

SUPPORTED_ARCHS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "vgg16", "vgg16_bn")


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Output channels pruned together (one mask of `size` entries).

    name: the group's first producer conv module path in forward order (e.g. 'layer2_0/conv2').
    producers: kernel paths ('layer2_0/conv2/kernel', flat param paths as
    `vpns_jax.sparsity.scores.flatten_params`) whose OUTPUT channels (last axis) are the group.
    norms: BatchNorm module paths ('layer2_0/bn2') normalizing the group: params scale/bias and
    batch_stats mean/var, all f32[size]. biases: producer bias paths ('features_0/bias'; VGG).
    consumers: kernel paths whose INPUT channels are the group: convs (HWIO axis 2) and dense
    kernels (axis 0; after VGG's channel-major flatten each channel owns `in_features // size`
    consecutive rows). capped: the reference's channel-sparsity cap applies (module docstring).
    """

    name: str
    size: int
    producers: tuple[str, ...]
    norms: tuple[str, ...]
    biases: tuple[str, ...]
    consumers: tuple[str, ...]
    capped: bool


def check_arch(arch: str) -> None:
    """ConfigError naming the supported architectures when `arch` has no channel-group definition."""
    if arch not in SUPPORTED_ARCHS:
        raise ConfigError(f"structured pruning has no channel-group definition for arch {arch!r}; "
                          f"supported: {', '.join(SUPPORTED_ARCHS)}")


def channel_groups(model: nn.Module, variables: Mapping[str, Any],
                   input_size: int) -> tuple[ChannelGroup, ...]:
    """The channel groups of `model` (a `vpns_jax.models` ResNet or VGG), in forward order.

    variables: {'params', 'batch_stats'} (arrays or ShapeDtypeStructs; only shapes are read).
    input_size: the image side the model runs at (pixels). Other models → ConfigError naming the
    supported architectures. Cached per model and variable shapes (a trace costs ~0.5-1 s).
    """
    if not isinstance(model, ResNet | VGG):
        raise ConfigError(f"structured pruning has no channel-group definition for "
                          f"{type(model).__name__}; supported: {', '.join(SUPPORTED_ARCHS)}")
    traced = model.clone(conv_impl="xla", dtype=jnp.float32)
    shapes = tuple((f"{col}/{path}", tuple(int(d) for d in jnp.shape(leaf)))
                   for col in ("params", "batch_stats")
                   for path, leaf in traverse_util.flatten_dict(dict(variables.get(col) or {}),
                                                                sep="/").items())
    return _traced_groups(traced, shapes, int(input_size))


@functools.lru_cache(maxsize=32)
def _traced_groups(model: nn.Module, shapes: tuple[tuple[str, tuple[int, ...]], ...],
                   input_size: int) -> tuple[ChannelGroup, ...]:
    """channel_groups of `model` (XLA convs, float32) for variables of these shapes (cached)."""
    names = [name for name, _ in shapes]
    leaves = [jax.ShapeDtypeStruct(shape, jnp.float32) for _, shape in shapes]

    def forward(flat: Sequence[jax.Array], x: jax.Array) -> jax.Array:
        tree: dict[str, dict] = {"params": {}, "batch_stats": {}}
        for name, value in zip(names, flat, strict=True):
            col, path = name.split("/", 1)
            tree[col][path] = value
        tree = {c: traverse_util.unflatten_dict(v, sep="/") for c, v in tree.items()}
        return model.apply(tree, x, train=False)

    x = jax.ShapeDtypeStruct((2, input_size, input_size, 3), jnp.float32)
    closed = jax.make_jaxpr(forward)(leaves, x)
    flow = _Flow()
    flow.walk(closed.jaxpr, [_Param(name) for name in names] + [_Act(None, None)])
    return flow.groups(model, input_size)


# ---- the data-flow pass ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Param:
    """A value computed from parameters only; `axis`: where a 1-D parameter's entries lie."""

    paths: frozenset[str] | str
    axis: int | None = 0

    @property
    def names(self) -> frozenset[str]:
        return frozenset([self.paths]) if isinstance(self.paths, str) else self.paths


@dataclasses.dataclass(frozen=True)
class _Act:
    """An activation; `node`: its channels' union-find node (None: not tracked, e.g. the image or
    logits); `axis`: the channel axis; `inner`: entries per channel on that axis (flatten)."""

    node: int | None
    axis: int | None
    inner: int = 1


_ELEMENTWISE = {
    "add", "sub", "mul", "div", "max", "min", "neg", "sqrt", "rsqrt", "exp", "log", "tanh",
    "logistic", "abs", "sign", "integer_pow", "pow", "square", "convert_element_type", "select_n",
    "gt", "ge", "lt", "le", "eq", "ne", "and", "or", "not", "copy", "copy_p", "stop_gradient",
    "erf", "clamp", "nextafter", "add_any",
}


class _Flow:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.producer: list[str] = []  # node → kernel path
        self.out_hw: list[int] = []  # node → producer's output height
        self.sizes: list[int] = []  # node → producer's output channels
        self.attached: dict[int, list[str]] = {}  # node → per-channel param/stat paths
        self.consumers: list[tuple[int, str]] = []  # (node, kernel path), forward order
        self.first_act_hw: int | None = None

    # union-find
    def find(self, n: int) -> int:
        while self.parent[n] != n:
            self.parent[n] = self.parent[self.parent[n]]
            n = self.parent[n]
        return n

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
        return min(ra, rb)

    def new_node(self, kernel: str, hw: int, size: int) -> int:
        self.parent.append(len(self.parent))
        self.producer.append(kernel)
        self.out_hw.append(hw)
        self.sizes.append(size)
        return len(self.parent) - 1

    def walk(self, jaxpr: Any, env_in: list[Any]) -> list[Any]:
        env: dict[Any, Any] = dict(zip(jaxpr.invars, env_in, strict=True))
        for v in getattr(jaxpr, "constvars", []):
            env[v] = None

        def read(v: Any) -> Any:
            return None if isinstance(v, jex_core.Literal) else env.get(v)

        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            outs = self.eqn(eqn, ins)
            for v, info in zip(eqn.outvars, outs, strict=True):
                env[v] = info
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn: Any, ins: list[Any]) -> list[Any]:
        prim = eqn.primitive.name
        n_out = len(eqn.outvars)
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            return self.walk(sub, ins)
        acts = [i for i in ins if isinstance(i, _Act)]
        if not acts:  # parameters (and constants) only
            params = [i for i in ins if isinstance(i, _Param)]
            if not params:
                return [None] * n_out
            return [self.param_op(eqn, ins, params)] * n_out
        in_shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
        out_shape = tuple(eqn.outvars[0].aval.shape)
        if prim == "conv_general_dilated":
            return [self.conv(eqn, ins, out_shape)]
        if prim == "dot_general":
            return [self.dot(eqn, ins, in_shapes)]
        if prim in _ELEMENTWISE:
            return [self.elementwise(prim, ins, in_shapes, out_shape)] * n_out
        (act,) = acts if len(acts) == 1 else (None,)
        if act is None or act.node is None:
            if act is not None:
                return [_Act(None, None)] * n_out
            raise _cannot(prim, "it combines several activations")
        axis = act.axis
        if prim in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin"):
            axes = tuple(eqn.params["axes"])
            if axis in axes:
                raise _cannot(prim, "it reduces the channel axis")
            return [_Act(act.node, axis - sum(a < axis for a in axes), act.inner)]
        if prim == "squeeze":
            dims = tuple(eqn.params["dimensions"])
            if axis in dims:
                raise _cannot(prim, "it squeezes the channel axis")
            return [_Act(act.node, axis - sum(d < axis for d in dims), act.inner)]
        if prim.startswith("reduce_window"):
            if eqn.params["window_dimensions"][axis] != 1 or eqn.params["window_strides"][axis] != 1:
                raise _cannot(prim, "its window spans channels")
            return [act] * n_out
        if prim == "pad":
            if any(eqn.params["padding_config"][axis]):
                raise _cannot(prim, "it pads the channel axis")
            return [act]
        if prim == "transpose":
            return [_Act(act.node, list(eqn.params["permutation"]).index(axis), act.inner)]
        if prim == "broadcast_in_dim":
            return [_Act(act.node, eqn.params["broadcast_dimensions"][axis], act.inner)]
        if prim == "reshape":
            new_axis, factor = _reshaped_axis(in_shapes[0], out_shape, axis)
            return [_Act(act.node, new_axis, act.inner * factor)]
        raise _cannot(prim, "it is not one of the operations the pass follows")

    def param_op(self, eqn: Any, ins: list[Any], params: list[_Param]) -> _Param:
        names = frozenset().union(*(p.names for p in params))
        prim = eqn.primitive.name
        (p,) = params if len(params) == 1 else (None,)
        axis: int | None = None
        if p is not None and p.axis is not None:
            in_shape = tuple(eqn.invars[ins.index(p)].aval.shape)
            out_shape = tuple(eqn.outvars[0].aval.shape)
            if prim == "broadcast_in_dim":
                axis = eqn.params["broadcast_dimensions"][p.axis]
            elif prim == "reshape":
                try:
                    axis = _reshaped_axis(in_shape, out_shape, p.axis)[0]
                except ConfigError:
                    axis = None
            elif prim in _ELEMENTWISE:
                axis = p.axis
        elif params and all(q.axis is not None for q in params) and \
                eqn.primitive.name in _ELEMENTWISE and len({q.axis for q in params}) == 1:
            axis = params[0].axis
        return _Param(names, axis)

    def conv(self, eqn: Any, ins: list[Any], out_shape: tuple[int, ...]) -> _Act:
        lhs, rhs = ins
        kernel = _kernel_of(rhs, "conv_general_dilated")
        dn = eqn.params["dimension_numbers"]
        if eqn.params["feature_group_count"] != 1 or eqn.params["batch_group_count"] != 1:
            raise _cannot("conv_general_dilated", "grouped convolutions are not supported")
        if isinstance(lhs, _Act) and lhs.node is not None:
            if lhs.axis != dn.lhs_spec[1] or lhs.inner != 1:
                raise _cannot("conv_general_dilated", "its input channels are not the tracked ones")
            self.consumers.append((lhs.node, kernel))
        elif self.first_act_hw is None:
            self.first_act_hw = int(eqn.invars[0].aval.shape[dn.lhs_spec[2]])
        node = self.new_node(kernel, int(out_shape[dn.out_spec[2]]), int(out_shape[dn.out_spec[1]]))
        return _Act(node, dn.out_spec[1])

    def dot(self, eqn: Any, ins: list[Any], in_shapes: list[tuple[int, ...]]) -> _Act:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        a, b = ins
        if isinstance(a, _Act) and isinstance(b, _Act):
            raise _cannot("dot_general", "it multiplies two activations")
        act_first = isinstance(a, _Act)
        act, other = (a, b) if act_first else (b, a)
        contract, batch = (lc, lb) if act_first else (rc, rb)
        if act.node is None:
            return _Act(None, None)
        if act.axis in contract:
            kernel = _kernel_of(other, "dot_general")
            self.consumers.append((act.node, kernel))
            return _Act(None, None)  # dense outputs are not pruned
        if act.axis in batch:
            return _Act(act.node, list(batch).index(act.axis), act.inner)
        rank_a, rank_b = len(in_shapes[0]), len(in_shapes[1])
        free_a = [d for d in range(rank_a) if d not in lc and d not in lb]
        free_b = [d for d in range(rank_b) if d not in rc and d not in rb]
        if act_first:
            pos = len(lb) + free_a.index(act.axis)
        else:
            pos = len(lb) + len(free_a) + free_b.index(act.axis)
        return _Act(act.node, pos, act.inner)

    def elementwise(self, prim: str, ins: list[Any], in_shapes: list[tuple[int, ...]],
                    out_shape: tuple[int, ...]) -> _Act:
        tracked = [i for i in ins if isinstance(i, _Act) and i.node is not None]
        if not tracked:
            return _Act(None, None)
        axes = {(t.axis, t.inner) for t in tracked}
        if len(axes) != 1:
            raise _cannot(prim, "it combines activations with different channel layouts")
        node = tracked[0].node
        for t in tracked[1:]:
            node = self.union(node, t.node)
        axis, inner = axes.pop()
        for info, shape in zip(ins, in_shapes, strict=True):
            if isinstance(info, _Param):
                per_channel = info.axis == axis and len(shape) == len(out_shape) and \
                    shape[axis] == out_shape[axis] and math.prod(shape) == shape[axis]
                if not per_channel and math.prod(shape) != 1:
                    raise _cannot(prim, f"parameters {sorted(info.names)} do not act per channel")
                if per_channel:
                    self.attached.setdefault(node, []).extend(sorted(info.names))
        return _Act(node, axis, inner)

    def groups(self, model: nn.Module, input_size: int) -> tuple[ChannelGroup, ...]:
        roots: dict[int, list[int]] = {}
        for n in range(len(self.parent)):
            roots.setdefault(self.find(n), []).append(n)
        out = []
        for root in sorted(roots):
            nodes = roots[root]
            producers = tuple(self.producer[n] for n in nodes)
            module_of = {p.rsplit("/", 1)[0] for p in producers}
            attached = [p for n in nodes for p in self.attached.get(n, [])]
            norms, biases = [], []
            for name in attached:
                col, path = name.split("/", 1)
                module, leaf = path.rsplit("/", 1)
                if col == "params" and leaf == "bias" and module in module_of:
                    if path not in biases:
                        biases.append(path)
                elif leaf in ("scale", "bias", "mean", "var"):
                    if module not in norms:
                        norms.append(module)
                else:
                    raise ConfigError(f"channel groups: {name} acts on the channels of "
                                      f"{producers[0]} but is neither a BatchNorm nor a conv bias")
            consumers = tuple(k for n, k in self.consumers if self.find(n) == root)
            sizes = {self.sizes[n] for n in nodes}
            out.append(ChannelGroup(
                name=producers[0].rsplit("/", 1)[0], size=sizes.pop(), producers=producers,
                norms=tuple(norms), biases=tuple(biases), consumers=consumers,
                capped=self._capped(model, nodes)))
        return tuple(out)

    def _capped(self, model: nn.Module, nodes: list[int]) -> bool:
        if isinstance(model, ResNet):
            return any(self.producer[n] == "conv1/kernel" or self.producer[n].startswith("layer1_")
                       for n in nodes)
        return any(self.out_hw[n] == self.first_act_hw for n in nodes)


def _sub_jaxpr(eqn: Any) -> Any:
    """The inner jaxpr of a call-like equation (jit, custom_jvp/vjp, remat, closed_call), or None."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        inner = eqn.params.get(key)
        if inner is None:
            continue
        jaxpr = getattr(inner, "jaxpr", inner)
        if hasattr(jaxpr, "eqns") and len(jaxpr.invars) == len(eqn.invars):
            return jaxpr
    return None


def _kernel_of(info: Any, prim: str) -> str:
    if not isinstance(info, _Param):
        raise _cannot(prim, "its weights are not a parameter")
    kernels = [n for n in info.names if n.startswith("params/") and n.endswith("/kernel")]
    if len(kernels) != 1:
        raise _cannot(prim, f"its weights come from {sorted(info.names)}")
    return kernels[0].split("/", 1)[1]


def _reshaped_axis(old: tuple[int, ...], new: tuple[int, ...], axis: int) -> tuple[int, int]:
    """(new axis, factor) of a reshape that keeps dimension `axis` whole, possibly merged with the
    dimensions right after it (channel-major flatten: factor = their product)."""
    before = math.prod(old[:axis])
    candidates = []
    acc = 1
    for j, size in enumerate(new):
        if acc == before and size % old[axis] == 0:
            tail = size // old[axis]
            k, prod = axis + 1, 1
            while prod < tail and k < len(old):
                prod *= old[k]
                k += 1
            if prod == tail:
                candidates.append((j, tail))
        acc *= size
    if not candidates:
        raise _cannot("reshape", f"it splits the channel axis ({old} → {new})")
    real = [c for c in candidates if new[c[0]] != 1]
    return (real or candidates)[-1]


def _cannot(prim: str, why: str) -> ConfigError:
    return ConfigError(f"channel groups: cannot follow the channels through {prim} ({why}); "
                       f"supported architectures: {', '.join(SUPPORTED_ARCHS)}")
