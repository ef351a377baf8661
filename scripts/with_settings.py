"""Run a deepseek-v2 command with some of the kernel modules' settings changed, to time a kernel path
that is not (yet) the default against the default, in the same call.

    PYTHONPATH=. python3 scripts/with_settings.py moe.COMBINE_IN_GEMM_MAX_TOKENS=64 \\
        mla_decode.PROJECT_IN_MERGE_MAX_SEQS=8 -- bench --shape v2-lite --batch-sizes 1

Each setting is MODULE.NAME=VALUE: MODULE a module of deepseek_v2/kernels, NAME an upper-case
attribute it already has, VALUE a Python literal (a number, None, True, False). What follows `--` is
the command line of `deepseek-v2`.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def apply(setting: str) -> None:
    target, _, value = setting.partition("=")
    module_name, _, name = target.rpartition(".")
    if not module_name or not name.isupper() or not value:
        raise SystemExit(f"with_settings: expected MODULE.NAME=VALUE, got {setting!r}")
    module = importlib.import_module(f"deepseek_v2.kernels.{module_name}")
    if not hasattr(module, name):
        raise SystemExit(f"with_settings: deepseek_v2.kernels.{module_name} has no setting {name}")
    setattr(module, name, ast.literal_eval(value))
    print(f"with_settings: deepseek_v2.kernels.{module_name}.{name} = {getattr(module, name)!r}", file=sys.stderr)


def main(argv: list[str]) -> int:
    if "--" not in argv:
        raise SystemExit(__doc__)
    split = argv.index("--")
    for setting in argv[:split]:
        apply(setting)
    from deepseek_v2.cli import main as cli
    return cli(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
