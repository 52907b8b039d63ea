"""The compiled event validators agree with the jsonschema reference implementation."""

import pytest
from hypothesis import given, settings, strategies as st

import schemas
from schemas.compiled import compile_schema

VALID = {
    "post.v1": {"schema": "post.v1", "event_id": "e1", "user_id": "u1", "post_id": "p1",
                "created_at": "2024-06-01T12:00:00Z", "text": "hello", "lang": "en",
                "hashtags": ["a"], "tags": ["b"], "reply_to_post_id": None,
                "reply_to_user_id": "u2", "repost_of_post_id": None},
    "like.v1": {"schema": "like.v1", "event_id": "l1", "user_id": "u1", "post_id": "p1",
                "post_author_id": "u2", "created_at": "2024-06-01T12:00:00+02:00", "action": "unlike"},
    "follow.v1": {"schema": "follow.v1", "event_id": "f1", "follower_id": "u1", "followee_id": "u2",
                  "created_at": "2024-06-01 12:00:00.5", "action": "follow"},
    "user_deleted.v1": {"schema": "user_deleted.v1", "event_id": "d1", "user_id": "u1",
                        "deleted_at": "2024-06-01T12:00:00Z"},
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["", "x", "en", "zh-Hans", "post.v1", "like", "unlike", "follow", "unfollow",
                       "2024-06-01T12:00:00Z", "2024-06-01T12:00:00z", "2024-13-01", "x" * 257, "a" * 101]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(["a", "text", "tags"]), children, max_size=2),
    max_leaves=6,
)


@st.composite
def mutated(draw, name: str):
    document = dict(VALID[name])
    fields = sorted(schemas.load(name)["properties"]) + ["unexpected"]
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from(fields))
        if draw(st.booleans()) and field in document:
            del document[field]
        else:
            document[field] = draw(json_values)
    return document


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_examples_accepted(name):
    assert schemas.fast_validator(name)(VALID[name], "") is None
    assert schemas.validator(name).is_valid(VALID[name])


@pytest.mark.parametrize("name", sorted(VALID))
@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_compiled_agrees_with_jsonschema(name, data):
    document = data.draw(mutated(name))
    fast = schemas.fast_validator(name)(document, "") is None
    reference = schemas.validator(name).is_valid(document)
    assert fast == reference, document


def test_unsupported_keyword_rejected():
    with pytest.raises(ValueError, match="not supported"):
        compile_schema({"type": "object", "patternProperties": {}}, lambda ref: {})
