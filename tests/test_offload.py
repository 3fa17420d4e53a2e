"""Layer-wise offload (`--offload-layers`) in one process: the blocks' weights live in host memory and come onto the
device only while they run; the outputs equal those of the weights kept in place.

On the CPU nothing moves (host memory is the device's), so what is checked is the mechanism: every block's
parameters are empty between forwards and whole while it runs, the second forward brings each next block in ahead
of its turn, and the pictures are the same.
"""
from __future__ import annotations

import torch

from paragen.comms.weight_shards import resident_bytes
from paragen.parallel.weights import block_order, weight_units
from paragen.pipelines.loading import build_pipeline


def _picture(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a red circle", height=64, width=64, num_inference_steps=2, output_type="pt", clean_caption=False,
                generator=torch.Generator().manual_seed(3)).images


def test_offloaded_layers_give_the_same_picture_and_leave_only_the_root_on_the_device():
    whole = build_pipeline("tiny-pixart")
    offloaded = build_pipeline("tiny-pixart", offload_layers=True)
    transformer = offloaded.transformer
    units = weight_units(transformer)
    sizes_while_running = []
    for unit in units:
        unit.register_forward_pre_hook(  # after the offload's own hook: the weights are there
            lambda module, args: sizes_while_running.append(sum(p.numel() for p in module.parameters())))
    expected = _picture(whole)
    assert torch.equal(_picture(offloaded), expected)
    assert all(p.numel() == 0 for unit in units for p in unit.parameters())  # released between forwards
    in_blocks = sum(p.numel() * p.element_size() for unit in weight_units(whole.transformer) for p in unit.parameters())
    assert 0 < in_blocks < resident_bytes(whole.transformer)
    assert resident_bytes(transformer) == resident_bytes(whole.transformer) - in_blocks
    assert min(sizes_while_running) > 0
    order = block_order(transformer)
    assert order.order == units  # PixArt runs its blocks in module order
    assert order.prefetches >= len(units) - 1  # every block but the first brought in ahead, from the second step
