"""Count failed Kafka deliveries through Faust's sensor interface."""

from __future__ import annotations

from typing import Any

from faust.sensors import Sensor

from . import metrics


class ProducerErrorSensor(Sensor):
    """Increment profilestream_kafka_producer_errors_total for each record Faust's producer failed to deliver.

    Faust calls `on_send_error` when the delivery future of a send fails, for every topic
    including table changelogs. NOTE: an exception that `producer.send` raises before it
    returns a future (for example a record above max.request.size) skips the sensors and
    reaches the caller instead, so this counter misses it. Faust logs each failure itself.
    """

    def on_send_error(self, producer: Any, exc: BaseException, state: Any) -> None:
        metrics.PRODUCER_ERRORS.inc()
