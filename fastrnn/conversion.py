"""``convert(model)``: one line that puts fastrnn's modules into a model someone else wrote.

Every ``torch.nn.RNN``, ``torch.nn.LSTM`` and ``torch.nn.GRU`` inside the model (exactly those
classes, as ``fastrnn.CELLS`` records them) becomes the fastrnn module of the same configuration,
holding the very same ``Parameter`` objects: an optimizer built before still updates them, and the
``state_dict`` is unchanged. The rest of what the torch module carries comes along too:

* its training mode, and its device and dtype (the parameters themselves are kept);
* every attribute set on it, buffers and child modules included (``qconfig``, a pruning mask, ...);
* its hooks, in the very same dictionaries, so a ``RemovableHandle`` taken before still removes the
  hook (``torch.nn.utils.weight_norm`` and pruning, which work by hooks, keep working);
* its parametrizations (``torch.nn.utils.parametrize``: ``parametrizations.weight_norm``,
  ``spectral_norm``, ``orthogonal``, your own): the new module is parametrized by the very same
  parametrization modules, and ``remove_parametrizations`` leaves the new module's plain class.

``convert(model, to="torch")`` goes the other way, the same way: every fastrnn module becomes the
torch module of its configuration. fastrnn's modules subclass ``torch.nn.RNNBase``, not torch's
RNN, LSTM and GRU, so code that picks modules by class does not see them: converted back, a model
takes ``torch.ao.quantization.quantize_dynamic``, ``torch.fx.symbolic_trace`` (which
keeps torch's modules as leaves) and ``isinstance(m, nn.LSTM)`` as it did before.

Left alone: subclasses of the torch modules (their own ``forward`` may rely on torch's; the class
``parametrize`` makes, which only adds the parametrized names, is not one of them), fastrnn's own
modules (so converting twice changes nothing), and references to a torch module from outside the
module tree (a plain list, an optimizer's closure): they keep the torch module, which shares its
parameters and hooks.
"""

from __future__ import annotations

import copy
import warnings

from torch import nn
from torch.nn.utils import parametrize

from .cells import CELLS

# What holds a module's structure: copied, so that the old module and the new one stop changing
# together. Every other attribute (hooks' dictionaries included) is carried over as the same object.
STRUCTURE = ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules", "_flat_weights",
             "_flat_weight_refs", "_flat_weights_names", "_all_weights")


def convert(module: nn.Module, to: str = "fastrnn") -> nn.Module:
    """``module`` with every ``torch.nn.RNN`` / ``LSTM`` / ``GRU`` in it replaced by fastrnn's (``to=
    "torch"``: every fastrnn module by torch's).

    Returns a new module when ``module`` itself is one of them, else ``module``, changed in place.
    A module registered at several places becomes one new module registered at all of them.
    Outputs, gradients and parameters are those of the model before; see the module's docstring for
    what else is kept and what is left alone."""
    if to not in ("fastrnn", "torch"):
        raise ValueError(f"to must be 'fastrnn' or 'torch', got {to!r}")
    targets = {cell.torch_module: cell.module for cell in CELLS.values()}
    if to == "torch":
        targets = {new: old for old, new in targets.items()}
    converted = {}  # id(module) -> its new module, so a shared module stays shared
    root = module
    for path, child in list(module.named_modules(remove_duplicate=False)):
        target = targets.get(class_before_parametrizations(child))
        if target is None:
            continue
        if id(child) not in converted:
            converted[id(child)] = rebuilt(child, target)
        if path == "":
            root = converted[id(child)]
        else:
            parent_path, _, name = path.rpartition(".")
            root.get_submodule(parent_path).add_module(name, converted[id(child)])
    return root


def rebuilt(rnn: nn.RNNBase, target: type) -> nn.RNNBase:
    """A ``target`` module that is ``rnn`` with ``target``'s forward: built by its constructor for
    ``rnn``'s configuration (on the meta device, so nothing is allocated and no random number is
    drawn), then given ``rnn``'s attributes: its parameters, buffers, hooks and the rest."""
    with warnings.catch_warnings():  # the module gave them when it was built (dropout, ...)
        warnings.simplefilter("ignore", UserWarning)
        # (the dtype from _flat_weights: reading a parametrized weight would run its parametrization)
        twin = target(**configuration(rnn), device="meta", dtype=rnn._flat_weights[0].dtype)
    for key, value in vars(rnn).items():
        twin.__dict__[key] = copy.copy(value) if key in STRUCTURE else value
    if parametrize.is_parametrized(rnn):
        twin.__class__ = parametrized(target, type(rnn))
    return twin


def class_before_parametrizations(module: nn.Module) -> type:
    """``parametrize.type_before_parametrizations(module)`` where ``parametrize`` made ``module``'s class
    (a subclass of the class before with a property for each parametrized name and, beside those,
    only ``__dunder__`` names), else ``module``'s class."""
    cls, before = type(module), parametrize.type_before_parametrizations(module)
    if before is cls or cls.__bases__ != (before,):
        return cls
    own = {name: value for name, value in vars(cls).items() if not (name[:2] == name[-2:] == "__")}
    made = all(isinstance(value, property) and name in module.parametrizations
               for name, value in own.items())
    return before if made else cls


def parametrized(target: type, made: type) -> type:
    """The class ``parametrize`` would have made for ``target``: ``made``'s properties and the rest of
    what it put there, over ``target``."""
    own = {name: value for name, value in vars(made).items()
           if name not in ("__dict__", "__weakref__", "__slotnames__")}  # (type makes its own)
    return type(f"Parametrized{target.__name__}", (target,), own)


def configuration(rnn: nn.RNNBase) -> dict:
    """The constructor's arguments that built ``rnn`` (device and dtype aside): ``nonlinearity``
    only where the module has one (RNN), ``proj_size`` only where it is used (LSTM)."""
    arguments = {"input_size": rnn.input_size, "hidden_size": rnn.hidden_size,
                 "num_layers": rnn.num_layers, "bias": rnn.bias, "batch_first": rnn.batch_first,
                 "dropout": rnn.dropout, "bidirectional": rnn.bidirectional}
    if getattr(rnn, "nonlinearity", None) is not None:
        arguments["nonlinearity"] = rnn.nonlinearity
    if rnn.proj_size > 0:
        arguments["proj_size"] = rnn.proj_size
    return arguments

