"""The one place that converts between protobuf messages and engine types."""
from __future__ import annotations

from baton.v1 import baton_pb2 as pb
from engine.build import ModelInfo
from engine.inputs import GenerateInput, MessageInput, ResponseFormatInput, ToolCallInput, ToolInput
from engine.request import FinishReason, PreemptAction, RequestOutput, RequestState
from engine.tools import ToolCall

_STATE = {
    RequestState.QUEUED: pb.QUEUED, RequestState.RUNNING: pb.RUNNING,
    RequestState.PREEMPTED: pb.PREEMPTED, RequestState.SUSPENDED: pb.SUSPENDED,
    RequestState.FINISHED: pb.FINISHED,
}
_REASON = {
    FinishReason.LENGTH: pb.LENGTH, FinishReason.EOS: pb.EOS, FinishReason.STOP_SEQUENCE: pb.STOP_SEQUENCE,
    FinishReason.CANCELLED: pb.CANCELLED, FinishReason.ERROR: pb.ERROR,
}
_ACTION = {
    pb.PreemptRequest.ACTION_UNSPECIFIED: PreemptAction.PRIORITY_ONLY,
    pb.PreemptRequest.SUSPEND: PreemptAction.SUSPEND,
    pb.PreemptRequest.RESUME: PreemptAction.RESUME,
    pb.PreemptRequest.CANCEL: PreemptAction.CANCEL,
}


def generate_input(req: pb.GenerateRequest, owner: str = "") -> GenerateInput:
    p = req.params
    kind = p.response_format.WhichOneof("format") if p.HasField("response_format") else None
    return GenerateInput(
        request_id=req.request_id, prompt=req.prompt,
        messages=tuple((m.role, m.content) for m in req.messages),
        priority=req.priority, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
        top_p=p.top_p, top_k=p.top_k, repetition_penalty=p.repetition_penalty,
        seed=p.seed if p.HasField("seed") else None, stop=tuple(p.stop), ignore_eos=p.ignore_eos,
        owner=owner, min_new_tokens=p.min_new_tokens, stop_token_ids=tuple(p.stop_token_ids),
        presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty, min_p=p.min_p,
        logprobs=p.logprobs, top_logprobs=p.top_logprobs, truncate_prompt_tokens=p.truncate_prompt_tokens,
        include_stop_sequence=p.include_stop_sequence, n=p.n,
        response_format=None if kind is None else ResponseFormatInput(
            kind, _format_value(p.response_format, kind)),
        logit_bias=tuple(p.logit_bias.items()),
        tools=tuple(ToolInput(t.name, t.description, t.parameters_json_schema) for t in req.tools),
        tool_choice=req.tool_choice,
        message_extras=tuple(MessageInput(i, m.name, m.tool_call_id,
                                          tuple(ToolCallInput(c.id, c.name, c.arguments_json) for c in m.tool_calls))
                             for i, m in enumerate(req.messages) if m.name or m.tool_call_id or m.tool_calls))


def _format_value(fmt: pb.ResponseFormat, kind: str) -> str:
    if kind == "json_object":   # a bool: true is the only meaningful value
        return "" if fmt.json_object else "false"
    return getattr(fmt, kind)


def state_to_pb(state: RequestState) -> int:
    return _STATE[state]


def preempt_action(action: int) -> PreemptAction | None:
    return _ACTION.get(action)


def response(out: RequestOutput, request_id: str) -> pb.GenerateResponse:
    """`request_id`: the id the caller knows (out.request_id is the engine's key)."""
    msg = pb.GenerateResponse(request_id=request_id, text=out.text, token_ids=out.token_ids, index=out.index)
    if out.logprobs:
        msg.logprobs.extend(pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                                            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
                            for lp in out.logprobs)
    if out.state is not None:
        msg.state = _STATE[out.state]
        if out.state == RequestState.QUEUED:
            msg.queue_position = out.queue_position
    if out.finish_reason is not None:
        msg.finish_reason = _REASON[out.finish_reason]
        msg.usage.prompt_tokens = out.prompt_tokens
        msg.usage.completion_tokens = out.completion_tokens
        msg.usage.truncated_prompt_tokens = out.truncated_prompt_tokens
        msg.usage.cached_prompt_tokens = out.cached_prompt_tokens
        msg.usage.cached_prompt_tokens_host = out.cached_prompt_tokens_host
        msg.stop_sequence = out.stop_sequence
        if out.stats is not None:
            s = out.stats
            msg.stats.CopyFrom(pb.RequestStats(
                queued_seconds=s.queued_seconds, parked_seconds=s.parked_seconds,
                num_preemptions=s.num_preemptions, bytes_offloaded=s.bytes_offloaded,
                bytes_restored=s.bytes_restored, time_to_first_token_seconds=s.time_to_first_token_seconds))
    return msg


def add_tool_calls(msg: pb.GenerateResponse, calls: list[ToolCall]) -> None:
    """The last message of a completion that made tool calls: them, and finish reason TOOL_CALLS."""
    msg.tool_calls.extend(pb.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments_json) for c in calls)
    msg.finish_reason = pb.TOOL_CALLS


def merge(outs: list[RequestOutput]) -> RequestOutput:
    """Coalesce a backlog of plain token events (no state change) of one completion into one message."""
    if len(outs) == 1:
        return outs[0]
    last = outs[-1]
    return RequestOutput(
        request_id=last.request_id, text="".join(o.text for o in outs),
        token_ids=tuple(t for o in outs for t in o.token_ids), state=last.state,
        logprobs=tuple(lp for o in outs for lp in o.logprobs), stop_sequence=last.stop_sequence,
        truncated_prompt_tokens=last.truncated_prompt_tokens, cached_prompt_tokens=last.cached_prompt_tokens,
        cached_prompt_tokens_host=last.cached_prompt_tokens_host,
        queue_position=last.queue_position, finish_reason=last.finish_reason, error=last.error, retryable=last.retryable, out_of_memory=last.out_of_memory,
        prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens, stats=last.stats,
        index=last.index, stream_open=last.stream_open)


def model_info(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        model_name=info.model_name, max_context_length=info.max_context_length,
        eos_token_ids=info.eos_token_ids, max_new_tokens_limit=info.max_new_tokens_limit,
        default_max_new_tokens=info.default_max_new_tokens, max_batch_size=info.max_batch_size,
        device=info.device, dtype=info.dtype, vocab_size=info.vocab_size,
        has_chat_template=info.has_chat_template)
