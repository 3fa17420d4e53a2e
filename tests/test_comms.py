"""comms/ on real gloo ranks (2 and 4): values arrive where they should, and bytes are counted."""
import pytest
import torch

from tests.multiproc import check_all_ok, run_ranks


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def observed(request, tmp_path_factory):
    n = request.param
    out = tmp_path_factory.mktemp(f"comms{n}") / "seen.pt"
    check_all_ok(run_ranks(["tests/workers/comms_worker.py", str(out)], n, timeout=300))
    return n, torch.load(out, weights_only=False)


def _x(r: int) -> torch.Tensor:
    return torch.arange(6, dtype=torch.float32).view(2, 3) + 10 * r


def test_all_gather_and_all_reduce(observed):
    n, seen = observed
    expected = torch.stack([_x(r) for r in range(n)])
    for r in range(n):
        assert torch.equal(seen[r]["all_gather"], expected)
        assert torch.allclose(seen[r]["all_reduce"], expected.sum(0))


def test_all_to_all_routes_uneven_pieces(observed):
    n, seen = observed
    for r in range(n):
        expected = torch.cat([torch.full((src + r + 1,), 100.0 * src + r) for src in range(n)])
        assert torch.equal(seen[r]["all_to_all"], expected)
        element = 4
        assert seen[r]["stats"]["a2a"]["bytes_sent"] == element * sum(r + j + 1 for j in range(n) if j != r)
        assert seen[r]["stats"]["a2a"]["bytes_recv"] == element * sum(s + r + 1 for s in range(n) if s != r)


def test_ring_shift_passes_to_the_next_rank(observed):
    n, seen = observed
    for r in range(n):
        prev = (r - 1) % n
        assert torch.equal(seen[r]["ring"], torch.full((prev + 1, 2), float(prev)))


def test_share_sends_to_every_other_rank(observed):
    n, seen = observed
    for r in range(n):
        got = seen[r]["share"]
        assert got[r] is None
        for src in range(n):
            if src != r:
                assert torch.equal(got[src], torch.full((src + 1,), float(src)))
        assert seen[r]["stats"]["share"]["bytes_sent"] == (n - 1) * (r + 1) * 4


def test_all_gather_of_uneven_shards(observed):
    n, seen = observed
    expected = torch.cat([torch.full((2, k + 1), float(k)) for k in range(n)], dim=1)
    for r in range(n):
        assert torch.equal(seen[r]["varlen"], expected)


def test_neighbour_exchange(observed):
    n, seen = observed
    for r in range(n):
        from_prev, from_next = seen[r]["neighbours"]
        if r == 0:
            assert from_prev is None
        else:  # the rank above sent its last two rows
            assert from_prev.shape == (1, 1, 2, 3) and torch.all(from_prev == r - 1)
        if r == n - 1:
            assert from_next is None
        else:  # the rank below sent its first row
            assert from_next.shape == (1, 1, 1, 3) and torch.all(from_next == r + 1)


def test_flat_gather_serves_each_step(observed):
    n, seen = observed
    for r in range(n):
        for step, tensors in enumerate(seen[r]["flat"]):
            for k, got in enumerate(tensors):
                expected = torch.stack([torch.full((k + 1, 4), 1000.0 * step + 10 * src + k) for src in range(n)])
                assert torch.equal(got, expected), (r, step, k)


def test_flat_gather_refuses_unread_reuse(observed):
    _, seen = observed
    assert "never read" in seen[0]["reuse_error"]


def test_broadcast(observed):
    n, seen = observed
    assert all(seen[r]["broadcast"] == 1234 for r in range(n))


def test_bytes_accounting(observed):
    n, seen = observed
    for r in range(n):
        stats = seen[r]["stats"]
        x_bytes = 6 * 4
        assert stats["g"]["bytes_recv"] == (n - 1) * x_bytes and stats["g"]["calls"] == 1
        prev = (r - 1) % n
        assert (stats["ring"]["bytes_sent"], stats["ring"]["bytes_recv"]) == ((r + 1) * 2 * 4, (prev + 1) * 2 * 4)
        # neighbours: 1 row (3 floats) comes from below, 2 rows from above
        halo_in = (3 * 4 if r < n - 1 else 0) + (6 * 4 if r > 0 else 0)
        assert stats["halo"]["bytes_recv"] == halo_in
        # flat: 3 steps of 5 tensors of (k+1)x4 floats, each gathered from n-1 others
        assert stats["flat_data"]["bytes_recv"] == 3 * sum((k + 1) * 4 * 4 for k in range(5)) * (n - 1)
        assert stats["flat"]["calls"] > 3  # the 64-byte buckets split every step into several launches
