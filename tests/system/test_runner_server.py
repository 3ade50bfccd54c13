"""The runner as a process: model facts, greedy steps over KV blocks in the arena that the
memory server handed out, and validation of every block, position and token a step names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llmos.config import servers_toml
from llmos.libllm import protocol as P
from llmos.libllm.protocol import runner as R
from llmos.libllm.tokenizer import load_tokenizer
from llmos.microkernel.endpoint import Channel, Endpoint
from llmos.microkernel.errors import InvalidRequest
from llmos.microkernel.messages import MsgType
from llmos.servers.runner.loaders import default_model_path
from tests.system.cli import running_instance

pytestmark = pytest.mark.slow
EXPECTED_ZOO = "Zoo was a little girl named Lily. She loved to play outside in the park."

CONFIG = """
rings = "8M"
[memory]
pages = "4M"
segments = "1M"
""" + servers_toml(1, scheduler=False)


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_instance(tmp_path_factory, CONFIG, "run") as name:
        yield name


def step(runner: Channel, step_id: int, *chunks: R.StepChunk) -> list[list[int]]:
    result: R.StepResult = P.unpack(runner.call(MsgType.RUNNER_STEP, P.pack(R.Step(step_id, list(chunks)))).payload,
                                    R.StepResult)
    assert result.step_id == step_id
    return result.token_ids


def test_model_info_names_the_built_in_model(instance: str) -> None:
    with Endpoint.connect(instance) as ep:
        info: P.ModelInfo = P.unpack(ep.open_channel("runner.0").call(MsgType.RUNNER_MODEL_INFO).payload, P.ModelInfo)
    assert Path(info.model_path) == default_model_path()
    assert info.model_sha256 == "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696"
    assert (info.context_length, info.vocab_size, info.stop_ids, info.block_tokens) == (512, 512, [1, 2], 16)


def test_greedy_steps_through_the_runner_give_the_expected_text(instance: str) -> None:
    with Endpoint.connect(instance) as ep:
        memory, runner = ep.open_channel("memory"), ep.open_channel("runner.0")
        info: P.ModelInfo = P.unpack(runner.call(MsgType.RUNNER_MODEL_INFO).payload, P.ModelInfo)
        blocks = P.unpack(memory.call(MsgType.MEM_ALLOC_BLOCKS, P.pack(P.AllocBlocks(4))).payload,
                          P.BlockIds).block_ids
        tokenizer = load_tokenizer(info.tokenizer_path)
        prompt = tokenizer.encode("Zoo")
        # The prompt in two chunks, then one token per step.
        assert step(runner, 0, R.StepChunk(1, blocks, 0, prompt[:1], wants_token=False)) == [[]]
        out, position, pending = [], 1, prompt[1:]
        while len(out) < 40:
            ((token,),) = step(runner, len(out) + 1, R.StepChunk(1, blocks, position, pending))
            position += len(pending)
            out.append(token)
            pending = [token]
        assert tokenizer.decode(prompt + out).startswith(EXPECTED_ZOO)
        # The same text again, eight tokens per step (multi-step decoding).
        first = step(runner, 100, R.StepChunk(1, blocks, 0, prompt))[0]
        made = list(first)
        while len(made) < 40:
            made += step(runner, 101, R.StepChunk(1, blocks, len(prompt) + len(made) - 1, [made[-1]],
                                                  num_steps=8))[0]
        assert made[:40] == out
        memory.call(MsgType.MEM_FREE_BLOCKS, P.pack(P.BlockIds(blocks)))


@pytest.mark.parametrize("chunk", [
    R.StepChunk(1, [0], 0, []),                      # no token
    R.StepChunk(1, [0], 0, [600]),                   # outside the vocabulary
    R.StepChunk(1, [10**6], 0, [5]),                 # a block that does not exist
    R.StepChunk(1, [0], 16, [5]),                    # the table is too short for the position
    R.StepChunk(1, [0] * 40, 510, [5, 5, 5]),        # past the context
    R.StepChunk(1, [0], 0, [5], temperature=-1.0),   # bad sampling
    R.StepChunk(1, [0], 0, [5], num_steps=40),       # more steps than the table covers
    R.StepChunk(1, [0], 0, [5], wants_token=False, num_steps=2),
])
def test_a_bad_step_is_refused_and_the_runner_stays_up(instance: str, chunk: R.StepChunk) -> None:
    with Endpoint.connect(instance) as ep:
        runner = ep.open_channel("runner.0")
        with pytest.raises(InvalidRequest):
            step(runner, 7, chunk)
        assert runner.call(MsgType.RUNNER_FENCE).header.status == 0
