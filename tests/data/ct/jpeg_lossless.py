"""A minimal JPEG Lossless encoder (ITU-T T.81 Annex H, process 14, selection value 1) for test files.

pydicom encodes RLE, JPEG-LS and JPEG 2000 but not JPEG Lossless, the transfer syntax PACS exports use most
(1.2.840.10008.1.2.4.70); this writes one grayscale frame so the decoders can be tested on it.
One component, point transform 0, predictor 1 (the sample to the left; the first row's first sample predicted by
2^(P-1), each other row's first sample by the one above), one Huffman table giving every difference category
0..16 a 5-bit code.
"""

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLosslessSV1


def encode(pixels: np.ndarray, precision: int) -> bytes:
    """One JPEG Lossless codestream of an unsigned (H, W) image with ``precision`` bits per sample."""
    rows, columns = pixels.shape
    values = pixels.astype(np.int64)
    predicted = np.empty_like(values)
    predicted[:, 1:] = values[:, :-1]
    predicted[1:, 0] = values[:-1, 0]
    predicted[0, 0] = 1 << (precision - 1)
    difference = (values - predicted).ravel() % 65536
    difference = np.where(difference > 32768, difference - 65536, difference)  # in -32767..32768
    category = np.where(difference == 0, 0, np.ceil(np.log2(np.abs(difference) + 1))).astype(np.int64)
    extra = np.where(difference < 0, difference + (1 << category) - 1, difference)
    extra = np.where(category == 16, 0, extra)  # category 16 (a difference of 32768) has no extra bits
    length = 5 + np.where(category == 16, 0, category)
    word = (category << (length - 5)) | extra  # the 5-bit code (= the category) then the extra bits
    starts = np.concatenate([[0], np.cumsum(length)[:-1]])
    owner = np.repeat(np.arange(len(word)), length)
    position = np.arange(int(length.sum())) - starts[owner]
    bits = (word[owner] >> (length[owner] - 1 - position)) & 1
    bits = np.concatenate([bits, np.ones(-len(bits) % 8, dtype=np.int64)])  # pad the last byte with ones
    scan = np.packbits(bits.astype(np.uint8)).tobytes().replace(b"\xff", b"\xff\x00")  # byte stuffing

    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body

    frame = bytes([precision]) + rows.to_bytes(2, "big") + columns.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    table = bytes([0x00]) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    start_of_scan = bytes([1, 1, 0x00, 1, 0, 0x00])  # one component, table 0, predictor 1, Se 0, point transform 0
    return (b"\xff\xd8" + segment(0xC3, frame) + segment(0xC4, table) + segment(0xDA, start_of_scan) + scan
            + b"\xff\xd9")


def compress_jpeg_lossless(dataset: Dataset) -> Dataset:
    """``dataset`` (one unsigned grayscale frame) re-encoded in place as JPEG Lossless SV1."""
    pixels = dataset.pixel_array
    dataset.PixelData = encapsulate([encode(pixels, int(dataset.BitsStored))])
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    dataset.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    return dataset
