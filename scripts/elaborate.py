#!/usr/bin/env python3
"""Write the accelerator's Verilog and manifest.json: a thin wrapper of `kriallm elaborate`.

    python scripts/elaborate.py --hw-config kv260 --out build/kv260 [--lint]
    python scripts/elaborate.py --hw-config my_array.json --out build/mine
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from boards.elaborate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
