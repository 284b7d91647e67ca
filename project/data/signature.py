"""Constructors that list inherited arguments with the subclass's own defaults.

A DataModule subclass writes only its own arguments in ``__init__`` and passes the shared ones
on with ``**kwargs``. Two class attributes say how it differs from its parent:

- ``arg_defaults``: new defaults for inherited arguments (MNIST's ``mean`` and ``std``);
- ``fixed_args``: inherited arguments it pins and hides (the MNIST sample's ``data_dir``).

:func:`complete_init` (run for every subclass by ``InMemoryDataModule.__init_subclass__``) gives the
class an ``__init__`` whose ``__signature__`` lists every argument, its own first, with this
class's defaults. The CLI reads that signature (``--data.help``, ``--print_config``), and the
documentation of each argument from the docstrings along the class's MRO, so an argument is
declared and documented once, in the class that introduces it. When called, the wrapper fills
those defaults in, calls the class's own ``__init__`` (or the parent's), and saves the
arguments of the outermost class as its hyperparameters, so ``cls(**dm.hparams)`` builds it again
(Lightning's own ``save_hyperparameters()`` reads ``__init__`` frames and their signatures, which
this wrapper changes).
"""

import inspect
from typing import Any

_KEYWORD = inspect.Parameter.KEYWORD_ONLY
_VAR_KEYWORD = inspect.Parameter.VAR_KEYWORD


def _parameters(function: Any) -> list[inspect.Parameter]:
    return list(inspect.signature(function).parameters.values())


def complete_init(cls: type) -> None:
    """Replace ``cls.__init__`` by a wrapper with the complete signature (see the module docstring)."""
    own_init = cls.__dict__.get("__init__")
    parent_init = super(cls, cls).__init__
    defaults: dict[str, Any] = dict(cls.__dict__.get("arg_defaults", {}))
    fixed: dict[str, Any] = dict(cls.__dict__.get("fixed_args", {}))

    inherited = _parameters(parent_init)
    self_param, own = inherited[0], []
    if own_init is not None:
        self_param, *own = _parameters(own_init)
        if not own or own[-1].kind != _VAR_KEYWORD:
            raise TypeError(f"{cls.__name__}.__init__ must pass the shared arguments on with **kwargs")
        own.pop()
    own_names = {p.name for p in own}
    inherited = [p for p in inherited[1:] if p.name not in own_names]
    unknown = (defaults.keys() | fixed.keys()) - {p.name for p in inherited}
    if unknown:
        raise TypeError(f"{cls.__name__}: arg_defaults/fixed_args name no inherited argument: {sorted(unknown)}")
    by_keyword = own_init is not None  # arguments passed on through **kwargs can only be given by keyword
    inherited = [
        p.replace(kind=_KEYWORD if by_keyword else p.kind, default=defaults.get(p.name, p.default))
        for p in inherited
        if p.name not in fixed
    ]
    signature = inspect.Signature([self_param, *own, *inherited])
    call = own_init if own_init is not None else parent_init

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments[self_param.name]
        call(self, **arguments, **fixed)
        if type(self) is cls:  # the outermost constructor records its arguments, tuples as lists (YAML)
            self.save_hyperparameters({k: list(v) if isinstance(v, tuple) else v for k, v in arguments.items()})

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__doc__ = call.__doc__
    __init__.__module__ = cls.__module__
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = __init__  # type: ignore[misc]
