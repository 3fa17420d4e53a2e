"""The main of a spec worker: run each spec of SPEC.json on every rank; rank 0 saves name -> result."""
import json
import sys
from typing import Callable

import torch

import paragen


def serve_specs(run: Callable[[dict], dict]) -> None:
    """usage: <worker> SPEC.json OUT.pt (a list of specs, each with a unique "name")."""
    specs = json.loads(open(sys.argv[1]).read())
    paragen.init()
    results = {spec["name"]: run(spec) for spec in specs}
    if paragen.is_output_rank():
        torch.save(results, sys.argv[2])
    paragen.shutdown()
