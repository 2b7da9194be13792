"""The command-line programs: `infer`, `train`, `evaluate`, `benchmark`, `export_hf`, `quantize`, `convert_t5x`.

Each module has `main(argv=None)`. They run as console scripts (`pregated-infer`, ... from pyproject.toml), as
`python -m pregated_jax.<name>` and as `python scripts/<name>.py` in a source checkout.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends "(default: X)" to a flag's help when it has a default that
    the help does not already state (no default, False and empty lists show nothing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default == [] or default is argparse.SUPPRESS
                or "default" in text.lower() or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"
