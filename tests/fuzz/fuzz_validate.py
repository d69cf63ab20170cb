#!/usr/bin/env python3
"""Coverage-guided fuzzing of the regional's batch decoder and validator (atheris, libFuzzer).

Each input is the wire bytes of a Batch, taken as the ingest process takes them (parse,
then ``Gate.admit``: open the sealed body, decode, validate) and checked by
``tests.fuzz.batches.check_wire``, with the same properties and independent oracle as
the hypothesis test (tests/unit/test_fuzz_batches.py). Python code under ``stratoscope``
and ``tests.fuzz`` is instrumented, so an input that takes a new branch of the validator
(or of the oracle's rules) is kept and mutated further. Half of the mutations are
libFuzzer's own byte mutations; the other half open the batch, spoil one or two fields,
re-encode it and sometimes seal it (``mutate_wire``), which reaches rules that random
bytes almost never do.

    .venv/bin/python tests/fuzz/fuzz_validate.py -atheris_runs=200000
    .venv/bin/python tests/fuzz/fuzz_validate.py -max_total_time=3600 -rss_limit_mb=2048 corpus/
    .venv/bin/python tests/fuzz/fuzz_validate.py --limits default -max_len=20000000 corpus/
    .venv/bin/python tests/fuzz/fuzz_validate.py crash-<sha1>       # replay one input

Without a corpus directory, one of valid batches is written to a temporary directory; an
empty directory given is filled with it. ``--limits tight`` (the default) fuzzes under
small Limits that inputs of a few KiB can reach; ``--limits default`` under the
production ones. A property that fails, or any other exception, is a crash: libFuzzer
prints the traceback, writes the input to ``crash-<sha1>`` (see ``-artifact_prefix``)
and exits non-zero. ``-timeout`` (seconds per input) and ``-rss_limit_mb`` turn a hang or
unbounded memory into a failure as well.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["stratoscope", "tests.fuzz"]):
    from stratoscope.regional.validate import Limits
    from tests.fuzz.batches import TIGHT, check_wire, mutate_wire, seed_batches

LIMITS: Limits = TIGHT


def test_one_input(data: bytes) -> None:
    check_wire(data, LIMITS)


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    """Deterministic for a seed (libFuzzer's ``-seed`` makes a run repeatable)."""
    rnd = random.Random(seed)
    if rnd.random() < 0.5:
        return atheris.Mutate(data, max_size)
    out = mutate_wire(data, rnd, LIMITS)
    return out if len(out) <= max_size else atheris.Mutate(data, max_size)


def write_seeds(corpus: Path) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    for i, wire in enumerate(seed_batches(LIMITS)):
        (corpus / f"seed-{i:02d}").write_bytes(wire)


def main(argv: list[str]) -> None:
    global LIMITS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--limits", choices=("tight", "default"), default="tight")
    ours, rest = parser.parse_known_args(argv[1:])
    LIMITS = TIGHT if ours.limits == "tight" else Limits()
    inputs = [a for a in rest if not a.startswith("-")]
    if not inputs:
        corpus = Path(tempfile.mkdtemp(prefix="stratoscope-fuzz-"))
        write_seeds(corpus)
        rest.append(str(corpus))
    elif Path(inputs[0]).is_dir() and not any(Path(inputs[0]).iterdir()):
        write_seeds(Path(inputs[0]))
    atheris.Setup([argv[0], *rest], test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
