"""Lossless hierarchical speculative decoding (TriForce) over the sequence-sharded cache.

Levels, from the bottom:
- optionally a small draft model over a StreamingLLM cache (`StreamingCache`) drafts `draft_gamma` tokens,
  checked by the next level in one forward (the rejection test, so that level's tokens follow its own
  distribution);
- the target model over the retrieval cache (`build_retrieval`: sink, recent window and the top chunks over
  the whole context, on the drafting rank) drafts `gamma` tokens, one forward per token (or, with the draft
  model, one per check), with no communication;
- the target over the full sharded cache verifies them in one forward of `gamma + 1` tokens (attention merged
  across ranks by log-sum-exp: one exchange per layer); the drafting rank decides how many are kept and the
  next token (its random numbers: the other ranks never draw) and broadcasts the decision; every cache drops
  the rejected tokens, and the retrieval cache takes the kept tokens' exact keys and values from the
  verification forward.
A round costs two small broadcasts (the drafted tokens, the decision) besides the verification's merge.
Batch size 1.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from paragen.kernels.speculative import draw, sampling_probs, verify_greedy, verify_sampled
from paragen.parallel.interrupt import Watch, check_interrupt, interrupt_of
from paragen.parallel.llm.cache import AttendingCache, ShardedKVCache
from paragen.parallel.llm.config import SpeculativeConfig
from paragen.parallel.llm.local_cache import LocalCache, StreamingCache
from paragen.parallel.llm.retrieval import DRAFTING_RANK, build_retrieval

TOKENS_LABEL = "llm_spec_tokens"
DECISION_LABEL = "llm_spec_decision"
QUERY_LABEL = "llm_retrieval_query"

# (token ids [1, L], their positions [L], cache) -> the logits after each of them, [L, V] fp32
Forward = Callable[[torch.Tensor, torch.Tensor, AttendingCache], torch.Tensor]


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: greedy, or drawn at `temperature` from the top-`top_p` mass, seeded by `seed`."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature <= 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"temperature must be > 0 and top-p in (0, 1]; got {self.temperature} and {self.top_p}")

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distributions `[N, V]` tokens are drawn from."""
        return sampling_probs(logits, self.temperature, self.top_p)

    def choose(self, logits: torch.Tensor, generator: torch.Generator) -> tuple[int, torch.Tensor | None]:
        """The next token after `logits [V]`, and (sampling) the distribution it was drawn from."""
        if not self.do_sample:
            return int(logits.argmax()), None
        probs = self.probs(logits[None])[0].cpu()
        return draw(probs, generator), probs

    def verify(self, logits: torch.Tensor, draft: torch.Tensor | None, drafted: list[int],
               generator: torch.Generator) -> tuple[int, int]:
        """`(kept, next)` for `drafted` tokens against the checking level's `logits [γ+1, V]` (`draft`: their
        distributions `[γ, V]` at the drafting level, when sampling)."""
        tokens = torch.tensor(drafted, dtype=torch.long)
        if not self.do_sample:
            return verify_greedy(logits, tokens.to(logits.device))
        return verify_sampled(self.probs(logits).cpu(), draft, tokens, generator)


@dataclass
class SpeculativeStats:
    """Counts and times of one request (rank-local times)."""

    verifications: int = 0
    drafted: int = 0
    accepted: int = 0
    refreshes: int = 0
    draft_checks: int = 0  # the draft model's tokens checked by the retrieval level ...
    draft_drafted: int = 0
    draft_accepted: int = 0  # ... and kept there
    draft_s: float = 0.0
    verify_s: float = 0.0
    refresh_s: float = 0.0
    verify_bytes: int = 0  # this rank's bytes sent + received in verification rounds ...
    refresh_bytes: int = 0  # ... and in building the retrieval cache
    gammas: list[int] = field(default_factory=list)  # tokens drafted, per verification ...
    kept: list[int] = field(default_factory=list)  # ... and kept
    round_s: list[float] = field(default_factory=list)  # each round's wall time: draft, verify, refresh after it

    def token_seconds(self) -> list[float]:
        """Seconds per decoded token: each round's wall time shared equally by the tokens it yielded (kept + 1)."""
        return [t / (kept + 1) for t, kept in zip(self.round_s, self.kept) for _ in range(kept + 1)]

    def report(self) -> dict:
        """The run report's fields: TriForce's acceptance rate (accepted / drafted) and mean accepted tokens per
        verification, beside the raw counts."""
        rounds = max(1, self.verifications)
        return {
            "drafted": self.drafted, "accepted": self.accepted, "verifications": self.verifications,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
            "mean_accepted_per_verification": self.accepted / rounds,
            "tokens_per_verification": (self.accepted + self.verifications) / rounds,
            "refreshes": self.refreshes, "bytes_per_verification": self.verify_bytes / rounds,
            "refresh_bytes": self.refresh_bytes,
            "draft_model": {"checks": self.draft_checks, "drafted": self.draft_drafted,
                            "accepted": self.draft_accepted,
                            "acceptance_rate": self.draft_accepted / self.draft_drafted if self.draft_drafted else None},
            "draft_s": self.draft_s, "verify_s": self.verify_s, "refresh_s": self.refresh_s,
        }


