"""Run a deepseek-v2 command with some of the kernel modules' settings changed, to time a kernel path
that is not (yet) the default against the default, in the same call.

    PYTHONPATH=. python3 scripts/with_settings.py moe.COMBINE_IN_GEMM_MAX_TOKENS=64 \\
        mla_decode.PROJECT_IN_MERGE_MAX_SEQS=8 -- bench --shape v2-lite --batch-sizes 1

Each setting is MODULE.NAME=VALUE: MODULE a module of deepseek_v2/kernels, NAME an upper-case
attribute it already has, VALUE a Python literal (a number, None, True, False). A MODULE that starts
with `deepseek_v2.` names any module, or a class in one: deepseek_v2.moe.MoE.FUSED_SHARED_MAX_TOKENS=256.
What follows `--` is the command line of `deepseek-v2`, or a Python script and its arguments (a path
ending in .py):

    PYTHONPATH=. python3 scripts/with_settings.py fp8.QUANTIZE_ONCE_FROM=17 -- \\
        scripts/profile_decode.py --step-only --batch=256 --fp8
"""

from __future__ import annotations

import ast
import importlib
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def apply(setting: str) -> None:
    target, _, value = setting.partition("=")
    module_name, _, name = target.rpartition(".")
    if not module_name or not name.isupper() or not value:
        raise SystemExit(f"with_settings: expected MODULE.NAME=VALUE, got {setting!r}")
    if not module_name.startswith("deepseek_v2."):
        module_name = f"deepseek_v2.kernels.{module_name}"
    owner_path, _, class_name = module_name.rpartition(".")
    if class_name[:1].isupper():  # a class's attribute: deepseek_v2.moe.MoE.NAME
        owner = getattr(importlib.import_module(owner_path), class_name)
    else:
        owner = importlib.import_module(module_name)
    if not hasattr(owner, name):
        raise SystemExit(f"with_settings: {module_name} has no setting {name}")
    setattr(owner, name, ast.literal_eval(value))
    print(f"with_settings: {module_name}.{name} = {getattr(owner, name)!r}", file=sys.stderr)


def main(argv: list[str]) -> int:
    if "--" not in argv:
        raise SystemExit(__doc__)
    split = argv.index("--")
    for setting in argv[:split]:
        apply(setting)
    command = argv[split + 1:]
    if command and command[0].endswith(".py"):  # a script (scripts/profile_decode.py ...), run as its own main
        sys.argv = command
        runpy.run_path(command[0], run_name="__main__")
        return 0
    from deepseek_v2.cli import main as cli
    return cli(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
