"""Loading keeps memory near the file's size: measured in a fresh process (VmRSS / VmHWM around ember.load).

SmolLM2 Q4_1 (93 MiB file), measured: peak +167-173 MiB during load, +121-123 MiB resident after it
(packed weights and the tokenizer; the KV cache is reserved, not touched). Before the packed layers were
written in place, the file pages dropped once packed and freed heap handed back: +268 / +176 MiB.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = """
import json, sys
import ember, ember.llm, ember.models.loader, ember.weights.gguf  # imports stay out of the measurement
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
base = status("VmRSS")
ember.load(sys.argv[1])
print(json.dumps({"peak": status("VmHWM") - base, "resident": status("VmRSS") - base}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_load_memory_stays_near_the_file_size(smollm_gguf):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(smollm_gguf)], check=True, capture_output=True,
                         text=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    size = smollm_gguf.stat().st_size
    print(f"\nfile {size >> 20} MiB: peak +{got['peak'] >> 20} MiB, resident +{got['resident'] >> 20} MiB")
    assert got["resident"] <= 1.5 * size  # the bound (plus the KV cache, which is not touched yet)
    assert got["peak"] <= 2.0 * size  # no second copy of the model at any point
