"""Fixtures for the runner tests: the shipped default model and tokenizer, loaded once."""

from __future__ import annotations

import pytest

from llmos.libllm.tokenizer import Tokenizer, load_tokenizer
from llmos.servers.runner.loaders import default_tokenizer_path
from llmos.servers.runner.model import Model


@pytest.fixture(scope="session")
def model() -> Model:
    return Model.load()  # the shipped copy in servers/runner/models


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return load_tokenizer(default_tokenizer_path())
