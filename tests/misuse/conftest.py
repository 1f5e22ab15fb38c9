"""The misuse tests (issue: the guarantee cannot be silently voided) share the suite's helpers in tests/."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
