"""Launcher: `python -m opd.main --config=experiments/<name>.py[:variant] --workdir=DIR`.

Only parses flags and hands over to `opd.pipeline.run`, which runs the config's stages.
`--verbosity=1` (`-v 1`) also shows other libraries' INFO / DEBUG logs (opd.console).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from opd import configs, console, pipeline
from opd.training.loop import Stopped

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every stage's outputs (resumable).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.setup(flags.FLAGS.verbosity)
    try:
        configs.validate(_CONFIG.value)  # a bad config value: one line naming the field, not a traceback
    except ValueError as e:
        sys.exit(f"error: {e}")
    try:
        pipeline.run(_CONFIG.value, _WORKDIR.value)
    except Stopped as e:  # preempted, a failed save, a refused launch: the message says it all, no traceback
        sys.exit(f"opd: {e}")


if __name__ == "__main__":
    try:
        configs.check_overrides(sys.argv)  # an unknown --config.<key>: one line, not a traceback
    except ValueError as e:
        sys.exit(f"error: {e}")
    app.run(main)
