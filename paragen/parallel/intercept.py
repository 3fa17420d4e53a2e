"""The one way paragen runs its code around a model's, pipeline's or scheduler's own method.

`intercept(obj, "forward", around)` makes `obj.forward(*args, **kwargs)` return
`around(original, *args, **kwargs)`, where `original` is the method as it was (bound to `obj`). Every
runtime uses it: the UNet, DiT, hires and video calls, the pipeline's `__call__`, the VAE decoder, a
causal LM's forward and attention, `scheduler.step` (the step hook), `prepare_latents`, `decode_latents`.

Why this mechanism. It needs nothing from the intercepted library but the method's name: no forward
signature (forward hooks see positional/keyword arguments as diffusers passes them and cannot skip or
repeat the call, which the hires windows, the video clips and the LM's sharded forward need), no
callback protocol (`callback_on_step_end` is missing from some pipelines and owned by the user), no
copy of the library's code. An ordinary method is wrapped on the instance only, so the class and its
other instances are untouched, and `nn.Module.__call__` still runs torch's hooks (accelerate's too)
around it. Special methods such as `__call__` are looked up on the type, so for them the instance gets
a subclass of its own class, with the same name and module. A deep copy of an intercepted object
(hires copies the scheduler for its low-resolution branch) is not intercepted.
"""
from __future__ import annotations

import copy
import types
from typing import Any, Callable

_SUBCLASSES: dict[tuple[type, str], type] = {}


def intercept(obj: Any, name: str, around: Callable[..., Any]) -> None:
    """Make `obj.<name>(*a, **k)` call `around(original, *a, **k)`; intercepting twice nests the wrappers."""
    if name.startswith("__") and name.endswith("__"):
        _intercept_special(obj, name, around)
        return
    original = getattr(obj, name)
    setattr(obj, name, _Around(obj, name, original, around))


def intercepted(obj: Any, name: str) -> bool:
    """Whether `obj.<name>` is wrapped by `intercept` on this instance."""
    return isinstance(vars(obj).get(name), _Around) or f"_paragen_{name}" in vars(obj)


class _Around:
    """The instance attribute standing in for an intercepted method."""

    def __init__(self, owner: Any, name: str, original: Callable[..., Any], around: Callable[..., Any]) -> None:
        self.owner, self.name, self.original, self.around = owner, name, original, around
        self.__doc__ = getattr(original, "__doc__", None)
        self.__wrapped__ = original  # inspect.signature(obj.<name>) is the original's

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.around(self.original, *args, **kwargs)

    def __deepcopy__(self, memo: dict) -> Any:
        # The copy of the owner is made (and memoised) before its attributes: give it the plain method.
        twin = memo.get(id(self.owner))
        if twin is None:
            return copy.copy(self)
        return types.MethodType(getattr(type(twin), self.name), twin)


def _intercept_special(obj: Any, name: str, around: Callable[..., Any]) -> None:
    """Special methods: a same-named subclass whose method calls the instance's `_paragen_<name>` wrapper."""
    slot = f"_paragen_{name}"
    original = getattr(obj, slot, None) or types.MethodType(getattr(type(obj), name), obj)
    setattr(obj, slot, _Around(obj, name, original, around))
    cls = type(obj)
    if slot not in {n for base in cls.__mro__ for n in vars(base)}:
        key = (cls, name)
        if key not in _SUBCLASSES:
            method = getattr(cls, name)

            def special(self, *args, **kwargs):
                return getattr(self, slot)(*args, **kwargs)

            special.__doc__ = method.__doc__
            special.__wrapped__ = method  # inspect.signature(type(obj).<name>) is the original's
            _SUBCLASSES[key] = type(cls.__name__, (cls,), {name: special, slot: None, "__module__": cls.__module__})
        obj.__class__ = _SUBCLASSES[key]
