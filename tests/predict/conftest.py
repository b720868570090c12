import sys
from pathlib import Path

# the synthetic CT helpers (phantoms, dicom_factory) live beside the CT reader tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "ct"))
