"""Freed memory stays in the process on the CPU (mlxtune.cpu_memory): loading a model switches glibc's malloc
so MLX's buffers of the next step come back without page faults, and MLXTUNE_KEEP_FREED_MEMORY=0 leaves glibc
as it was. Each case runs in its own process: the setting is process-wide and cannot be undone in one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# Load the model (what switches the setting), then allocate and free 40 buffers of 4 MiB ten times: what a
# training step does with its activations. Prints whether the switch is on and the page faults of the ten.
_SCRIPT = textwrap.dedent("""
    import resource, sys
    import mlx.core as mx
    from mlxtune import cpu_memory
    from mlxtune.models import load_model
    load_model(sys.argv[1])

    def burst(i):
        xs = [mx.full((1024, 1024), float(i + j)) for j in range(40)]
        mx.eval(xs)
        return sum(x[0, 0].item() for x in xs)

    burst(0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(10):
        burst(i)
    print(cpu_memory._kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(model_dir, **env) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(model_dir)], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_loading_a_model_on_the_cpu_keeps_freed_memory_for_the_next_step(tiny_llama):
    kept, faults = _faults(tiny_llama)
    off, faults_off = _faults(tiny_llama, MLXTUNE_KEEP_FREED_MEMORY="0")
    assert kept and not off
    # 10 x 160 MiB allocated: left to glibc's defaults they fault in again (~4k pages a burst here); kept, the
    # arenas hand the same pages back
    assert faults_off > 10_000
    assert faults < faults_off / 10
