"""python -m benchmarks.quality [--quick] ... (see bench.py)."""

import sys

from benchmarks.quality.bench import main

sys.exit(main())
