"""Exercise every comms operation on real ranks; rank 0 saves what each rank observed."""
import sys

import torch

import paragen
from paragen.comms import CommStats, FlatAllGather, GroupComm, all_gather_objects, broadcast_int


def observe() -> dict:
    import torch.distributed as dist

    stats = CommStats()
    comm = GroupComm(dist.group.WORLD, stats)
    r, n = comm.rank, comm.size
    seen: dict = {}
    x = torch.arange(6, dtype=torch.float32).view(2, 3) + 10 * r
    seen["all_gather"] = comm.all_gather(x, "g")
    seen["all_reduce"] = comm.all_reduce(x.clone(), "r")
    # all-to-all of uneven pieces: rank r sends r + j + 1 values (100r + j) to rank j.
    send = torch.cat([torch.full((r + j + 1,), 100.0 * r + j) for j in range(n)])
    seen["all_to_all"] = comm.all_to_all_flat_async(
        send, [r + j + 1 for j in range(n)], [src + r + 1 for src in range(n)], "a2a"
    ).wait()
    # ring: rank r sends r + 1 rows to the next rank and gets r rows (or n rows, on rank 0) from the previous.
    prev = (r - 1) % n
    seen["ring"] = comm.ring_shift_async(torch.full((r + 1, 2), float(r)), (prev + 1, 2), "ring").wait()
    # P2P share: every rank gets every other rank's tensor of its own length (r + 1).
    seen["share"] = comm.share_async(torch.full((r + 1,), float(r)), [(k + 1,) for k in range(n)], "share").wait()
    # all-gather of shards of different lengths along dim 1.
    seen["varlen"] = comm.all_gather_varlen(torch.full((2, r + 1), float(r)), 1, [k + 1 for k in range(n)], "varlen")
    # neighbours: different row counts up and down, as a stride-2 conv would need.
    band = torch.full((1, 1, 4, 3), float(r))
    seen["neighbours"] = comm.exchange_neighbours_async(band[:, :, :1], band[:, :, -2:], "halo").wait()
    # flat gather over two steps with a small bucket size, so several buckets are used.
    flat = FlatAllGather(comm, "flat", bucket_bytes=64)
    steps = []
    slots = None
    for step in range(3):
        tensors = [torch.full((k + 1, 4), 1000.0 * step + 10 * r + k) for k in range(5)]
        if slots is not None:
            steps.append([s.wait().clone() for s in slots])
        slots = [flat.submit(t, "flat_data") for t in tensors]
        flat.end_step()
    steps.append([s.wait().clone() for s in slots])
    flat.drain()
    seen["flat"] = steps
    seen["broadcast"] = broadcast_int(comm, 1234 + r)
    # Reusing a bucket whose data was never read must raise, not serve overwritten data.
    strict = FlatAllGather(comm, "strict", bucket_bytes=1 << 20)
    strict.submit(torch.ones(4), "x")
    strict.end_step()
    strict.submit(torch.ones(4), "x")
    try:
        strict.end_step()
        seen["reuse_error"] = None
    except RuntimeError as error:
        seen["reuse_error"] = str(error)
    seen["stats"] = stats.snapshot()
    return seen


def main() -> None:
    paragen.init()
    import torch.distributed as dist

    everyone = all_gather_objects(GroupComm(dist.group.WORLD, CommStats()), observe())
    if paragen.is_output_rank():
        torch.save(everyone, sys.argv[1])
    paragen.shutdown()


if __name__ == "__main__":
    main()
