"""Switch qualifying layers of a network to a drop-in subclass, in place (parameters and keys unchanged)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["switch_layers"]


def switch_layers(modules: tuple[nn.Module, ...], new_class: Callable[[nn.Module], type[nn.Module] | None],
                  setup: Callable[[nn.Module], None] | None = None) -> list[str]:
    """Give every layer for which ``new_class(layer)`` names a class that class, then ``setup(layer)``.

    Returns:
        The qualified names of the switched layers: the module's index in ``modules``, then the
        layer's name inside it (``"0.encoder.levels.0.conv1.conv"``).
    """
    switched = []
    for index, module in enumerate(modules):
        for name, layer in module.named_modules():
            cls = new_class(layer)
            if cls is not None:
                layer.__class__ = cls
                if setup is not None:
                    setup(layer)
                switched.append(f"{index}.{name}")
    return switched
