"""Readable terminal output of profiles stored in Postgres."""

from __future__ import annotations

import ssl as ssl_module
import textwrap

import orjson

from handlers.sinks.postgres import PostgresSink

SUMMARY_WIDTH = 100


def format_profile(profile: dict) -> str:
    """Render one profile as a short block of text."""
    activity = profile["activity"]
    social = profile["social"]
    interests = ", ".join(f"{item['topic']} ({item['weight']:.2f})" for item in profile["interests"][:5]) or "-"
    traits = ", ".join(trait["trait"] for trait in profile["traits"]) or "-"
    lines = [
        f"{profile['user_id']}  v{profile['version']}  generator={profile['generator']}"
        f"  reasons={','.join(profile['trigger_reasons']) or '-'}  confidence={profile['confidence']:.2f}",
        f"  interests: {interests}",
        f"  activity:  {activity['posts_total']} posts, {activity['replies_total']} replies,"
        f" {activity['likes_given_total']} likes given, {activity['likes_received_total']} received,"
        f" last seen {activity['last_seen']}",
        f"  social:    {social['followers']} followers, {social['following']} following;  traits: {traits}",
    ]
    summary = textwrap.wrap(profile["summary"], SUMMARY_WIDTH, initial_indent="  summary:   ", subsequent_indent=" " * 13)
    return "\n".join(lines + summary)


async def print_profiles(dsn: str, *, user_id: str | None = None, top: int = 10,
                         ssl: ssl_module.SSLContext | str | None = None) -> None:
    sink = PostgresSink(dsn, pool_max=1, ssl=ssl)
    await sink.start()
    try:
        if user_id is not None:
            current = await sink.fetch_current(user_id)
            history = await sink.fetch_history(user_id)
            print(orjson.dumps({"current": current, "history": history}, option=orjson.OPT_INDENT_2).decode())
            return
        for profile in await sink.fetch_top(top):
            print(format_profile(profile))
            print()
    finally:
        await sink.close()
