"""The fusion pass of ``pyops.convert(model, fuse=True)``, over a torch.fx trace of the
already converted model.

Patterns (each only where it is exact):

- a pyops Conv2d followed by ReLU / LeakyReLU / Sigmoid / Tanh (module, functional or
  method call) -> ``pyops.nn.Conv2dAct`` (``conv2d_bias_act``);
- a pyops Linear followed by one of those activations -> ``pyops.nn.LinearAct``
  (``linear_act``);
- a ReLU followed by MaxPool2d (module or functional) -> ``pyops.nn.ReLUMaxPool2d``
  (``relu_max_pool2d``).

Conv and linear fuse first, so conv -> relu -> max-pool becomes Conv2dAct -> MaxPool2d.

"Exact" means: the first op's result is used by the second alone (an in-place
activation then changes nothing anyone else can see); no hooks on either module (a
hook would see a tensor that no longer exists); a module is fused only where it is
called once; an in-place relu before a pool fuses only when it mutates a fresh tensor
(a conv, linear or batch-norm output) that nothing else reads, since the fused op leaves
its input untouched.

The fused modules take the place of the conv, linear or pool in a new GraphModule and
hold the same Parameter objects; every other submodule is the model's own object. The
model passed in is left converted and unfused, still valid.
"""

import collections

import torch
import torch.nn.functional as TF
from torch import fx

from pyops import functional as PF
from pyops import nn as pnn

_MODULE_ACTIVATIONS = {
    pnn.ReLU: "relu", torch.nn.ReLU: "relu",
    pnn.LeakyReLU: "leaky_relu", torch.nn.LeakyReLU: "leaky_relu",
    pnn.Sigmoid: "sigmoid", torch.nn.Sigmoid: "sigmoid",
    pnn.Tanh: "tanh", torch.nn.Tanh: "tanh",
}

# function -> (activation, the names of its arguments after the input). A name ending in
# "_" is in place; so is a call with inplace=True.
_FUNCTION_ACTIVATIONS = {
    TF.relu: ("relu", ("inplace",)), PF.relu: ("relu", ("inplace",)),
    torch.relu: ("relu", ()), torch.relu_: ("relu", ()), PF.relu_: ("relu", ()),
    TF.leaky_relu: ("leaky_relu", ("negative_slope", "inplace")),
    PF.leaky_relu: ("leaky_relu", ("negative_slope", "inplace")),
    TF.leaky_relu_: ("leaky_relu", ("negative_slope",)),
    PF.leaky_relu_: ("leaky_relu", ("negative_slope",)),
    torch.sigmoid: ("sigmoid", ()), torch.sigmoid_: ("sigmoid", ()), TF.sigmoid: ("sigmoid", ()),
    PF.sigmoid: ("sigmoid", ()),
    torch.tanh: ("tanh", ()), torch.tanh_: ("tanh", ()), TF.tanh: ("tanh", ()),
    PF.tanh: ("tanh", ()),
}

_METHOD_ACTIVATIONS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid",
                       "sigmoid_": "sigmoid", "tanh": "tanh", "tanh_": "tanh"}

_FUNCTION_MAX_POOLS = {
    TF.max_pool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    PF.max_pool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    torch.max_pool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
}

# Producers fused with the activation after them, and the fused module class.
_PRODUCERS = {pnn.Conv2d: pnn.Conv2dAct, pnn.Linear: pnn.LinearAct}

# Modules whose output is a new tensor (no view of their input or of a buffer), which an
# in-place relu may mutate unseen when nothing else reads it.
_FRESH_OUTPUT_MODULES = (
    pnn.Conv2d, pnn.Conv2dAct, pnn.ConvTranspose2d, pnn.Linear, pnn.LinearAct,
    torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
)

_FUSED_MODULES = (pnn.Conv2dAct, pnn.LinearAct, pnn.ReLUMaxPool2d)

Activation = collections.namedtuple("Activation", "kind negative_slope inplace")


class Untraceable(Exception):
    """torch.fx cannot give one graph that computes what the model computes."""


class _Tracer(fx.Tracer):
    # pyops modules stay single calls, as torch.nn's do.
    def is_leaf_module(self, module, qualified_name):
        return (type(module).__module__ == pnn.__name__
                or super().is_leaf_module(module, qualified_name))


