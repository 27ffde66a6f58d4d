"""EngineFeed (backends/vllm_engine.py) in isolation: a stand-in engine with vLLM's
add_request / step / abort_request, so routing, sharing the engine between calls, and the
busy-time split are checked exactly. The real engine runs under it in tests/integration/test_vllm.py."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from clsjob.backends.vllm_engine import EngineFeed

STEP_S = 0.01
PARAMS = SimpleNamespace()  # what the feed sets on vLLM's SamplingParams: output_kind


@dataclass
class Output:
    request_id: str
    finished: bool
    text: str


class StandInEngine:
    """Each request finishes after as many steps as its prompt has tokens; a prompt with a
    negative token is refused at add_request. Records which requests shared each step."""

    def __init__(self, fail_step: int | None = None):
        self.left: dict[str, int] = {}
        self.prompt: dict[str, list[int]] = {}
        self.steps: list[set[str]] = []
        self.aborted: list[str] = []
        self.fail_step = fail_step

    def add_request(self, request_id, prompt, params):
        ids = prompt["prompt_token_ids"]
        if min(ids) < 0:
            raise ValueError("token id out of range")
        self.left[request_id], self.prompt[request_id] = len(ids), ids

    def step(self):
        if self.fail_step is not None and len(self.steps) == self.fail_step:
            self.steps.append(set())
            raise RuntimeError("a kernel failed")
        time.sleep(STEP_S)
        self.steps.append(set(self.left))
        out = []
        for rid in list(self.left):
            self.left[rid] -= 1
            if not self.left[rid]:
                del self.left[rid]
                out.append(Output(rid, True, f"sum={sum(self.prompt[rid])}"))
        return out

    def abort_request(self, request_ids):
        self.aborted += request_ids
        for rid in request_ids:
            self.left.pop(rid, None)


def test_outputs_come_back_in_prompt_order_and_a_refused_prompt_in_its_place():
    feed = EngineFeed(StandInEngine())
    results, busy = feed.run([[1, 2, 3], [-1], [4], [5, 5]], params=PARAMS)
    assert [r.text for r in (results[0], results[2], results[3])] == ["sum=6", "sum=4", "sum=10"]
    assert isinstance(results[1], ValueError) and "out of range" in str(results[1])
    assert busy == pytest.approx(3 * STEP_S, rel=0.5)  # the longest prompt took 3 steps
    assert feed.run([], params=PARAMS) == ([], 0.0)


def test_a_second_call_joins_the_engine_before_the_first_is_done():
    engine = StandInEngine()
    feed = EngineFeed(engine)
    long, short = [[1] * 30 for _ in range(4)], [[2] * 3 for _ in range(4)]
    got = {}

    def call(name, prompts):
        got[name] = feed.run(prompts, params=PARAMS)

    first = threading.Thread(target=call, args=("long", long))
    first.start()
    while not engine.steps:  # the first call is running
        time.sleep(0.001)
    call("short", short)
    first.join()
    # The short call's requests shared steps with the long call's: no drain in between.
    shared = [s for s in engine.steps if any(r.startswith("0-") for r in s)
              and any(r.startswith("1-") for r in s)]
    assert len(shared) == 3 and feed.most_at_once == 2
    assert got["short"][0][0].text == "sum=6" and got["long"][0][0].text == "sum=30"
    # Each step's seconds are split by requests in flight: the two calls' busy seconds add
    # up to the engine's time, and the short call got half of the 3 steps it shared.
    assert got["long"][1] + got["short"][1] == pytest.approx(30 * STEP_S, rel=0.3)
    assert got["short"][1] == pytest.approx(1.5 * STEP_S, rel=0.5)


def test_a_failed_step_fails_the_calls_in_flight_and_the_feed_goes_on():
    engine = StandInEngine(fail_step=2)
    feed = EngineFeed(engine)
    with pytest.raises(RuntimeError, match="a kernel failed"):
        feed.run([[1] * 5, [1] * 6], params=PARAMS)
    assert sorted(engine.aborted) == ["0-0", "0-1"] and not engine.left
    results, _ = feed.run([[7, 7]], params=PARAMS)  # Ray Data's retry of the chunk
    assert results[0].text == "sum=14"
