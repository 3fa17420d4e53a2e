"""Build a mesh as under NCCL (the backend reported as `nccl`, so every group gets a gloo twin) on real gloo
ranks; rank 0 saves what each rank observed of its groups and of the host-side metadata that used them."""
import sys

import torch

import paragen
import paragen.comms.world as world
from paragen.comms import all_gather_objects, broadcast_int, world_groups
from paragen.parallel import ParallelConfig, ParallelMesh

if __name__ == "__main__":
    paragen.init()
    world.backend_name = lambda: "nccl"  # what `needs_cpu_twins` asks: groups are made as a GPU run makes them
    world.start_cpu_world()
    mesh = ParallelMesh(ParallelConfig(cfg=2, patch=-1), torch.device("cuda"))
    seen = {name: {"twin": mesh.group(name).cpu_group is not mesh.group(name).group, "size": mesh.group(name).size}
            for name in ("cfg", "patch", "world")}
    seen["world_twin"] = world_groups()[1] is not world_groups()[0]
    seen["seed"] = broadcast_int(mesh.group("patch"), 1000 + paragen.comms.world_rank())
    everyone = all_gather_objects(mesh.group("world"), seen)
    if paragen.is_output_rank():
        torch.save(everyone, sys.argv[1])
    paragen.shutdown()
