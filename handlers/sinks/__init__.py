"""Sinks that store generated profiles: `topic.TopicSink` (compacted Kafka topic) and `postgres.PostgresSink`.

Each sink has `write(profiles) -> int` and `erase(user_id)`. The submodules are not imported
here, so using one sink does not import the client library of the other.
"""
