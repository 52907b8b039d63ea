"""The ingest stage resends a user's latest regeneration request when a replay shows duplicates."""

from prometheus_client import REGISTRY

from tests.test_ingest_erasure import make_stage, post


def resent_total() -> float:
    return REGISTRY.get_sample_value("profilestream_regenerations_resent_total") or 0.0


async def test_duplicate_batch_resends_latest_request():
    stage, table, emitter = make_stage()
    await stage.handle_batch([post(1, 1), post(2, 2), post(3, 3)])
    [(user_id, original)] = emitter.regenerations
    before = resent_total()

    # A crash after the state's changelog write: the same batch is read again.
    outcomes = await stage.handle_batch([post(1, 1), post(2, 2), post(3, 3)])

    assert outcomes == ["duplicate"] * 3
    assert len(emitter.regenerations) == 2
    resent_user, resent = emitter.regenerations[1]
    assert resent_user == user_id
    assert resent["version"] == original["version"]
    assert resent["reasons"] == original["reasons"]
    assert resent["replayed"] is True
    assert resent_total() == before + 1


async def test_user_without_profile_gets_no_resend():
    stage, table, emitter = make_stage()
    await stage.handle_batch([post(1, 1)])
    await stage.handle_batch([post(1, 1)])
    assert emitter.regenerations == []


async def test_new_events_send_no_resend():
    stage, table, emitter = make_stage()
    await stage.handle_batch([post(1, 1), post(2, 2)])
    count = len(emitter.regenerations)
    await stage.handle_batch([post(3, 3)])
    assert all(not request.get("replayed") for _, request in emitter.regenerations[count:])
