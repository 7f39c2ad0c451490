"""Launcher: `python -m opd.main --config=experiments/<name>.py[:variant] --workdir=DIR`.

Only parses flags and hands over to `opd.pipeline.run`, which runs the config's stages.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from opd import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every stage's outputs (resumable).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    pipeline.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
