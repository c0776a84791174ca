"""docs/flags.md, the flag reference of both stages, written from the code that declares the flags:

    python -m minitrain.tools.flag_docs > docs/flags.md

process_data.py's from its argparse parser (minitrain/prepare/flags.py), train.py's from the fields of TrainConfig
(minitrain/training/config.py). tests/test_docs.py fails when the committed file differs from this output.
"""

from minitrain.prepare import flags as stage1
from minitrain.training import config as stage2

COMMAND = "python -m minitrain.tools.flag_docs > docs/flags.md"


def render() -> str:
    return f"""# Flag reference

Generated from the code; do not edit by hand. After changing a flag, run

    {COMMAND}

(`tests/test_docs.py` fails while this file and the code disagree). Both commands also take every flag from a YAML
or TOML file with `--config FILE`; flags on the command line win ([training.md](training.md#config-files)). What the
important flags do, and why: [data.md](data.md) for stage 1, [training.md](training.md#the-flags-that-matter) for
stage 2.

## process_data.py (stage 1)

Declared in `minitrain/prepare/flags.py`.

{stage1.markdown()}
## train.py (stage 2)

Declared as the fields of `TrainConfig` in `minitrain/training/config.py`. A switch `--[no-]x` takes `--x` or
`--no-x`.

{stage2.markdown()}"""


if __name__ == "__main__":
    print(render(), end="")
