"""The ``dira3d`` command: a thin dispatcher to one library function per user action.

Each sub-command lives next to the code it drives and exposes ``main(argv: list[str]) -> int``;
this file only maps names to those functions, imported lazily so ``dira3d --help`` is fast.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

__all__ = ["COMMANDS", "STDOUT_CLOSED", "main", "quiet_missing_nvimgcodec"]

STDOUT_CLOSED = 141  # the exit code of a command whose reader went away (``dira3d --help | head``): 128 + SIGPIPE,
# what a shell reports for a program the signal ended, as ``cat`` or ``ls`` piped into ``head``

# name -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("dira3d.data.command:main", "turn a downloaded dataset into normalised volumes + MONAI datalists"),
    "synthetic": ("dira3d.data.synthetic:main", "write chest-CT-like phantoms in the LUNA16 layout"),
    "visual-words": ("dira3d.visual_words.command:main", "TransVW self-discovery: visual-word patches and labels"),
    "pretrain": ("dira3d.engines.command:main", "run the DiRA pretraining bundle"),
    "finetune": ("dira3d.evaluation.finetune:main", "fine-tune a task bundle from a dira3d checkpoint"),
    "experiment": ("dira3d.evaluation.experiment:main", "multi-seed x label-fraction x initialisation grid"),
    "localise": ("dira3d.evaluation.localise:main", "Grad-CAM box localisation accuracy of a ChestX-ray14 classifier"),
    "demo": ("dira3d.demo:main", "the README's end-to-end demo on embedded synthetic data"),
    "export": ("dira3d.deploy.command:main", "TorchScript / ONNX of a bundle, pretrained weights, MONAI Label app"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: dira3d <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `dira3d <command> --help` for the options of one command; `dira3d --version` for the versions."]
    return "\n".join(lines)


def quiet_missing_nvimgcodec() -> None:
    """Leave out MONAI's notices that the optional nvImageCodec package is missing: it logs one every time
    an image reader is built (several times a run) and warns once that its DICOM reader falls back to
    pydicom's decoders, which is what dira3d reads DICOM with anyway. Other warnings are kept."""
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (poll says POLLERR); True where poll is missing."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except AttributeError:  # no select.poll (Windows): the error was the pipe's, as almost always
        return True
    except (OSError, ValueError):  # stdout replaced by something without a file descriptor (tests' capture)
        return False


def main(argv: list[str] | None = None) -> int:
    """Run one command; its output piped into a reader that stops early (``| head``) ends it quietly with
    :data:`STDOUT_CLOSED`, not a ``BrokenPipeError`` traceback (Python docs, "Note on SIGPIPE")."""
    try:
        try:
            return _main(argv)
        finally:  # what the command printed, flushed here where the error can be caught, not at interpreter exit
            sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_closed():  # another pipe (a worker's): a real error
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush then writes nowhere
        return STDOUT_CLOSED


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_missing_nvimgcodec()
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:  # what a bug report needs: ours and the two packages the results depend on
        from importlib.metadata import PackageNotFoundError, version

        def installed(name: str) -> str:
            try:
                return version(name)
            except PackageNotFoundError:
                return "not installed"

        import dira3d

        print(f"dira3d {dira3d.__version__} (torch {installed('torch')}, monai {installed('monai')})")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dira3d: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    from dira3d.utils.interrupts import interrupt_exit_code, loading_stopped, sigterm_as_interrupt

    try:  # SIGTERM as Ctrl-C here too (it ended the process without a word, exit -15); each command handles its own
        with sigterm_as_interrupt():
            func = getattr(importlib.import_module(module_name), func_name)
    except KeyboardInterrupt as err:  # Ctrl-C / SIGTERM while torch / MONAI load (seconds): one line and 130 / 143
        print(loading_stopped(name, err), file=sys.stderr)
        return interrupt_exit_code(err)
    failed = True
    try:
        code = int(func(rest) or 0)
        failed = code != 0
        return code
    finally:
        if failed:  # an error or Ctrl-C: a failed cache fill may leave threads in native code, which abort the exit
            from dira3d.utils.threads import finish_pool_threads

            finish_pool_threads()


if __name__ == "__main__":
    sys.exit(main())
