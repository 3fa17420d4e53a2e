"""The attention seam on real ranks (gloo): one module's attention over uneven shards, with and without a padding
mask over its keys, equals torch's attention over the whole sequence; keys that no query sees are left out."""
import pytest
import torch

from tests.multiproc import check_all_ok, run_ranks
from tests.workers.seam_worker import LENGTHS


@pytest.fixture(scope="module", params=[(1, 2), (2, 1), (2, 2)], ids=["ring2", "ulysses2", "ulysses2xring2"])
def seen(request, tmp_path_factory):
    ulysses, ring = request.param
    out = tmp_path_factory.mktemp("seam") / "seen.pt"
    check_all_ok(run_ranks(["tests/workers/seam_worker.py", str(out), str(ulysses), str(ring)], ulysses * ring,
                           timeout=300))
    return ulysses * ring, torch.load(out, weights_only=False)


@pytest.mark.parametrize("mask", ["none", "shared", "per-sample"])
def test_sharded_attention_through_the_seam_equals_the_whole_attention(seen, mask):
    ranks, seen = seen
    got = torch.cat(seen[mask]["parts"], dim=2)
    assert [part.shape[2] for part in seen[mask]["parts"]] == list(LENGTHS[:ranks])
    assert (got - seen[mask]["whole"]).abs().max().item() <= 1e-5


def test_keys_hidden_from_every_query_are_left_out_and_the_others_kept(seen):
    ranks, seen = seen
    queries, keys, kept, masked = seen["shared"]["lengths"]
    assert keys == list(LENGTHS[:ranks]) and queries == keys
    # keys 3–5 (the first shard's) and the last shard's last 4 are hidden from both batch elements
    assert kept[0] == LENGTHS[0] - 3 and kept[-1] == LENGTHS[ranks - 1] - 4 and kept[1:-1] == keys[1:-1]
    assert not any(masked)  # nothing left to mask: no key bias folded in
    per_sample = seen["per-sample"]["lengths"]
    assert per_sample[2] == kept and per_sample[3][1] == 1  # keys 10–11 (the second shard's) hidden from one sample
