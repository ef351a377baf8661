"""What some of decode's small launches cost: run a deepseek-v2 command with their kernels swapped for
nothing. The numbers come out wrong, the time right (the launches' shapes are kept); for deciding which
launches are worth folding into another kernel, never for serving.

    PYTHONPATH=. python3 scripts/time_without_launches.py norms -- bench --shape v2-lite --batch-sizes 1 \\
        --prompt-len 1024 --output-len 256 --prefill-len 4096 --prefill-prompts 1 --quantization fp8

What to leave out, comma-separated: `norms` (every RMSNorm, the residual add with it), `prepare` (MLA
prepare: the latent's norm, the RoPEs, the cache write), `absorb` (W_UK's product), or `none`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from deepseek_v2.kernels import absorb, mla_prepare, norm  # noqa: E402


def no_norm(x, weight, eps, residual=None):
    return x if residual is None else (x, residual)


def no_prepare(q_pe, kv, cos, sin, weight, eps, kv_cache=None, slot_mapping=None):
    R = kv.shape[1] - q_pe.shape[2]
    return q_pe, kv[:, :R], kv[:, R:]


def no_absorb(q_nope, w_uk):
    return q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], w_uk.shape[2])


LEFT_OUT = {"norms": (norm, "rms_norm", no_norm), "prepare": (mla_prepare, "mla_prepare", no_prepare),
            "absorb": (absorb, "absorb_query", no_absorb)}


def main() -> int:
    if len(sys.argv) < 3 or sys.argv[2] != "--":
        raise SystemExit(__doc__)
    for name in filter(None, sys.argv[1].split(",")):
        if name == "none":
            continue
        if name not in LEFT_OUT:
            raise SystemExit(f"time_without_launches: unknown launch {name!r} (known: {', '.join(LEFT_OUT)}, none)")
        module, attribute, stand_in = LEFT_OUT[name]
        setattr(module, attribute, stand_in)  # read by load_kernels when the engine picks the Triton set
    from deepseek_v2.cli import main as cli
    return cli(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