def trace(model):
    """The fx graph of ``model.forward``; raises Untraceable, saying why, where there is
    none. The graph must not depend on train()/eval(): fx fixes Python control flow at
    trace time, so a forward that branches on ``self.training`` would be frozen in one
    mode."""
    flags = [(m, m.training) for m in model.modules()]
    graphs = []
    try:
        for mode in (True, False):
            model.train(mode)
            graphs.append(_Tracer().trace(model))
    except Exception as error:  # fx raises TraceError, TypeError, ... from user code
        raise Untraceable(f"torch.fx cannot trace {type(model).__name__}.forward "
                          f"({type(error).__name__}: {error})") from error
    finally:
        for module, flag in flags:
            module.training = flag
    if graphs[0].python_code("self").src != graphs[1].python_code("self").src:
        raise Untraceable(f"{type(model).__name__}.forward runs different code in train() "
                          "and eval() mode, which one fx graph cannot follow")
    return graphs[0]


def _has_hooks(module):
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _bind(node, names):
    """{name: value} of ``node``'s arguments after its first, or None unless they are
    constants under those names."""
    if not node.args or len(node.args) - 1 > len(names):
        return None
    bound = dict(zip(names, node.args[1:]))
    for name, value in node.kwargs.items():
        if name not in names or name in bound:
            return None
        bound[name] = value
    nodes = []
    fx.node.map_arg(bound, nodes.append)  # Nodes anywhere, nested in tuples too
    return None if nodes else bound


def _activation(node, modules):
    """The Activation that ``node`` applies to its first argument, or None."""
    if node.op == "call_module":
        module = modules[node.target]
        kind = _MODULE_ACTIVATIONS.get(type(module))
        if kind is None or _has_hooks(module) or len(node.args) != 1 or node.kwargs:
            return None
        return Activation(kind, getattr(module, "negative_slope", 0.01),
                          getattr(module, "inplace", False))
    if node.op == "call_function":
        try:
            kind, names = _FUNCTION_ACTIVATIONS[node.target]
        except (KeyError, TypeError):  # TypeError: an unhashable target
            return None
        bound = _bind(node, names)
        if bound is None:
            return None
        slope = bound.get("negative_slope", 0.01)
        if not isinstance(slope, (int, float)):
            return None
        inplace = node.target.__name__.endswith("_") or bool(bound.get("inplace", False))
        return Activation(kind, slope, inplace)
    if node.op == "call_method":
        kind = _METHOD_ACTIVATIONS.get(node.target)
        if kind is None or len(node.args) != 1 or node.kwargs:
            return None
        return Activation(kind, 0.01, node.target.endswith("_"))
    return None


def _describe(node):
    # A module by its qualified name; a function or method call by its node's name in
    # the GraphModule's code.
    return node.target if node.op == "call_module" else f"{node.name}()"


