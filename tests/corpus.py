"""Malformed and unusual inputs, generated on the fly (no binary fixtures in the repo)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from winclip.synthetic import make_part


def mask_image(mask: np.ndarray) -> Image.Image:
    """A boolean defect mask as the 0/255 grayscale PNG the dataset layouts use."""
    return Image.fromarray((mask * 255).astype(np.uint8))


def save_part(sample, image_path: Path, mask_path: Path | None = None) -> None:
    """A synthetic part (``make_part``) into a labelled layout: its image, and its mask where given."""
    image_path.parent.mkdir(parents=True, exist_ok=True)
    sample.image.save(image_path)
    if mask_path is not None:
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        mask_image(sample.mask).save(mask_path)


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares a size but whose pixel data is one tiny compressed row."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def bomb_png(width: int, height: int) -> bytes:
    """A real, valid, highly compressible large image (decompression bomb)."""
    row = b"\x00" + b"\x00" * width
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def sample(size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def flipped(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    for i in range(at, min(at + 64, len(out))):
        out[i] ^= 0xFF
    return bytes(out)


def bad_images() -> list[tuple[str, str, bytes, str]]:
    """(case id, file name, file bytes, regex the message must match). Each must be refused clearly."""
    good_png = png_bytes(sample())
    good_jpg = encoded(sample(), "JPEG")
    nan = np.full((40, 40), np.nan, dtype=np.float32)
    return [
        ("zero-byte", "empty.png", b"", "empty"),
        ("text-as-png", "notes.png", b"hello, this is not an image\n" * 10, "not an image"),
        ("random-bytes", "noise.png", np.random.default_rng(1).bytes(4096), "not an image"),
        ("html", "page.png", b"<!doctype html><html><body>hi</body></html>", "not an image"),
        ("pdf", "doc.png", b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer\n%%EOF", "not an image"),
        ("zip", "archive.png", b"PK\x03\x04" + b"\x00" * 200, "not an image"),
        ("svg", "vector.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "not an image"),
        ("json", "data.png", b'{"image": [1, 2, 3]}', "not an image"),
        ("python", "script.png", b"import os\nos.system('echo hi')\n", "not an image"),
        ("npy", "array.npy", b"\x93NUMPY\x01\x00v\x00{'descr': '<f4'}" + b"\x00" * 100, "not an image"),
        ("png-signature-only", "sig.png", b"\x89PNG\r\n\x1a\n", "corrupt|not an image"),
        ("png-truncated-half", "half.png", good_png[: len(good_png) // 2], "corrupt|truncated"),
        ("png-truncated-header", "head.png", good_png[:40], "corrupt|truncated|not an image"),
        ("png-corrupt-idat", "flip.png", flipped(good_png, len(good_png) // 2), "corrupt|truncated"),
        ("jpeg-soi-only", "soi.jpg", b"\xff\xd8", "corrupt|not an image"),
        ("jpeg-truncated", "cut.jpg", good_jpg[: len(good_jpg) // 3], "corrupt|truncated"),
        ("jpeg-corrupt-header", "hdr.jpg", flipped(good_jpg, 2), "corrupt|not an image"),
        ("gif-garbage", "junk.gif", b"GIF89a" + b"\x01" * 30, "corrupt|not an image"),
        ("bmp-truncated", "cut.bmp", encoded(sample(), "BMP")[:100], "corrupt|truncated|not an image"),
        ("tiff-truncated", "cut.tif", encoded(sample(), "TIFF")[:120], "corrupt|truncated|not an image"),
        ("webp-garbage", "junk.webp", b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 20, "corrupt|not an image"),
        ("ico-garbage", "junk.ico", b"\x00\x00\x01\x00\x01\x00" + b"\xff" * 40, "corrupt|not an image"),
        ("bomb-100mpx", "bomb.png", bomb_png(10000, 10000), "too large|max"),
        ("bomb-49mpx", "bomb49.png", bomb_png(7000, 7000), "max"),
        ("declared-50000px", "huge.png", png_header_only(50000, 50000), "too large|max"),
        ("one-pixel", "dot.png", png_bytes(Image.new("RGB", (1, 1))), "too small"),
        ("one-pixel-high", "line.png", png_bytes(Image.new("RGB", (500, 1))), "too small"),
        ("20000x10", "strip.png", png_bytes(Image.new("L", (20000, 10))), "aspect ratio"),
        ("10x20000", "pole.png", png_bytes(Image.new("L", (10, 20000))), "aspect ratio"),
        ("3000x100", "banner.png", png_bytes(Image.new("RGB", (3000, 100))), "aspect ratio"),
        ("float-all-nan", "nan.tif", encoded(Image.fromarray(nan, mode="F"), "TIFF"), "no finite"),
    ]


def good_images() -> list[tuple[str, str, bytes, tuple[int, int], str | None]]:
    """(case id, file name, bytes, expected RGB size (w, h), note regex or None). All must load."""
    base = sample((80, 60))
    gray16 = Image.fromarray((np.arange(80 * 60, dtype=np.uint16).reshape(60, 80) * 13), mode="I;16")
    int32 = Image.fromarray((np.arange(80 * 60, dtype=np.int32).reshape(60, 80) - 1000), mode="I")
    flt = Image.fromarray(np.linspace(-5, 5, 80 * 60, dtype=np.float32).reshape(60, 80), mode="F")
    p_trans = base.convert("P")
    p_trans.info["transparency"] = 0
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise for display
    frames = [sample((50, 40)), Image.new("RGB", (50, 40), (255, 0, 0))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    apng = io.BytesIO()
    frames[0].save(apng, format="PNG", save_all=True, append_images=frames[1:])
    return [
        ("mode-L", "l.png", png_bytes(base.convert("L")), (80, 60), None),
        ("mode-LA", "la.png", png_bytes(base.convert("LA")), (80, 60), None),
        ("mode-P", "p.png", png_bytes(base.convert("P")), (80, 60), None),
        ("mode-P-transparent", "pt.png", png_bytes(p_trans), (80, 60), None),
        ("mode-RGBA", "rgba.png", png_bytes(base.convert("RGBA")), (80, 60), None),
        ("mode-CMYK-jpeg", "cmyk.jpg", encoded(base.convert("CMYK"), "JPEG"), (80, 60), None),
        ("mode-CMYK-tiff", "cmyk.tif", encoded(base.convert("CMYK"), "TIFF"), (80, 60), None),
        ("mode-I16", "g16.png", png_bytes(gray16), (80, 60), None),
        ("mode-I", "i32.tif", encoded(int32, "TIFF"), (80, 60), None),
        ("mode-F", "f.tif", encoded(flt, "TIFF"), (80, 60), None),
        ("mode-1", "bw.png", png_bytes(base.convert("1")), (80, 60), None),
        ("exif-rotated", "rot.jpg", encoded(base, "JPEG", exif=exif), (60, 80), None),
        ("animated-gif", "anim.gif", gif.getvalue(), (50, 40), "first frame"),
        ("animated-png", "anim.png", apng.getvalue(), (50, 40), "first frame"),
        ("webp", "x.webp", encoded(base, "WEBP"), (80, 60), None),
        ("bmp", "x.bmp", encoded(base, "BMP"), (80, 60), None),
        ("two-by-two", "tiny.png", png_bytes(Image.new("RGB", (2, 2), (9, 9, 9))), (2, 2), None),
        ("aspect-20", "wide.png", png_bytes(Image.new("RGB", (400, 20))), (400, 20), None),
    ]


def write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def labelled_zip(path):
    """washers/{good,crack,spot}/ with masks/ and one broken good file, zipped at ``path``."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        for i in range(3):
            buffer = io.BytesIO()
            make_part(200 + i, 160).image.save(buffer, format="PNG")
            zf.writestr(f"washers/good/{i}.png", buffer.getvalue())
        for i, defect in enumerate(("crack", "spot")):
            made = make_part(300 + i, 160, defect)
            for name, image in ((f"washers/{defect}/{i}.png", made.image),
                                (f"washers/masks/{defect}/{i}.png", mask_image(made.mask))):
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                zf.writestr(name, buffer.getvalue())
        zf.writestr("washers/good/broken.png", b"\x89PNG\r\n\x1a\n broken")
    return path
