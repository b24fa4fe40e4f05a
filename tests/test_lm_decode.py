"""bench.lm_decode: a timed decode step is a real cached step at a fixed context, and the quick run holds together."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.lm_decode import DecodeStep, Prefill
from tests.lm_workloads import llama_model
from tests.waiting import HANG_S

ROOT = Path(__file__).resolve().parents[1]


def test_a_decode_step_equals_the_full_forward_and_keeps_its_context():
    model = llama_model().eval()
    prompt = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(0))
    step = DecodeStep(model, prompt)
    with torch.inference_mode():
        first, again = step(prompt), step(prompt)
        full = Prefill(model)(torch.cat([prompt, step.next_token], dim=1))
    assert step.cache.get_seq_length() == prompt.shape[1]  # cropped back after each step
    assert torch.equal(first, again)
    torch.testing.assert_close(first[:, -1], full[:, -1], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_the_quick_run_writes_paired_prefill_and_decode_for_each_model(tmp_path):
    out = tmp_path / "lm.json"
    command = [sys.executable, "-m", "bench.lm_decode", "--workload", "tests.lm_workloads:llama", "--quick",
               "--prompt", "8", "--new-tokens", "4", "--policy", "examples/policies/gptq_int4.json",
               "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) == {"torch fp32 (baseline)", "torch dynamic int8", "policy gptq_int4"}
    assert rows["torch fp32 (baseline)"]["kl_from_baseline"] == pytest.approx(0.0, abs=1e-6)
    assert rows["policy gptq_int4"]["kl_from_baseline"] > 0
    for row in rows.values():
        assert row["cache_equals_no_cache"] is True, row["name"]
        for phase in ("prefill", "decode"):
            spread = row[phase]["speedup"]
            assert spread["low"] <= spread["median"] <= spread["high"] and row[phase]["tokens_per_s"] > 0
