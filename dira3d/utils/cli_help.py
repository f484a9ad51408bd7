"""The help format of every ``dira3d`` command: each option's help ends with its default."""

from __future__ import annotations

import argparse
import copy

__all__ = ["DefaultsHelpFormatter", "DefaultsRawDescriptionHelpFormatter"]


def _shown_default(action: argparse.Action) -> str | None:
    """The default as the help shows it (``64 64 32`` for a sequence); None when there is none to show:
    positionals, required options, flags, ``None``, empty sequences and help texts that name their default."""
    default = action.default
    if (not action.option_strings or action.required or default is None or default is False or default is argparse.SUPPRESS
            or (isinstance(default, (tuple, list)) and not default) or "default" in (action.help or "").lower()):
        return None
    return " ".join(str(v) for v in default) if isinstance(default, (tuple, list)) else str(default)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``argparse.ArgumentDefaultsHelpFormatter`` without its noise, and for options without a help text too."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, shown = action.help or "", _shown_default(action)
        return text if shown is None else f"{text} (default: {shown.replace('%', '%%')})".lstrip()

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _shown_default(action) is not None:  # argparse prints no help line at all without a help text
            action = copy.copy(action)
            action.help = " "
            action.help = self._get_help_string(action).strip()
        return super()._format_action(action)


class DefaultsRawDescriptionHelpFormatter(DefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """:class:`DefaultsHelpFormatter` that keeps the description's and epilog's own line breaks."""