def _positions(start: int, count: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + count, device=device)


class Drafter:
    """The drafting rank's levels: the target over the retrieval cache, and optionally a draft model over a
    StreamingLLM cache below it."""

    def __init__(self, target: Forward, retrieval: LocalCache, spec: SpeculativeConfig, sampling: Sampling,
                 generator: torch.Generator, stats: SpeculativeStats, device: torch.device,
                 draft: tuple[Forward, StreamingCache] | None = None) -> None:
        self.target, self.retrieval, self.spec, self.sampling = target, retrieval, spec, sampling
        self.generator, self.stats, self.device, self.draft = generator, stats, device, draft

    def _run(self, forward: Forward, cache: AttendingCache, lead: list[int], position: int, count: int):
        """Feed `lead` (one block, the first at `position`), then draft `count` tokens one forward each; returns
        the tokens and (sampling) their distributions. The fed tokens stay in `cache` as scratch."""
        tokens, rows = [], []
        block = lead
        for _ in range(count):
            ids = torch.tensor([block], device=self.device)
            logits = forward(ids, _positions(position, len(block), self.device), cache)[-1]
            position += len(block)
            token, probs = self.sampling.choose(logits, self.generator)
            tokens.append(token)
            rows.append(probs)
            block = [token]
        return tokens, (torch.stack(rows) if self.sampling.do_sample and rows else None)

    def propose(self, pending: int, position: int, count: int) -> tuple[list[int], torch.Tensor | None]:
        """`count` drafted tokens after `pending` (at `position`, in no cache yet), and (sampling) the retrieval
        level's distribution at each; every cache is left as committed."""
        if self.draft is None:
            tokens, rows = self._run(self.target, self.retrieval, [pending], position, count)
            self.retrieval.rewind()
            return tokens, rows
        forward, streaming = self.draft
        tokens, rows = [], []
        lead, token = [pending], pending
        while len(tokens) < count:
            gamma = min(self.spec.draft_gamma, count - len(tokens))
            marks = self.retrieval.length, streaming.length
            small, small_rows = self._run(forward, streaming, lead, position - len(lead) + 1, gamma)
            fed = [token, *small]
            logits = self.target(torch.tensor([fed], device=self.device), _positions(position, len(fed), self.device),
                                 self.retrieval)
            kept, after = self.sampling.verify(logits, small_rows, small, self.generator)
            self.stats.draft_checks += 1
            self.stats.draft_drafted += gamma
            self.stats.draft_accepted += kept
            self.retrieval.truncate(marks[0] + kept + 1)
            streaming.truncate(marks[1] + len(lead) - 1 + min(kept + 1, gamma))
            tokens += [*small[:kept], after]
            if self.sampling.do_sample:
                rows.append(self.sampling.probs(logits[: kept + 1]).cpu())
            lead = [small[-1], after] if kept == gamma else [after]
            token, position = after, position + kept + 1
        self.retrieval.rewind()
        streaming.rewind()
        return tokens[:count], (torch.cat(rows)[:count] if rows else None)

    def commit(self, tokens: list[int], position: int, block: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The verified `tokens` (the first at `position`) join every cache: the retrieval cache takes their exact
        keys and values `block` from the verification, the draft model reads them into its own."""
        self.retrieval.extend(block)
        if self.draft is not None:
            forward, streaming = self.draft
            forward(torch.tensor([tokens], device=self.device), _positions(position, len(tokens), self.device), streaming)
            streaming.commit(streaming.length)


def prefill_streaming(forward: Forward, cache: StreamingCache, prompt: torch.Tensor) -> None:
    """Read the prompt `[L]` into a draft model's StreamingLLM cache: its first `sink` and last tokens, `window`
    in all, at their positions."""
    length = prompt.shape[0]
    recent = cache.window - cache.sink
    positions = torch.cat([torch.arange(min(cache.sink, length)), torch.arange(max(cache.sink, length - recent), length)])
    positions = positions.to(prompt.device)
    forward(prompt[positions][None], positions, cache)
    cache.commit(cache.length)


class _Refresh:
    """When to rebuild the retrieval cache: every `refresh_every` verifications, or when the acceptance since
    the last build (over at least `gamma` verifications) falls below `refresh_below`."""

    def __init__(self, spec: SpeculativeConfig) -> None:
        self.spec = spec
        self.rounds = self.drafted = self.accepted = 0

    def after(self, drafted: int, accepted: int) -> bool:
        self.rounds, self.drafted, self.accepted = self.rounds + 1, self.drafted + drafted, self.accepted + accepted
        spec = self.spec
        due = spec.refresh_every and self.rounds >= spec.refresh_every
        low = (spec.refresh_below and self.rounds >= spec.gamma and self.drafted
               and self.accepted / self.drafted < spec.refresh_below)
        if due or low:
            self.rounds = self.drafted = self.accepted = 0
            return True
        return False


def _moved(cache: ShardedKVCache) -> int:
    total = cache.comm.stats.snapshot()["total"]
    return int(total["bytes_sent"] + total["bytes_recv"])


def _decide(cache: ShardedKVCache, values: list[int]) -> list[int]:
    """The drafting rank's `values` on every rank."""
    buf = torch.tensor(values, dtype=torch.long)
    return cache.comm.broadcast_async(buf, DRAFTING_RANK, DECISION_LABEL).wait().tolist()


def _stream(watch: Watch | None, out: list[int], sent: int, most: int) -> int:
    """Hand the tokens of `out` after the first `sent` (up to `most`) to the watch's `on_tokens`; how many are sent."""
    if watch is not None and watch.on_tokens is not None and sent < min(len(out), most):
        watch.on_tokens(out[sent:most])
    return min(len(out), most)


def speculative_generate(
    forward: Forward, cache: ShardedKVCache, first_logits: torch.Tensor, spec: SpeculativeConfig, sampling: Sampling,
    max_new_tokens: int, draft: tuple[Forward, StreamingCache] | None = None, watch: Watch | None = None,
) -> tuple[list[int], SpeculativeStats, LocalCache | None]:
    """The new tokens after a prompt whose prefill filled `cache` (`first_logits [V]`: the same on every rank),
    the statistics and the retrieval cache (drafting rank; None elsewhere). Every rank calls it with the same arguments; `draft` (the third level, already holding
    the prompt: `prefill_streaming`) is used on the drafting rank only. `watch`: its interrupt is asked before every
    round of drafting and verification (RequestCancelled on every rank when it says stop); its `on_tokens` gets the
    first token, then each round's accepted tokens."""
    comm, stats, device = cache.comm, SpeculativeStats(), first_logits.device
    drafting = comm.rank == DRAFTING_RANK
    generator = torch.Generator().manual_seed(sampling.seed)  # token choices are drawn on the host
    first = sampling.choose(first_logits, generator)[0] if drafting else 0
    out = _decide(cache, [first])
    sent = _stream(watch, out, 0, max_new_tokens)

    began, moved = time.perf_counter(), _moved(cache)
    last = torch.stack(cache.queries)  # [layers, B, Hq, 1, D]: the prompt's last token's on the last rank
    last = comm.broadcast_async(last.contiguous(), comm.size - 1, QUERY_LABEL).wait()
    retrieval = build_retrieval(cache, list(last), spec)
    stats.refresh_s, stats.refresh_bytes = time.perf_counter() - began, _moved(cache) - moved
    drafter = Drafter(forward, retrieval, spec, sampling, generator, stats, device, draft) if drafting else None
    refresh = _Refresh(spec)
    while len(out) < max_new_tokens:
        check_interrupt(interrupt_of(watch), "after %d new tokens", len(out))
        gamma = min(spec.gamma, max_new_tokens - len(out) - 1)
        start, pending = cache.total, out[-1]
        began = round_began = time.perf_counter()
        moved = _moved(cache)
        drafted, rows = drafter.propose(pending, start, gamma) if drafting else ([0] * gamma, None)
        stats.draft_s += time.perf_counter() - began
        began = time.perf_counter()
        if gamma:
            buf = torch.tensor(drafted, dtype=torch.long)
            drafted = comm.broadcast_async(buf, DRAFTING_RANK, TOKENS_LABEL).wait().tolist()
        fed = [pending, *drafted]
        cache.begin_decode(len(fed))
        logits = forward(torch.tensor([fed], device=device), _positions(start, len(fed), device), cache)
        cache.end_forward()
        decision = list(sampling.verify(logits, rows, drafted, generator)) if drafting else [0, 0]
        kept, after = _decide(cache, decision)
        cache.rollback(gamma - kept)
        if drafting:
            drafter.commit(fed[: kept + 1], start, [(k[:, :, : kept + 1], v[:, :, : kept + 1]) for k, v in cache.block])
        stats.verify_s += time.perf_counter() - began
        stats.verify_bytes += _moved(cache) - moved
        stats.verifications += 1
        stats.drafted += gamma
        stats.accepted += kept
        stats.gammas.append(gamma)
        stats.kept.append(kept)
        out += [*drafted[:kept], after]
        sent = _stream(watch, out, sent, max_new_tokens)
        if len(out) < max_new_tokens and refresh.after(gamma, kept):
            began, moved = time.perf_counter(), _moved(cache)
            retrieval = build_retrieval(cache, [q[:, :, kept: kept + 1] for q in cache.queries], spec)
            if drafting:
                drafter.retrieval = retrieval
            stats.refreshes += 1
            stats.refresh_s += time.perf_counter() - began
            stats.refresh_bytes += _moved(cache) - moved
        stats.round_s.append(time.perf_counter() - round_began)
    return out[:max_new_tokens], stats, retrieval
