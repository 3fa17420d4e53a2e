"""The one way paragen runs its code around a model's, pipeline's or scheduler's own method.

`intercept(obj, "forward", around, tag="dit.plan")` makes `obj.forward(*args, **kwargs)` return
`around(original, *args, **kwargs)`, where `original` is the method as it was (bound to `obj`). Every
runtime uses it: the sharding plans' splits and gathers, the attention seam's sites, the UNet patch layers'
calls, the DiT, hires and video calls, the pipeline's `__call__`, the VAE decoder, a causal LM's forward and
attention (its metering), `scheduler.step` (the step hook), `prepare_latents`, `decode_latents`. Every
interception carries a tag that says whose it is: `interceptions(obj, name)` lists them (outermost first) and
`remove(obj, name, tag)` takes one out again, leaving the others in their order.

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


def _special(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def intercept(obj: Any, name: str, around: Callable[..., Any], *, tag: str, innermost: bool = False) -> None:
    """Make `obj.<name>(*a, **k)` call `around(original, *a, **k)`; intercepting twice nests the wrappers (the
    newest outermost, or, with `innermost`, next to the method itself: it then sees the call as the interceptions
    already there pass it on). `tag` names the interception (`remove`, `interceptions`)."""
    link = _outermost(obj, name)
    if innermost and isinstance(link, _Around):
        while isinstance(link.original, _Around):
            link = link.original
        link.original = _Around(link.owner, name, link.original, around, tag)
        return
    if _special(name):
        _intercept_special(obj, name, around, tag)
        return
    original = getattr(obj, name)
    setattr(obj, name, _Around(obj, name, original, around, tag))


def intercepted(obj: Any, name: str) -> bool:
    """Whether `obj.<name>` is wrapped by `intercept` on this instance."""
    return bool(interceptions(obj, name))


def _outermost(obj: Any, name: str) -> Any:
    return vars(obj).get(f"_paragen_{name}" if _special(name) else name)


def interceptions(obj: Any, name: str) -> list[str]:
    """The tags of the interceptions of `obj.<name>`, outermost first."""
    tags, link = [], _outermost(obj, name)
    while isinstance(link, _Around):
        tags.append(link.tag)
        link = link.original
    return tags


def remove(obj: Any, name: str, tag: str) -> None:
    """Take the interception tagged `tag` off `obj.<name>` (the others stay, in their order); KeyError if there is
    none. With the last one gone the instance is as it was."""
    chain, link = [], _outermost(obj, name)
    while isinstance(link, _Around):
        chain.append(link)
        link = link.original
    if tag not in [a.tag for a in chain]:
        raise KeyError(f"{type(obj).__name__}.{name} has no interception tagged {tag!r} (it has {interceptions(obj, name)})")
    kept = [a for a in chain if a.tag != tag]
    for outer, inner in zip(kept, kept[1:] + [None]):
        outer.original = link if inner is None else inner
    if _special(name):
        if kept:
            setattr(obj, f"_paragen_{name}", kept[0])
        else:
            delattr(obj, f"_paragen_{name}")
            obj.__class__ = type(obj).__bases__[0]
    elif kept:
        setattr(obj, name, kept[0])
    else:
        delattr(obj, name)


class _Around:
    """The instance attribute standing in for an intercepted method."""

    def __init__(self, owner: Any, name: str, original: Callable[..., Any], around: Callable[..., Any], tag: str) -> None:
        self.owner, self.name, self.original, self.around, self.tag = owner, name, original, around, tag
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


def _intercept_special(obj: Any, name: str, around: Callable[..., Any], tag: str) -> None:
    """Special methods: a same-named subclass whose method calls the instance's `_paragen_<name>` wrapper."""
    slot = f"_paragen_{name}"
    original = getattr(obj, slot, None) or types.MethodType(getattr(type(obj), name), obj)
    setattr(obj, slot, _Around(obj, name, original, around, tag))
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
