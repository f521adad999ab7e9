"""The one request object, its ordered state enum, and the events the engine emits.

Only the scheduler changes `Request.state`; everyone else reads it. States are ordered so that
"finished" is `state >= FINISHED`, as in vLLM v1. `RequestOutput` and `RequestStats` are msgspec
structs (array-like): they cross the engine process's pipe once per step in bulk, and a struct
encodes ~10x faster than a dataclass (engine/loop.py).
"""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Optional

import msgspec


class RequestState(enum.IntEnum):
    QUEUED = 1      # waiting for its first admission (needs a prefill)
    RUNNING = 2     # a row of the decode batch
    PREEMPTED = 3   # parked in host memory by the scheduler; wants to run
    SUSPENDED = 4   # parked in host memory by a Preempt(SUSPEND) call; waits for RESUME
    FINISHED = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestState.FINISHED


class FinishReason(enum.IntEnum):
    LENGTH = 1
    EOS = 2
    STOP_SEQUENCE = 3
    CANCELLED = 4
    ERROR = 5


class PreemptAction(enum.IntEnum):
    PRIORITY_ONLY = 0   # change the priority only
    SUSPEND = 1
    RESUME = 2
    CANCEL = 3


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int               # already resolved against the server default
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 0.0                # 0 or 1 = off
    top_k: int = 0                    # 0 = off
    repetition_penalty: float = 0.0   # 0 or 1 = off
    seed: int | None = None           # None: a random seed is drawn at admission
    stop: tuple[str, ...] = ()        # stop sequences, matched on text
    ignore_eos: bool = False
    min_new_tokens: int = 0           # EOS and stop_token_ids are masked out before this many
    stop_token_ids: tuple[int, ...] = ()   # end the completion (finish reason EOS), even with ignore_eos
    presence_penalty: float = 0.0     # OpenAI: minus this once for every id already generated
    frequency_penalty: float = 0.0    # OpenAI: minus this times the count of every generated id
    min_p: float = 0.0                # 0 = off
    logit_bias: tuple[tuple[int, float], ...] = ()   # (id, bias) added to the raw logits
    logprobs: bool = False            # report the chosen tokens' log-probabilities
    top_logprobs: int = 0             # and this many alternatives (0..20)
    include_stop_sequence: bool = False
    response_format: tuple[str, str] | None = None   # (kind, value): the output follows this grammar (engine/grammar.py)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalty(self) -> bool:
        return self.repetition_penalty not in (0.0, 1.0)

    @property
    def has_count_penalty(self) -> bool:
        """A presence or frequency penalty (over the generated tokens)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


_arrival_counter = itertools.count()


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    # Ties on priority are broken by this strictly increasing number (FIFO).
    arrival_seq: int = field(default_factory=lambda: next(_arrival_counter))
    owner: str = ""                   # who may Preempt it (empty: anyone)
    # n completions (params.n): the request is prefilled once as one request of width n (n rows of
    # the batch, n times the K/V); then the scheduler forks it into n completion rows (`fork`),
    # each a Request of width 1 with `group` = this request's id and its own `index`.
    n: int = 1
    index: int = 0                    # a completion row: which completion (0..n-1)
    group: str = ""                   # a completion row: the id of the request it belongs to
    truncated_prompt_tokens: int = 0  # prompt tokens cut by truncate_prompt_tokens
    cached_prompt_tokens: int = 0     # prompt tokens whose K/V came from the prefix cache
    cached_prompt_tokens_host: int = 0   # of those, from its host tier
    state: RequestState = RequestState.QUEUED
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    # Chunked prefill: prompt tokens whose K/V are computed (set by the scheduler when it plans a
    # chunk; the K/V wait beside the batch until the whole prompt is done, then are embedded).
    prefilled: int = 0
    # Accounting (seconds are monotonic-clock differences).
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    parked_since: float | None = None
    parked_seconds: float = 0.0
    num_preemptions: int = 0
    bytes_offloaded: int = 0
    bytes_restored: int = 0

    @property
    def num_tokens(self) -> int:
        """Tokens whose K/V the request owns: prompt plus generated, minus the last sampled one
        (that one is the next decode input and has no K/V yet)."""
        return len(self.prompt_ids) + max(len(self.output_ids) - 1, 0)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def stream_id(self) -> str:
        """The id its events go out under: the request's own (a completion row: its group's)."""
        return self.group or self.request_id


ROW_SEPARATOR = "\x1e"   # between a request's id and a completion's index: never part of a request id (printable only)


def completion_row_id(request_id: str, index: int) -> str:
    return f"{request_id}{ROW_SEPARATOR}{index}"


def completion_seed(seed: int | None, index: int) -> int | None:
    """The seed of completion `index` of a request with `seed`: seed + index (mod 2**64), so that
    completion i equals a separate request with that seed. No seed: none (the shared generator)."""
    return None if seed is None else (seed + index) % (1 << 64)


class RequestStats(msgspec.Struct, frozen=True, array_like=True):
    queued_seconds: float
    parked_seconds: float
    num_preemptions: int
    bytes_offloaded: int
    bytes_restored: int
    time_to_first_token_seconds: float


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """Log-probability of one generated token under the model's raw distribution, and the `top`
    most likely (id, logprob) pairs, most likely first."""
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class RequestOutput(msgspec.Struct, frozen=True, array_like=True):
    """One event on a request's stream."""
    request_id: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    state: Optional[RequestState] = None    # set on state changes
    queue_position: int = 0                 # with state QUEUED
    finish_reason: Optional[FinishReason] = None
    error: Optional[str] = None             # with finish_reason ERROR
    retryable: bool = False                 # with ERROR: the engine went away (UNAVAILABLE), not this request's fault
    out_of_memory: bool = False             # with ERROR: the device ran out of memory (RESOURCE_EXHAUSTED)
    prompt_tokens: int = 0                  # on the last event
    completion_tokens: int = 0              # on the last event
    stats: Optional[RequestStats] = None    # on the last event
    logprobs: tuple[TokenLogprob, ...] = () # with params.logprobs: one per entry of token_ids
    stop_sequence: str = ""                 # on the last event, when a stop sequence matched
    truncated_prompt_tokens: int = 0        # on the last event
    cached_prompt_tokens: int = 0           # on the last event: prompt tokens from the prefix cache
    cached_prompt_tokens_host: int = 0      # on the last event: of those, from its host tier
    index: int = 0                          # which of the request's n completions this event belongs to
    stream_open: bool = False               # with finish_reason: other completions are still running

    @property
    def finished(self) -> bool:
        """The request's stream ends here (its last completion ended)."""
        return self.finish_reason is not None and not self.stream_open

    @property
    def completion_finished(self) -> bool:
        """This event's completion ended (the stream may go on with other completions)."""
        return self.finish_reason is not None


def stats_of(request: Request, now: float) -> RequestStats:
    start = request.first_scheduled_time or now
    ttft = (request.first_token_time - request.arrival_time) if request.first_token_time else 0.0
    parked = request.parked_seconds + ((now - request.parked_since) if request.parked_since else 0.0)
    return RequestStats(
        queued_seconds=start - request.arrival_time,
        parked_seconds=parked,
        num_preemptions=request.num_preemptions,
        bytes_offloaded=request.bytes_offloaded,
        bytes_restored=request.bytes_restored,
        time_to_first_token_seconds=ttft,
    )
