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
    # all-to-all: rank r sends chunk j (value 100r + j) to rank j.
    chunks = torch.cat([torch.full((1, 2), 100.0 * r + j) for j in range(n)])
    seen["all_to_all"] = comm.all_to_all(chunks, "a2a", scatter_dim=0, gather_dim=0)
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
