"""The bytes one rank receives in one denoising step, by the run report's labels, written from DESIGN.md's formulas
on the sites a traced call passed (`trace.Trace`). These are the counts `comm.stats` makes in a real run
(tests/test_cost_model.py compares them with run reports); the cost model turns them into time.

Each `Message` is one collective's payload for this rank (bytes received) with how many calls carry it, and the
group it runs in (whose ranks may sit on other nodes).
"""
from __future__ import annotations

from dataclasses import dataclass

from paragen.parallel.partition import conv_halo, partial_rows
from paragen.pipelines.cost.trace import Trace

STATS_BYTES = 4  # statistics (GroupNorm sums, an LM's partial attention and log-sum-exp) travel in float32


@dataclass(frozen=True)
class Message:
    """`calls` exchange sites of group `group` for label `label`, together bringing this rank `bytes`; `overlap`
    says what the transfer can hide behind (`none`: the rank waits for it; `step`: a stale exchange, behind the rest
    of the step; `attention`: a Ring pass, behind the attention on the block in hand). A site is one layer's
    exchange: a collective when fresh (a stale step's sites share one flat buffer, but each still has its
    bookkeeping on the rank's path); the link's latency is charged per site."""

    label: str
    bytes: int
    calls: int
    group: str
    overlap: str = "none"


@dataclass(frozen=True)
class Split:
    """How a layout cuts one denoiser call: its degrees, the exchange mode and this rank's place."""

    cfg: int = 1
    patch: int = 1
    ulysses: int = 1
    ring: int = 1
    clip: int = 1
    mode: str = "sync"  # sync | displaced | partial
    fraction: float = 0.3  # partial: rows of each neighbour attention sees
    rank: int = 0  # this rank's band (patch) — the first and last bands have one neighbour
    seen: float = 0.0  # clips: the share of the video's frames a clip sees outside itself (halo and global frames)
    aspect: float = 1.0  # the latent's rows over its columns (each UNet level keeps it)

    @property
    def shards(self) -> int:
        """Token shards of one clip (patch × ring × ulysses)."""
        return self.patch * self.ring * self.ulysses


def _band_neighbours(split: Split) -> tuple[bool, bool]:
    return split.rank > 0, split.rank < split.patch - 1


