"""Every request argument is checked before anything is sent: a bad one is InvalidRequest
naming the parameter, never another exception; a good one always travels (the Submit it
makes encodes). Pure: no instance."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmos.libllm import protocol as P
from llmos.libllm.options import (
    Options,
    RequestArgs,
    check_options,
    options_of,
    seeds_of,
    submit_of,
)
from llmos.microkernel.errors import InvalidRequest

FIELDS = [f.name for f in dataclasses.fields(Options)]

# What a caller might pass anywhere: the right types at and past their edges, and the wrong ones.
anything = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(), st.sampled_from(["\ud800", "hot", "", "x"]),
    st.lists(st.text(max_size=3), max_size=3), st.lists(st.integers(), max_size=2), st.binary(max_size=3),
)


@given(field=st.sampled_from(FIELDS), value=anything)
def test_any_value_is_accepted_and_travels_or_refused_by_name(field: str, value: object) -> None:
    options = dataclasses.replace(Options(), **{field: value})
    try:
        check_options(options)
    except InvalidRequest as exc:
        assert str(exc).startswith(field.split("[")[0]) or field in str(exc), (field, value, exc)
        return
    submit = submit_of(options, [1, 2], 7 if options.seed is None else options.seed, False)  # as libllm sends it
    assert P.unpack(P.pack(submit), P.Submit) == submit


@pytest.mark.parametrize(("field", "value", "words"), [
    ("max_tokens", 10**30, r"max_tokens must be an int in \[1, 2147483647\], got 1000000000000000000000000000000"),
    ("max_tokens", True, "max_tokens must be an int"),
    ("max_tokens", 0, "max_tokens"),
    ("top_k", 10**30, "top_k must be an int in"),
    ("priority", 10**30, r"priority must be an int in \[-1000, 1000\]"),
    ("priority", 1001, "priority"),
    ("temperature", "hot", r"temperature must be a finite number in \[0, 100\], got 'hot' \(str\)"),
    ("temperature", None, "temperature must be a finite number"),
    ("temperature", math.nan, "temperature"),
    ("top_p", 0, r"top_p must be a finite number in \(0, 1\]"),
    ("seed", 2**64, r"seed must be None or an int in \[0, 2\*\*64\)"),
    ("seed", 1.5, "seed"),
    ("stop", "x", "stop must be None or a list"),
    ("stop", ["ok", "\udc80"], r"stop\[1\] is not valid Unicode"),
    ("timeout", 0, r"timeout must be a finite number in \(0, "),
    ("timeout", "1", "timeout"),
    ("timeout", math.inf, "timeout"),
    ("tenant", 7, "tenant must be a str"),
    ("tenant", "t" * 1000, "at most 256"),
    ("logprobs", 21, r"logprobs must be None or an int in \[0, 20\]"),
    ("prompt_logprobs", "yes", "prompt_logprobs must be a bool"),
    ("presence_penalty", "a lot", "presence_penalty must be a finite number"),
    ("repetition_penalty", 0.0, r"repetition_penalty must be in \(0, 10\]"),
    ("frequency_penalty", 10**400, "frequency_penalty"),
])
def test_each_bad_argument_is_named_with_its_range(field: str, value: object, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        check_options(dataclasses.replace(Options(), **{field: value}))


def test_the_defaults_and_the_edges_are_accepted() -> None:
    check_options(Options())
    check_options(Options(max_tokens=2**31 - 1, temperature=100, top_k=2**31 - 1, top_p=1, seed=2**64 - 1,
                          stop=["\n", "é"], priority=-1000, timeout=1e-9, tenant="alice", logprobs=20,
                          prompt_logprobs=True, presence_penalty=-2, frequency_penalty=2, repetition_penalty=10))


def test_the_keyword_arguments_are_the_options_fields() -> None:
    """One definition of a request's arguments: RequestArgs (the signatures' type) and Options
    (their defaults and checks) name the same fields with the same types."""
    assert RequestArgs.__annotations__.keys() == {f.name for f in dataclasses.fields(Options)}
    for f in dataclasses.fields(Options):
        declared = RequestArgs.__annotations__[f.name]
        assert getattr(declared, "__forward_arg__", declared) == f.type, f.name


def test_an_unknown_argument_is_an_invalid_request_naming_it() -> None:
    with pytest.raises(InvalidRequest, match=r"unknown argument\(s\) max_token; a request takes"):
        options_of({"max_token": 5})
    assert options_of({"max_tokens": 5, "tenant": "t"}) == Options(max_tokens=5, tenant="t")


def test_n_seeds_follow_the_first() -> None:
    assert seeds_of(3, 7) == [7, 8, 9]
    assert len(set(seeds_of(4, None))) == 4
    with pytest.raises(InvalidRequest, match="n must be a positive int"):
        seeds_of(0, 1)
    with pytest.raises(InvalidRequest, match="below 2\\*\\*64"):
        seeds_of(2, 2**64 - 1)
