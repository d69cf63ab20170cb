"""Stratoscope regional aggregator: ingest from edges, merge, downsample, forward."""
