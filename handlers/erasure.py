"""User erasure: a `user_deleted` event replaces the user's state with a small marker.

Rules (documented in the README):
- the marker keeps only the deletion's event id and its time (`deleted_at`, event time in
  epoch seconds). It stays in the state table after the state is gone, so a replay of the
  user's old events cannot bring the user back;
- a record of the user stamped at or before `deleted_at` is dropped with outcome
  `user_erased`, whether the user caused it or another user did (a like received, a follow);
- an event the user caused (post, like, follow) stamped after `deleted_at` re-creates the
  user from an empty state, because they acted again. Records that other users caused never
  re-create an erased user;
- a re-created user is a new user: the first profile needs the usual number of events, and
  versions start again at 1 after the tombstone on the profile topic;
- a `user_deleted` with the event id of the marker, or one stamped at or before the marker's
  `deleted_at`, changes nothing (outcome `duplicate`);
- the deletion may arrive after events of the user stamped later than `deleted_at`. The state
  is still wiped, because aggregated counts and weights cannot be split by time. The user
  stays present with an empty state, and those later events count again when replayed,
  because their ids left the dedup set with the rest of the state.
So in any arrival order the user ends absent exactly when no event of the user is stamped
after `deleted_at`.
"""

from __future__ import annotations

from typing import Any

from . import state as user_state
from .state import APPLIED, DUPLICATE, ApplyResult

MARKER_FIELD = "erased"
# Event time of the latest event the user caused, so a late deletion can tell whether the
# user acted after it.
LAST_OWN_EVENT_FIELD = "last_own_event_at"
ERASE_ACTION = "erase"
# Field of a regeneration request: the `deleted_at` of the erasure the user was re-created
# after, so the generate stage can tell requests older than a later erasure.
ERASED_AT_FIELD = "erased_at"

DROPPED = ApplyResult("user_erased")


def marker_of(value: dict | None) -> dict | None:
    """Return the erasure marker of a state-table value, or None if the user was never erased."""
    return None if value is None else value.get(MARKER_FIELD)


def is_live(value: dict | None) -> bool:
    """Return whether `value` is a user's state, as opposed to None or a bare erasure marker."""
    return value is not None and "totals" in value


def state_for_record(value: dict | None, user_id: str, at: float, *, own_event: bool) -> dict | None:
    """Return the state a record stamped `at` applies to, or None when the erasure drops it.

    `value` is the user's state-table value. The result is a new empty state when the user
    has none yet, or when an own event re-creates an erased user.
    """
    marker = marker_of(value)
    if marker is not None and at <= marker["deleted_at"]:
        return None
    if value is None:
        return user_state.new_state(user_id)
    if is_live(value):
        return value
    if not own_event:
        return None
    return _recreate(user_id, marker)


def note_own_event(state: dict, at: float) -> None:
    """Record the time of an applied event the user caused."""
    latest = state.get(LAST_OWN_EVENT_FIELD)
    if latest is None or at > latest:
        state[LAST_OWN_EVENT_FIELD] = at


def erase(value: dict | None, user_id: str, event_id: str, deleted_at: float) -> tuple[dict, ApplyResult]:
    """Apply a deletion to the user's state-table value and return the new value and the outcome."""
    marker = marker_of(value)
    if marker is not None and (marker["event_id"] == event_id or deleted_at <= marker["deleted_at"]):
        return value, DUPLICATE
    new_marker = {"deleted_at": deleted_at, "event_id": event_id}
    # NOTE: states written before LAST_OWN_EVENT_FIELD existed lack it, so a late deletion
    # leaves such a user absent until the next own event after deleted_at.
    latest_own = value.get(LAST_OWN_EVENT_FIELD) if is_live(value) else None
    if latest_own is not None and latest_own > deleted_at:
        return _recreate(user_id, new_marker), APPLIED
    return {"user_id": user_id, MARKER_FIELD: new_marker}, APPLIED


def erase_request(user_id: str, marker: dict) -> dict:
    """Build the generate stage's request to erase the user's stored profiles."""
    return {"action": ERASE_ACTION, "user_id": user_id, "event_id": marker["event_id"], "deleted_at": marker["deleted_at"]}


def is_erase_request(request: dict) -> bool:
    return request.get("action") == ERASE_ACTION


def tag_request(request: dict, state: dict) -> None:
    """Stamp a regeneration request with the erasure its user was re-created after, if any."""
    marker = marker_of(state)
    if marker is not None:
        request[ERASED_AT_FIELD] = marker["deleted_at"]


def predates_erasure(request: dict, erasure: dict) -> bool:
    """Return whether a regeneration request was built before the erasure request `erasure`."""
    erased_at = request.get(ERASED_AT_FIELD)
    return erased_at is None or erased_at < erasure["deleted_at"]


def _recreate(user_id: str, marker: dict) -> dict[str, Any]:
    state = user_state.new_state(user_id)
    state[MARKER_FIELD] = marker
    return state
