"""Grows and shrinks the executor fleet by queue depth: a pure policy and backends."""
