"""docs/config.md stays what the config classes say, and a Config written as TOML (what
`llmos tune` writes, the reference's defaults) reads back as the same Config."""

from __future__ import annotations

import re
from dataclasses import fields

import tomllib
from hypothesis import given
from hypothesis import strategies as st

from llmos.config import (
    Config,
    GatewaySettings,
    ModelSettings,
    SchedulerSettings,
    config_from_dict,
    standard_servers,
)
from llmos.config_reference import DOC_PATH, SECTIONS, render
from llmos.config_toml import config_toml


def test_the_reference_in_docs_is_the_one_the_code_generates() -> None:
    assert DOC_PATH.read_text() == render(), "docs/config.md is stale: run `python -m llmos.config_reference`"


def test_every_key_of_every_section_is_explained() -> None:
    text = render()
    for _heading, cls in SECTIONS:
        for f in fields(cls):
            if f.name in ("model", "memory", "scheduler", "gateway", "servers"):
                continue
            line = re.search(rf"^- \*\*`{f.name}`\*\* \(.*?\): (.*)$", text, re.M)
            assert line and len(line.group(1)) > 10, f"{cls.__name__}.{f.name} has no comment in tools/config.py"


def test_the_reference_file_of_defaults_reads_as_the_default_config() -> None:
    block = render().split("```toml\n", 1)[1].split("```", 1)[0]
    assert config_from_dict(tomllib.loads(block)) == Config()


names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)


@given(path=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20),
       runners=st.integers(0, 64), kv=st.sampled_from(["f32", "f16"]),
       weights=st.dictionaries(names, st.floats(0.01, 1e6), max_size=3),
       keys=st.dictionaries(names, names, max_size=3), batch=st.integers(1, 4096), cache=st.booleans(),
       servers=st.sampled_from([(), standard_servers(2)]))
def test_a_config_written_as_toml_reads_back_the_same(path: str, runners: int, kv: str, weights: dict[str, float],
                                                      keys: dict[str, str], batch: int, cache: bool,
                                                      servers: tuple) -> None:
    config = Config(model=ModelSettings(path=path, runners=runners, kv_dtype=kv),
                    scheduler=SchedulerSettings(weights=weights, max_batch_size=batch, prefix_cache=cache),
                    gateway=GatewaySettings(api_keys=keys), servers=servers)
    for changed_only in (False, True):
        assert config_from_dict(tomllib.loads(config_toml(config, changed_only=changed_only))) == config
