"""Create and check the Kafka topics profilestream reads and writes."""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from handlers.errors import ConfigError

from .kafka_security import aiokafka_security_kwargs
from .settings import Settings

logger = logging.getLogger(__name__)


def co_partitioned_topics(settings: Settings) -> list[str]:
    """Topics whose keys decide where user state lives: they need equal partition counts."""
    return [*settings.input_topics, settings.topic_audience]


def required_topics(settings: Settings) -> dict[str, dict[str, str]]:
    """Map every topic the worker needs to its topic configs."""
    compacted = {"cleanup.policy": "compact"}
    topics = {name: {} for name in co_partitioned_topics(settings)}
    topics[settings.topic_post_index] = {}
    topics[settings.topic_regenerate] = {}
    topics[settings.topic_dead_letter] = {}
    topics[settings.topic_profiles] = compacted
    return topics


async def ensure_topics(settings: Settings) -> list[str]:
    """Create the missing topics and check the partition counts of the existing ones.

    Returns the names of the topics it created. Raises ConfigError when co-partitioned
    topics disagree, because user state would then be split across workers.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers, client_id=f"{settings.app_id}-admin",
                                **aiokafka_security_kwargs(settings))
    await admin.start()
    try:
        required = required_topics(settings)
        existing = {entry["topic"]: len(entry["partitions"]) for entry in await admin.describe_topics(list(required)) if entry["error_code"] == 0}
        missing = [name for name in required if name not in existing]
        if missing:
            await admin.create_topics([
                NewTopic(name, settings.partitions, settings.replication_factor, topic_configs=required[name])
                for name in missing
            ])
            logger.info("topics.created names=%s partitions=%s", ",".join(missing), settings.partitions)
        for name in co_partitioned_topics(settings):
            count = existing.get(name, settings.partitions)
            if count != settings.partitions:
                raise ConfigError(
                    f"topic {name!r} has {count} partitions but PROFILESTREAM_PARTITIONS is {settings.partitions};"
                    " every input topic needs the same partition count, so set PROFILESTREAM_PARTITIONS"
                    f" to {count} or recreate the topic"
                )
        return missing
    finally:
        await admin.close()
