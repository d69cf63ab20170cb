"""Sinks deliver merged blocks to central storage (ClickHouse) and streams (Kafka)."""