class _Fuser:
    def __init__(self, model, graph):
        self.gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
        self.model_modules = {id(m) for m in model.modules()}
        self.modules = dict(self.gm.named_modules())
        self.calls = collections.Counter(
            n.target for n in self.gm.graph.nodes if n.op == "call_module")
        self.fused = []  # ([names], "what they became")
        self.not_fused = []  # ([names], reason)

    def _why_not_replace(self, node):
        """Why the module ``node`` calls cannot be replaced in the GraphModule, or None."""
        if self.calls[node.target] != 1:
            return f"{node.target} is called at {self.calls[node.target]} places"
        if _has_hooks(self.modules[node.target]):
            return f"{node.target} has hooks"
        if self._parent_is_the_models(node.target):
            return f"the parent of {node.target} is called as a whole as well"
        return None

    def _parent_is_the_models(self, target):
        # fx gives the GraphModule its own parent containers, except where the parent
        # is itself called: replacing or deleting its child would change the model too.
        parent = self.gm.get_submodule(target.rpartition(".")[0])
        return parent is not self.gm and id(parent) in self.model_modules

    def _replace_module(self, node, module):
        parent_name, _, name = node.target.rpartition(".")
        setattr(self.gm.get_submodule(parent_name), name, module)
        self.modules[node.target] = module

    def _erase(self, node, replacement):
        node.replace_all_uses_with(replacement)
        self.gm.graph.erase_node(node)
        if node.op == "call_module":
            self.calls[node.target] -= 1
            if self.calls[node.target] == 0 and not self._parent_is_the_models(node.target):
                self.gm.delete_submodule(node.target)

    def fuse_producer_activation(self):
        """conv -> activation and linear -> activation."""
        for node in list(self.gm.graph.nodes):
            if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
                continue
            fused_class = _PRODUCERS.get(type(self.modules[node.target]))
            if fused_class is None:
                continue
            users = list(node.users)
            act_node = next((u for u in users
                             if u.args[:1] == (node,) and _activation(u, self.modules)), None)
            if act_node is None:
                continue
            names = [node.target, _describe(act_node)]
            if len(users) != 1:
                self.not_fused.append((names, f"the output of {node.target} is used "
                                              f"{len(users)} times"))
                continue
            reason = self._why_not_replace(node)
            if reason:
                self.not_fused.append((names, reason))
                continue
            act = _activation(act_node, self.modules)
            fused = fused_class.fuse(self.modules[node.target], act.kind, act.negative_slope)
            self._replace_module(node, fused)
            self._erase(act_node, node)
            self.fused.append((names, f"{fused_class.__name__}({act.kind})"))

    def fuse_relu_max_pool(self):
        """relu -> max_pool2d."""
        for pool in list(self.gm.graph.nodes):
            relu = pool.args[0] if pool.args else None
            if not isinstance(relu, fx.Node) or list(relu.users) != [pool]:
                continue
            act = _activation(relu, self.modules)
            if act is None or act.kind != "relu" or not isinstance(relu.args[0], fx.Node):
                continue
            if pool.op == "call_module":
                module = self.modules[pool.target]
                if (type(module) not in (pnn.MaxPool2d, torch.nn.MaxPool2d)
                        or module.return_indices or len(pool.args) != 1 or pool.kwargs):
                    continue
            elif pool.op == "call_function":
                try:
                    names = _FUNCTION_MAX_POOLS[pool.target]
                except (KeyError, TypeError):
                    continue
                bound = _bind(pool, names)
                if bound is None or bound.pop("return_indices", False) is not False:
                    continue
            else:
                continue
            names = [_describe(relu), _describe(pool)]
            source = relu.args[0]
            if act.inplace and not self._mutation_unseen(source):
                self.not_fused.append((names, "the in-place relu mutates a tensor that may "
                                              "be seen elsewhere"))
                continue
            if pool.op == "call_module":
                reason = self._why_not_replace(pool)
                if reason:
                    self.not_fused.append((names, reason))
                    continue
                self._replace_module(pool, pnn.ReLUMaxPool2d.fuse(module))
                pool.replace_input_with(relu, source)
                self._erase(relu, source)
                self.fused.append((names, "ReLUMaxPool2d"))
            else:
                with self.gm.graph.inserting_before(pool):
                    fused = self.gm.graph.call_function(PF.relu_max_pool2d, (source,), bound)
                self._erase(pool, fused)
                self._erase(relu, source)
                self.fused.append((names, "relu_max_pool2d"))

    def _mutation_unseen(self, node):
        return (isinstance(node, fx.Node) and len(node.users) == 1 and node.op == "call_module"
                and type(self.modules[node.target]) in _FRESH_OUTPUT_MODULES)

    def finish(self, model):
        self.gm.graph.lint()
        self.gm.recompile()
        # The containers fx creates (the GraphModule itself, the parents of the modules
        # it calls) start in training mode: give them the flags of their model twins.
        for name, module in self.gm.named_modules():
            if id(module) in self.model_modules or isinstance(module, _FUSED_MODULES):
                continue  # the model's own module, or a fused one (flag of what it fused)
            try:
                module.training = model.get_submodule(name).training
            except AttributeError:
                pass
        return self.gm


def fuse(model):
    """(GraphModule or None, fused, not_fused) for the converted ``model``; None when
    nothing was fused. Raises Untraceable."""
    fuser = _Fuser(model, trace(model))
    fuser.fuse_producer_activation()
    fuser.fuse_relu_max_pool()
    gm = fuser.finish(model) if fuser.fused else None
    return gm, fuser.fused, fuser.not_fused

