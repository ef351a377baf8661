"""The mixed workload that `deepseek-v2 bench --workload mixed` runs offline and `deepseek-v2
bench-serve` sends to a server: prompt and output lengths drawn from log-normal distributions
(a median, a sigma, clipped to a range), random prompt token ids, and for the server the arrival
times of a Poisson process at a request rate, as vLLM's `benchmark_serving.py` draws them.

Pure Python (`random.Random`, no torch, no numpy): the same seed draws the same requests on any
machine. Each quantity has its own generator, so changing one distribution leaves the others'
draws as they were.
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import asdict, dataclass

FIRST_TOKEN_ID = 10  # prompt ids start here, as the fixed workload's prompts do


@dataclass(frozen=True)
class LogNormal:
    """Lengths whose logarithm is normal: half of them below `median`, exp(sigma) the spread of one
    standard deviation; each draw rounded to a whole token and clipped to [min, max]."""

    median: float
    sigma: float
    min: int
    max: int

    def __post_init__(self):
        if not (self.median > 0 and self.sigma >= 0 and 1 <= self.min <= self.max):
            raise ValueError(f"a length distribution needs median > 0, sigma >= 0 and 1 <= min <= max: {self}")

    def draw(self, n: int, rng: random.Random) -> list[int]:
        mu = math.log(self.median)
        return [min(self.max, max(self.min, round(rng.lognormvariate(mu, self.sigma)))) for _ in range(n)]


@dataclass(frozen=True)
class Workload:
    num_prompts: int
    seed: int
    prompt_len: LogNormal
    output_len: LogNormal

    def __post_init__(self):
        if self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be at least 1, not {self.num_prompts}")

    def rng(self, what: str) -> random.Random:
        return random.Random(f"{what}-{self.seed}")  # a str seed is hashed with SHA-512: stable everywhere

    def lengths(self) -> tuple[list[int], list[int]]:
        """(prompt lengths, output lengths), one of each per request."""
        return (self.prompt_len.draw(self.num_prompts, self.rng("prompt-len")),
                self.output_len.draw(self.num_prompts, self.rng("output-len")))

    def requests(self, vocab_size: int) -> list[tuple[list[int], int]]:
        """(prompt token ids, output length) per request; the ids are uniform over the vocabulary."""
        prompt_lens, output_lens = self.lengths()
        rng = self.rng("token-ids")
        return [([rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(p)], o)
                for p, o in zip(prompt_lens, output_lens)]

    def arrival_times(self, request_rate: float) -> list[float]:
        """Seconds from the start at which each request is sent: all at 0 for an infinite rate, else a
        Poisson process (exponential gaps of mean 1 / rate) scaled, as vLLM does, so that the last
        arrival is at exactly num_prompts / rate (the total of the gaps is otherwise off by a few
        percent, and the measured throughput with it)."""
        if request_rate <= 0:
            raise ValueError(f"a request rate must be positive, not {request_rate}")
        if math.isinf(request_rate):
            return [0.0] * self.num_prompts
        rng = self.rng("arrivals")
        times, t = [], 0.0
        for _ in range(self.num_prompts):
            t += rng.expovariate(request_rate)
            times.append(t)
        scale = self.num_prompts / request_rate / times[-1]
        return [x * scale for x in times]

    def describe(self) -> dict:
        return asdict(self)


# The defaults of both commands (docs/benchmarks.md describes the workload they make).
DEFAULTS = {"prompt": LogNormal(median=200, sigma=1.0, min=4, max=2048),
            "output": LogNormal(median=150, sigma=1.0, min=4, max=1024)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixed workload", "log-normal prompt and output lengths (median, sigma, clipped "
                                               "to [min, max]) and random prompt token ids")
    g.add_argument("--num-prompts", type=int, default=1000, help="requests (default: %(default)s)")
    g.add_argument("--workload-seed", type=int, default=0, help="seed of the lengths, token ids and arrival "
                   "times (default: %(default)s)")
    for kind, d in DEFAULTS.items():
        for field in ("median", "sigma", "min", "max"):
            g.add_argument(f"--{kind}-len-{field}", type=float if field in ("median", "sigma") else int,
                           default=getattr(d, field), help="(default: %(default)s)")


def from_args(args: argparse.Namespace) -> Workload:
    def dist(kind: str) -> LogNormal:
        return LogNormal(*(getattr(args, f"{kind}_len_{f}") for f in ("median", "sigma", "min", "max")))
    return Workload(args.num_prompts, args.workload_seed, dist("prompt"), dist("output"))