def patch_messages(trace: Trace, split: Split, stale: bool, prefix: str = "unet.",
                   local: tuple[str, ...] = ()) -> list[Message]:
    """A UNet's patch exchanges in one step, `trace` being the call on this rank's CFG batch: conv halos (fresh:
    P2P rows from each neighbour; stale: every other band's edge rows; none for the convs named in `local`, whose
    input every rank holds whole), GroupNorm statistics (every band's sums), and each self-attention's inputs
    (every other band's; partial: a fraction of each neighbour's rows). Fresh exchanges block; a stale step's data
    travel behind the next step's compute (in one flat all-gather), but each site still costs its bookkeeping."""
    n = split.patch
    if n == 1:
        return []
    above, below = _band_neighbours(split)
    halo = 0
    convs = [site for site in trace.convs if site.name not in local]
    for site in convs:
        batch, channels, _, width = site.shape
        top, bottom = conv_halo(site.kernel, site.stride, site.padding, site.dilation)
        rows = (n - 1) * (top + bottom) if stale else top * above + bottom * below
        halo += rows * width * channels * batch * site.element
    norms = sum((n - 1) * site.batch * site.groups * 2 * STATS_BYTES for site in trace.norms)
    attention = 0
    for site in (s for s in trace.attentions if s.self_attention):
        channels = site.heads * site.dim
        if split.mode == "partial" and stale:
            columns = max(1, round((site.queries / split.aspect) ** 0.5))
            rows = site.queries // columns
            attention += (above + below) * partial_rows(rows // n, split.fraction) * columns * channels * site.batch \
                * site.element
        else:
            attention += (n - 1) * (site.queries // n) * channels * site.batch * site.element
    overlap = "step" if stale else "none"  # a stale step's data travel behind the next step's compute
    attentions = sum(s.self_attention for s in trace.attentions)
    halo_calls = len(convs) * (1 if stale else above + below)  # fresh: one message from each neighbour
    return [Message(prefix + "conv_halo", halo, halo_calls, "patch", overlap),
            Message(prefix + "norm_stats", norms, len(trace.norms), "patch", overlap),
            Message(prefix + "attn_kv", attention, attentions, "patch", overlap)]


def sequence_messages(trace: Trace, split: Split, stale: bool, prefix: str = "dit.") -> list[Message]:
    """A transformer's token-shard exchanges in one step, `trace` being the call on this rank's CFG batch: Ulysses'
    two all-to-alls per self-attention (Q/K/V to head shards, the output back), Ring's K/V passes, in displaced
    mode every other shard's K/V of the previous step, and between clips the K/V of the frames a clip sees outside
    itself (its heads only), behind its attention within the clip. (The clip exchange is the layout's mean, not
    checked against run reports.)"""
    u, r, shards = split.ulysses, split.ring, split.shards
    if shards * split.clip == 1:
        return []
    qkv = out = ring = kv = seen = 0
    sites = [s for s in trace.attentions if s.self_attention]
    for s in sites:
        local = s.queries // (shards * split.clip)
        head_share = s.heads // u
        seen += int(split.seen * s.queries) * 2 * s.batch * head_share * s.dim * s.element
        if stale:
            kv += (shards - 1) * 2 * s.batch * s.heads * local * s.dim * s.element
            continue
        if u > 1:
            qkv += (u - 1) * local * 3 * s.batch * head_share * s.dim * s.element
            out += (u - 1) * local * s.batch * head_share * s.dim * s.element
        if r > 1:
            ring += (r - 1) * 2 * s.batch * head_share * (local * u) * s.dim * s.element
    messages = [Message(prefix + "clip_kv", seen, len(sites), "branch", "attention")] if split.clip > 1 else []
    if shards == 1:
        return messages
    if stale:
        return messages + [Message(prefix + "stale_kv", kv, len(sites), "sequence", "step")]
    if u > 1:
        messages += [Message(prefix + "ulysses_qkv", qkv, len(sites), "ulysses"),
                     Message(prefix + "ulysses_out", out, len(sites), "ulysses")]
    if r > 1:
        messages.append(Message(prefix + "ring_kv", ring, len(sites) * (r - 1), "ring", "attention"))
    return messages


def output_messages(call_bytes: int, split: Split, world: int, prefix: str, gather: str) -> list[Message]:
    """The step's noise prediction gathered on every rank (`call_bytes`: what this rank's denoiser calls return
    whole). `gather`: `world` (every rank's band all-gathered over every rank: the UNet runtime), or `sequence`
    (the token shards gathered, then the CFG branches: the transformer runtimes)."""
    if gather == "world":
        return [Message(prefix + "output", (world - 1) * call_bytes // split.patch, 1, "world")] if world > 1 else []
    shards = split.shards * split.clip
    messages = [Message(prefix + "output", (shards - 1) * call_bytes // shards, 1, "branch")] if shards > 1 else []
    return messages + ([Message(prefix + "cfg", (split.cfg - 1) * call_bytes, 1, "cfg")] if split.cfg > 1 else [])


def request_exchanges(steps: int, warmup: int, after_warmup: bool) -> tuple[int, int]:
    """(Steps exchanging fresh, steps publishing stale data) of a displaced or partial request: the `warmup` first
    steps exchange fresh; then every step but the last publishes for the next. A UNet's bands start publishing
    after the warm-up (`after_warmup`); a transformer's token shards already in the last warm-up step."""
    fresh = min(warmup, steps)
    return fresh, max(0, steps - 1 - warmup) if after_warmup else max(0, steps - warmup)
