import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CHESTSSL_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public chest data beside the checkout (../shared/data or $CHESTSSL_DATA).

    Absent data skips the test on a developer's machine, but fails it under ``CI=true``: CI must never pass
    while testing nothing.
    """
    if not SHARED_DATA.is_dir():
        message = f"no shared data at {SHARED_DATA}"
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"{message}; CI needs the data beside the checkout (../shared/data or CHESTSSL_DATA)")
        pytest.skip(message)
    return SHARED_DATA


def pytest_configure(config):
    # Tests use tiny models; one thread avoids oversubscribing the 2-core CI machine when processes overlap.
    import torch

    torch.set_num_threads(1)
