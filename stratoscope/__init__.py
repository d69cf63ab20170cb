"""Stratoscope: fleet-wide eBPF telemetry. Shared contract helpers and the CLI."""

__version__ = "0.1.0"
