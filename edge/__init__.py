"""Stratoscope edge collector: loads BPF programs, drains their maps into batches."""
