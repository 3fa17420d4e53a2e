"""`intercept`: the one way paragen runs code around a method."""
import copy
import inspect

import pytest
import torch

from paragen.parallel.intercept import intercept, intercepted, interceptions, remove


class Scheduler:
    def __init__(self) -> None:
        self.calls = 0

    def step(self, x: int) -> int:
        self.calls += 1
        return x + 1

    def __call__(self, x: int) -> int:
        return 10 * x


def test_an_ordinary_method_is_wrapped_on_the_instance_only():
    ours, other = Scheduler(), Scheduler()
    intercept(ours, "step", lambda step, x: 100 * step(x), tag="t")
    intercept(ours, "step", lambda step, x: step(x) - 1, tag="t")  # nests: the newest runs outermost
    assert ours.step(1) == 199 and other.step(1) == 2 and ours.calls == 1
    assert intercepted(ours, "step") and not intercepted(other, "step")


def test_a_special_method_gets_a_same_named_subclass():
    ours, other = Scheduler(), Scheduler()
    intercept(ours, "__call__", lambda call, x: call(x) + 1, tag="t")
    assert ours(2) == 21 and other(2) == 20
    assert type(ours).__name__ == "Scheduler" and isinstance(ours, Scheduler) and intercepted(ours, "__call__")


def test_an_intercepted_special_method_keeps_its_signature():
    """Callers read a pipeline's accepted options from `type(pipe).__call__` (the image job's exact-size options):
    the subclass's method must show the original's parameters, not `*args, **kwargs`."""
    ours = Scheduler()
    intercept(ours, "__call__", lambda call, x: call(x), tag="t")
    assert list(inspect.signature(type(ours).__call__).parameters) == ["self", "x"]


def test_a_deep_copy_is_not_intercepted():
    ours = Scheduler()
    intercept(ours, "step", lambda step, x: -step(x), tag="t")
    twin = copy.deepcopy(ours)
    assert ours.step(1) == -2 and twin.step(1) == 2
    assert twin.calls == 1 and ours.calls == 1  # the twin's step runs on the twin


def test_a_module_forward_keeps_torch_hooks():
    layer = torch.nn.Linear(2, 2)
    seen = []
    layer.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    intercept(layer, "forward", lambda forward, x: forward(x) * 0, tag="t")
    assert layer(torch.ones(3, 2)).abs().sum().item() == 0 and seen == [torch.Size([3, 2])]


def test_interceptions_are_named_and_each_one_can_be_taken_out():
    ours = Scheduler()
    intercept(ours, "step", lambda step, x: 100 * step(x), tag="inner")
    intercept(ours, "step", lambda step, x: step(x) - 1, tag="outer")
    assert interceptions(ours, "step") == ["outer", "inner"]
    remove(ours, "step", "inner")
    assert ours.step(1) == 1 and interceptions(ours, "step") == ["outer"]
    remove(ours, "step", "outer")
    assert ours.step(1) == 2 and not intercepted(ours, "step") and "step" not in vars(ours)
    with pytest.raises(KeyError, match="no interception tagged 'outer'"):
        remove(ours, "step", "outer")


def test_a_special_method_is_restored_with_its_class():
    ours = Scheduler()
    intercept(ours, "__call__", lambda call, x: call(x) + 1, tag="a")
    intercept(ours, "__call__", lambda call, x: call(x) * 2, tag="b")
    assert ours(2) == 42 and interceptions(ours, "__call__") == ["b", "a"]
    remove(ours, "__call__", "b")
    assert ours(2) == 21
    remove(ours, "__call__", "a")
    assert ours(2) == 20 and type(ours) is Scheduler
