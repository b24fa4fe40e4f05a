"""Search combinations of per-layer compression techniques for the best accuracy/size/latency trade-offs.

Locally: `python search.py` (starts Ray in-process, searches the built-in digits workload).
On a cluster: `ray submit cluster.yaml search.py -- --storage-path s3://bucket/runs` (or `ray job submit`).
`python search.py --help` lists every option.
"""

import sys

from orchestrator.cli import search_main as main

if __name__ == "__main__":
    sys.exit(main())
