"""The one registry of key- and event-field decoders, filled by a decorator.

A description names a decoder per field (``decoder: cgroup``); spec validation
refuses names that are not registered here, and decoding looks the same name up
here, so the two can never disagree. A decoder declares the labels it adds
beyond the field's own (the cgroup decoder adds ``container``), and everything
that lays out labels (label keys, unbounded labels, error fallbacks) reads that
declaration instead of knowing about particular decoders. Modelled on
ebpf_exporter's ``decoder.Set``: a name -> decoder map, unknown names an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stratoscope.edge.decoders.context import DecodeContext
    from stratoscope.edge.spec import FieldSpec

#: raw field value, its description, the context -> one value per label
#: (the field's own label first, then the decoder's ``extra_labels`` in order).
DecodeFn = Callable[[Any, "FieldSpec", "DecodeContext"], tuple[str, ...]]

#: The value every label of a field gets when its decoder fails on one value.
ERROR_VALUE = "[error]"


@dataclass(frozen=True)
class Decoder:
    """A registered decoder: how to turn a raw field into label values."""

    name: str
    #: None for structural decoders (bucket, stack ids): the map kind consumes
    #: the field itself and it yields no label.
    fn: DecodeFn | None
    extra_labels: tuple[str, ...] = ()

    @property
    def structural(self) -> bool:
        return self.fn is None

    def labels(self, label_name: str) -> tuple[str, ...]:
        """Label names a field decoded by this decoder produces, in order."""
        return () if self.fn is None else (label_name, *self.extra_labels)

    def failed(self) -> tuple[str, ...]:
        """Label values for a field whose raw value could not be decoded."""
        return (ERROR_VALUE,) + ("",) * len(self.extra_labels)


_REGISTRY: dict[str, Decoder] = {}


def decoder(
    name: str, *, extra_labels: tuple[str, ...] = ()
) -> Callable[[DecodeFn], DecodeFn]:
    """Register ``fn`` as decoder ``name`` (a decorator); a name is registered once."""

    def register(fn: DecodeFn) -> DecodeFn:
        _add(Decoder(name, fn, extra_labels))
        return fn

    return register


def structural(name: str) -> None:
    """Register a decoder name whose field the map kind consumes (no label)."""
    _add(Decoder(name, None))


def _add(d: Decoder) -> None:
    if d.name in _REGISTRY:
        raise ValueError(f"decoder {d.name!r} registered twice")
    _REGISTRY[d.name] = d


def get_decoder(name: str) -> Decoder:
    """The decoder registered as ``name``; KeyError names the known ones."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown decoder {name!r} (known: {', '.join(sorted(_REGISTRY))})"
        ) from None


def decoder_names() -> frozenset[str]:
    """Every registered decoder name."""
    _load_builtins()
    return frozenset(_REGISTRY)


_builtins_loaded = False


def _load_builtins() -> None:
    # The built-in decoders register themselves on import; importing them here (not at
    # module top) keeps this module free of the decoders' own dependencies.
    global _builtins_loaded
    if not _builtins_loaded:
        import stratoscope.edge.decoders.builtin  # noqa: F401

        _builtins_loaded = True
