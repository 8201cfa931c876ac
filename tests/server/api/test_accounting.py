"""The per-choice accounting both APIs use (`server/api/accounting.py`)."""
from longserve.server.api import accounting as A
from longserve.server.api.openai import responses as R
from longserve.server.engine.protocol import CompletionDelta, FinishReason, RequestFinished, RequestTimings


def delta(tokens, *, count, reason=None, stop=None):
    return CompletionDelta("r", 0, "x", tuple(tokens), (), reason, stop, 10, count)


def test_counts_and_endings_are_the_same_for_both_apis():
    http, grpc = R.Choice(0), A.ChoiceTally()
    for d in (delta([5, 6], count=2), delta([], count=2), delta([7], count=4, reason=FinishReason.STOP, stop="\n")):
        http.add(d)
        grpc.add(d)
    assert (http.num_tokens, http.finish_reason, http.stop_reason) == (4, FinishReason.STOP, "\n")
    assert (grpc.num_tokens, grpc.finish_reason, grpc.stop_reason) == (4, FinishReason.STOP, "\n")


def test_unfinished_choices_end_as_abort():
    done, running = A.ChoiceTally(finish_reason=FinishReason.LENGTH), A.ChoiceTally()
    assert A.close_unfinished([done, running]) == [running]
    assert running.finish_reason is FinishReason.ABORT and done.finish_reason is FinishReason.LENGTH


def test_cached_prompt_tokens_and_usage():
    fin = RequestFinished("r", 100, 3, (FinishReason.STOP,), RequestTimings(0.0, prefill_chunk_tokens=(4,)))
    assert A.cached_prompt_tokens(fin) == 96 and A.cached_prompt_tokens(None) == 0
    use = A.usage(100, [A.ChoiceTally(num_tokens=3), A.ChoiceTally(num_tokens=2)], 96)
    assert (use.prompt_tokens, use.completion_tokens, use.total_tokens, use.cached_tokens) == (100, 5, 105, 96)
    assert R.usage(use) == {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105,
                            "prompt_tokens_details": {"cached_tokens": 96}}
