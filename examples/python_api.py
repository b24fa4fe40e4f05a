"""The Python API (only names from `orchestrator.__all__`): apply examples/policy.json to the built-in digits
workload, save the checkpoint, reload it (verified), and print what the compression bought.

    python examples/python_api.py
"""

import tempfile
from pathlib import Path

from orchestrator import Policy, apply, load_checkpoint, resolve_workload, save_checkpoint

workload = resolve_workload("digits")  # trains the baseline on first use (cached), then reuses it
result = apply(Policy.load(Path(__file__).with_name("policy.json")), workload)
with tempfile.TemporaryDirectory() as tmp:
    saved = save_checkpoint(result.model, result.policy, result.metrics, workload, f"{tmp}/ckpt")
    checkpoint = load_checkpoint(saved, workload)  # checksums verified, architecture rebuilt
    reloaded = workload.evaluate(checkpoint.model, "validation")
print(f"compression ratio {checkpoint.metrics['compression_ratio']:.1f}x")
print(f"validation accuracy {reloaded:.4f} (baseline {checkpoint.metrics['baseline_validation']:.4f})")

# A search is one more call (Ray Tune + Optuna; SearchConfig takes search.py's flags by name):
#   from orchestrator import SearchConfig, SpaceOptions, run_search
#   outcome = run_search(SearchConfig(num_trials=8, space=SpaceOptions(families=("quantization",))))
#   print(outcome.run_dir, len(outcome.pareto))
