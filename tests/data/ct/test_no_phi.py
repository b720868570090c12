"""No free-text DICOM header (descriptions, names, IDs, institution) reaches the cache, its file names or the logs."""

import csv
import logging

import numpy as np
import phantoms
import pytest
from dicom_factory import write_volume

from chestssl.data.ct.dicom_series import list_series
from chestssl.data.ct.io import read_ct
from chestssl.data.ct.preprocess import PrepareCTConfig
from chestssl.data.ct.prepare import prepare_ct
from chestssl.errors import DataError

HEADERS = {  # distinctive values of the free-text headers sites fill with names, dates and numbers
    "SeriesDescription": "SERDESC Smith 2021-03-04 ACC5551234",
    "StudyDescription": "STUDYDESC Qwertyton Clinic",
    "ProtocolName": "PROTOCOL Zanzibar",
    "PatientName": "Quorrax^Zyxwut",
    "PatientID": "PID-7788-QX",
    "InstitutionName": "INSTITUTION Of Ylang",
    "AccessionNumber": "ACC998877",
    "ReferringPhysicianName": "Refphysq^Doctor",
    "OperatorsName": "Operatorq^Tech",
    "StudyID": "STUDYID4242",
}
SECRETS = [value for value in HEADERS.values()] + ["Quorrax", "Zyxwut", "Smith", "Qwertyton"]


def leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


@pytest.fixture()
def tree(tmp_path):
    """A study folder holding a chest CT, an MR and a CT localizer series; a folder with an MR and a localizer."""
    study = tmp_path / "study"
    write_volume(study, phantoms.chest(), phantoms.SPACING, headers=HEADERS, prefix="ct")
    write_volume(study, np.full((6, 16, 16), 100.0), (5.0, 1.0, 1.0), modality="MR", headers=HEADERS, prefix="mr")
    localizer = {**HEADERS, "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}
    write_volume(study, np.full((2, 16, 16), -1000.0), (1.0, 1.0, 1.0), headers=localizer, prefix="loc")
    no_ct = tmp_path / "no_ct"
    write_volume(no_ct, np.full((6, 16, 16), 100.0), (5.0, 1.0, 1.0), modality="MR", headers=HEADERS, prefix="mr")
    write_volume(no_ct, np.full((2, 16, 16), -1000.0), (1.0, 1.0, 1.0), headers=localizer, prefix="loc")
    with open(tmp_path / "cases.csv", "w", newline="") as stream:  # whole folders: one series chosen by rule
        csv.writer(stream).writerows([["path", "id"], ["study", "by-rule"], ["no_ct", "no-ct"]])
    return tmp_path


def test_no_free_text_header_in_the_cache_or_the_log(tree, caplog):
    caplog.set_level(logging.DEBUG)
    config = PrepareCTConfig(inputs=(str(tree / "study"),), manifest_csv=str(tree / "cases.csv"),
                             cache_dir=str(tree / "cache"), size=16, spacing_mm=3.0, workers=1)
    manifest = prepare_ct(config)
    cache_files = [path for path in (tree / "cache").rglob("*")]
    assert not leaks(" ".join(path.name for path in cache_files))
    for path in cache_files:
        assert not leaks(path.read_bytes().decode("latin-1")), path
    assert not leaks((tree / "cache" / "preprocessing.json").read_text())
    assert not leaks(caplog.text), leaks(caplog.text)
    statuses = sorted(row["status"] for row in csv.DictReader(manifest.open()))
    assert statuses == ["failed", "failed", "failed", "ok", "ok"]  # MR, localizer, no CT; the chest twice
    reasons = manifest.read_text()
    assert "is MR, not CT" in reasons and "no axial CT volume" in reasons and "all series" in caplog.text


def test_no_free_text_header_in_series_listings_or_errors(tree, caplog):
    caplog.set_level(logging.DEBUG)
    infos = list_series(tree / "study")
    assert [info.modality for info in infos] == ["CT", "MR", "CT"] and not leaks(repr(infos))
    assert infos[0].describe() == f"{infos[0].uid_hash} CT axial 60 slice(s) of 96x96"
    for call in (lambda: read_ct(tree / "no_ct"), lambda: read_ct(tree / "study", series_uid="1.2.3")):
        with pytest.raises(DataError) as error:
            call()
        assert not leaks(str(error.value)), str(error.value)
    assert not leaks(caplog.text)
