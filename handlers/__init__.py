"""Domain logic of profilestream: event decoding, per-user state, significance, profiles.

Modules directly in this package are pure: they import neither Kafka, Faust nor asyncpg, so
they can be tested and benchmarked alone. Generation and sinks live in subpackages.
"""
