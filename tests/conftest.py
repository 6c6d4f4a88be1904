import os
import sys
from pathlib import Path

# The project is flat scripts, not a package: make them importable from tests/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# deepsparse phones home on import unless told not to; tests import it directly.
os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
