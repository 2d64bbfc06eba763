"""run_batched: one engine call per distinct key, results back per request in order, errors stay local."""

from __future__ import annotations

from ofa_serving.batching import RequestError, run_batched


class Engine:
    def __init__(self, fail_on=None):
        self.calls = []
        self.fail_on = fail_on

    def __call__(self, key, payloads):
        self.calls.append((key, list(payloads)))
        if key == self.fail_on:
            raise RuntimeError(f"boom on {key}")
        return [f"{key}:{p}" for p in payloads]


def test_one_call_per_key_and_results_in_request_then_row_order():
    engine = Engine()
    requests = [[("a", 1)], [("b", 2), ("a", 3)], [("a", 4)]]
    assert run_batched(requests, engine) == [["a:1"], ["b:2", "a:3"], ["a:4"]]
    assert engine.calls == [("a", [1, 3, 4]), ("b", [2])]


def test_a_bad_request_keeps_its_error_and_is_not_sent():
    engine = Engine()
    bad = RequestError("beam_size must be between 1 and 16, got 0")
    results = run_batched([[("a", 1)], bad, [("a", 2)]], engine)
    assert results[0] == ["a:1"] and results[1] is bad and results[2] == ["a:2"]
    assert engine.calls == [("a", [1, 2])]


def test_a_failing_batch_fails_only_its_requests():
    engine = Engine(fail_on="b")
    results = run_batched([[("a", 1)], [("b", 2)], [("a", 3), ("b", 4)], [("a", 5)]], engine)
    assert results[0] == ["a:1"] and results[3] == ["a:5"]
    assert isinstance(results[1], RuntimeError) and isinstance(results[2], RuntimeError)


def test_wrong_result_count_is_an_error_not_a_misalignment():
    results = run_batched([[("a", 1)], [("a", 2)]], lambda key, payloads: ["only one"])
    assert all(isinstance(r, RuntimeError) for r in results)
    assert "1 results for a batch of 2" in str(results[0])


def test_empty_inputs():
    assert run_batched([], Engine()) == []
    assert run_batched([[]], Engine()) == [[]]


def test_engine_exceptions_are_returned_per_request_not_raised():
    def explode(key, payloads):
        raise MemoryError("out of memory")

    (result,) = run_batched([[("a", 1)]], explode)
    assert isinstance(result, MemoryError)
