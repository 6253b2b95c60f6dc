import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Offline assets (tokenizers, corpus, eval sets) live beside the checkout in ../shared/data.
# Tests that need them skip on a fresh clone without it.
SHARED_DATA = Path(os.environ.get("TST_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the offline assets in {SHARED_DATA} (set TST_SHARED_DATA)")
    return SHARED_DATA
