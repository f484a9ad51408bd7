"""dira3d: MONAI-native DiRA (discriminative, restorative, adversarial) self-supervised pretraining."""

__version__ = "0.1.0"

from dira3d.utils.bundle_errors import install_bundle_error_hook  # noqa: E402 - light: no torch
from dira3d.utils.interrupts import install_interrupt_exit_hook  # noqa: E402 - light: no torch
from dira3d.utils.threads import install_exit_hook  # noqa: E402 - light: no torch
from dira3d.utils.warning_format import install_warning_format  # noqa: E402 - light: no torch

# an exit after an uncaught error waits for thread-pool workers still loading data in native code, which
# would abort the process (dira3d.utils.threads)
install_exit_hook()
# a Ctrl-C a command caught (exit 130) does not end `python -m dira3d.cli ...` by SIGINT (dira3d.utils.interrupts)
install_interrupt_exit_hook()
# a bad file or setting under `python -m monai.bundle run` ends in one error line, not MONAI's wrapped traceback
# (dira3d.utils.bundle_errors)
install_bundle_error_hook()
# dira3d's warnings print as one `WARNING: <message>` line, not with the file, line and code that raised them
# (dira3d.utils.warning_format)
install_warning_format()
