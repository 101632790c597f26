"""`k2rl bench sandbox`: the warm container pool against one `docker run` per program.

Both sides run the same N short programs with the same concurrency and limits, in
one process, one after the other; the figure that matters is the throughput ratio.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from .docker_pool import LABEL, LABEL_OWNER, lockdown_options, owner_label
from .image import docker_client
from .limits import RunRequest, SandboxConfig, SandboxLimits

PROGRAM = "import sys\nnumbers = [int(x) for x in sys.stdin.read().split()]\nprint(sum(numbers))\n"


@dataclass
class BenchSide:
    runs: int
    seconds: float
    runs_per_second: float
    p50_s: float
    p95_s: float
    failures: int


@dataclass
class SandboxBench:
    programs: int
    concurrency: int
    warm_pool: BenchSide
    docker_run: BenchSide
    throughput_ratio: float

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        rows = [
            f"{self.programs} programs, concurrency {self.concurrency}",
            f"{'':14}{'runs/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'failed':>8}",
        ]
        for name, side in (("warm pool", self.warm_pool), ("docker run", self.docker_run)):
            rows.append(
                f"{name:14}{side.runs_per_second:9.1f}{side.p50_s * 1e3:9.0f}{side.p95_s * 1e3:9.0f}{side.failures:8d}"
            )
        rows.append(f"throughput ratio (warm pool / docker run): {self.throughput_ratio:.1f}x")
        return "\n".join(rows)


def _side(latencies: list[float], seconds: float, failures: int) -> BenchSide:
    ordered = sorted(latencies)
    return BenchSide(
        runs=len(latencies),
        seconds=seconds,
        runs_per_second=len(latencies) / seconds,
        p50_s=statistics.median(ordered),
        p95_s=ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        failures=failures,
    )


def _timed(fn, inputs: list[str], concurrency: int) -> BenchSide:
    def one(text: str) -> tuple[float, bool]:
        start = time.perf_counter()
        ok = fn(text)
        return time.perf_counter() - start, ok

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, inputs))
    seconds = time.perf_counter() - start
    return _side([latency for latency, _ in results], seconds, sum(not ok for _, ok in results))


def run_sandbox_bench(programs: int, concurrency: int, image: str) -> SandboxBench:
    import docker

    from . import open_sandbox

    limits = SandboxLimits()
    inputs = [f"{i} {i + 1} {i + 2}\n" for i in range(programs)]
    expected = {text: str(sum(int(x) for x in text.split())) for text in inputs}

    sandbox = open_sandbox(SandboxConfig(backend="docker", image=image, pool_size=concurrency, limits=limits))
    try:
        def through_pool(text: str) -> bool:
            result = sandbox.run_sync(RunRequest(files={"main.py": PROGRAM}, command=("python3", "main.py"), stdin=text))
            return result.status == "ok" and result.stdout.strip() == expected[text]

        through_pool(inputs[0])  # the pool is warm before timing starts, as in a long run
        warm = _timed(through_pool, inputs, concurrency)
    finally:
        sandbox.close()

    client = docker_client(timeout=60)

    def one_container(text: str) -> bool:
        # The same lockdown as the pool's containers, paid for on every run. Labelled as theirs, so
        # that the sandbox's clean-up of a process that died removes these too.
        try:
            output = client.containers.run(
                image,
                ["python3", "-c", f"import sys; sys.stdin = __import__('io').StringIO({text!r})\n{PROGRAM}"],
                remove=True,
                user="65534:65534",
                labels={LABEL: "1", LABEL_OWNER: owner_label()},
                **lockdown_options(limits.cpus, limits.memory_mb, limits.max_processes),
            )
        except docker.errors.DockerException:  # a failed run, as a pool's would count
            return False
        return output is not None and output.decode().strip() == expected[text]

    cold = _timed(one_container, inputs, concurrency)
    return SandboxBench(programs, concurrency, warm, cold, warm.runs_per_second / cold.runs_per_second)
