"""CogVLM2Processor, image loading/preprocessing: goldens of every fixture case and every bad-input error."""
from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cogvlm2.config import CogVLM2Config
from cogvlm2.errors import (ConfigError, ImageError, ImageNotFoundError, ImageTooLargeError, InputError, TemplateError,
                            UnreadableImageError, UnsupportedImageError)
from cogvlm2.image import DEFAULT_MAX_PIXELS, image_content_hash, load_image, preprocess_image
from cogvlm2.processor import (CogVLM2Processor, ProcessedPrompt, build_position_ids, build_vision_expert_mask,
                               format_prompt)
from cogvlm2.tokenizer import Llama3Tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "cogvlm2-tiny"
GOLDENS = json.loads((FIXTURE / "goldens.json").read_text(encoding="utf-8"))
CASES = GOLDENS["cases"]
IMAGE_CASES = [c for c in CASES if c["image"]]
PIXELS = np.load(FIXTURE / "goldens.npz")
PROMPT_FIELDS = ("prompt_text", "input_ids", "token_type_ids", "position_ids", "vision_expert_mask")
CHAT_PNG = FIXTURE / "image_chat.png"


@pytest.fixture(scope="module")
def processor() -> CogVLM2Processor:
    return CogVLM2Processor(CogVLM2Config.from_json_file(FIXTURE / "config.json"), Llama3Tokenizer.default())


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def noise_image(width: int = 64, height: int = 48, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    channels = len(mode) if mode in ("RGB", "RGBA", "CMYK", "LA") else 1
    arr = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr).convert(mode)


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (decodes to nothing)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


# ---- goldens -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_processor_matches_goldens(processor: CogVLM2Processor, case: dict) -> None:
    image = FIXTURE / case["image"] if case["image"] else None
    out = processor(case["query"], image=image, history=case["history"], template=case["template"])
    assert isinstance(out, ProcessedPrompt)
    for field in PROMPT_FIELDS:
        assert getattr(out, field) == case[field], field
    assert out.num_tokens == len(case["input_ids"])
    if image is None:
        assert out.pixel_values is None and out.image_hash is None
    else:
        expected = PIXELS[f"{case['name']}.pixel_values"]
        assert out.pixel_values.dtype == np.float32 and out.pixel_values.shape == (3, 112, 112)
        np.testing.assert_allclose(out.pixel_values, expected, atol=1e-5, rtol=0)
        assert out.image_hash == image_content_hash(expected)


def test_image_input_kinds_give_identical_pixels(processor: CogVLM2Processor) -> None:
    data = CHAT_PNG.read_bytes()
    with Image.open(CHAT_PNG) as f:
        pil = f.convert("RGB")
    kinds = [str(CHAT_PNG), CHAT_PNG, data, bytearray(data), pil, np.asarray(pil), [CHAT_PNG], (data,)]
    outs = [processor("What is in this image?", image=kind) for kind in kinds]
    reference = PIXELS["image_chat.pixel_values"]
    for out in outs:
        np.testing.assert_array_equal(out.pixel_values, outs[0].pixel_values)
        assert out.image_hash == outs[0].image_hash
        assert out.input_ids == outs[0].input_ids
    np.testing.assert_allclose(outs[0].pixel_values, reference, atol=1e-5, rtol=0)


def test_default_template_is_config_template_and_empty_history(processor: CogVLM2Processor) -> None:
    case = next(c for c in CASES if c["name"] == "text_only")
    assert processor(case["query"]).input_ids == case["input_ids"]
    assert processor(case["query"], history=[], template=None).input_ids == case["input_ids"]
    assert processor(case["query"], image=[]).pixel_values is None


def test_format_prompt_templates() -> None:
    history = [("q1", "a1"), ("q2", "a2")]
    assert format_prompt("q", history, "chat") == "Question: q1 Answer: a1\nQuestion: q2 Answer: a2\nQuestion: q Answer:"
    assert format_prompt("q", history, "vqa") == ("Question: q1 Short answer: a1\nQuestion: q2 Short answer: a2\n"
                                                  "Question: q Short answer:")
    assert format_prompt("q", history, "base") == "q"


def test_from_pretrained_demo_and_tokenizer_path(tmp_path: Path) -> None:
    processor = CogVLM2Processor.from_pretrained("demo")
    assert processor.config.tokens_per_image == GOLDENS["vision_tokens_per_image"]
    case = IMAGE_CASES[0]
    out = processor(case["query"], FIXTURE / case["image"], case["history"], case["template"])
    assert out.input_ids == case["input_ids"]
    from importlib.resources import as_file, files
    with as_file(files("llama_models.llama3").joinpath("tokenizer.model")) as model_path:
        explicit = CogVLM2Processor.from_pretrained(None, tokenizer_path=model_path, max_image_pixels=1000)
    assert explicit.max_image_pixels == 1000
    assert explicit(case["query"]).input_ids == processor(case["query"]).input_ids


def test_processor_rejects_mismatched_setup() -> None:
    config = CogVLM2Config.from_json_file(FIXTURE / "config.json")
    with pytest.raises(ConfigError, match="max_image_pixels"):
        CogVLM2Processor(config, Llama3Tokenizer.default(), max_image_pixels=0)
    config.bos_token_id = 1
    with pytest.raises(ConfigError, match="bos_token_id"):
        CogVLM2Processor(config, Llama3Tokenizer.default())


# ---- position ids and expert mask -----------------------------------------------------------------------------------
def test_position_ids_and_mask_rules() -> None:
    tt = [0, 1, 1, 1, 1, 0, 0]
    assert build_position_ids(tt) == [0, 1, 2, 2, 3, 4, 5]
    assert build_vision_expert_mask(tt) == [0, 1, 1, 1, 0, 0, 0]
    ends_in_image = [0, 1, 1, 1]
    assert build_position_ids(ends_in_image) == [0, 1, 2, 3]
    assert build_vision_expert_mask(ends_in_image) == [0, 1, 1, 0]
    assert build_position_ids([0, 0, 0]) == [0, 1, 2]
    assert build_position_ids([]) == [] and build_vision_expert_mask([]) == []
    two_images = [0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0]
    assert build_position_ids(two_images) == [0, 1, 2, 2, 3, 4, 5, 6, 6, 7, 8]


# ---- image loading --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "LA", "RGBA"])
def test_modes_convert_to_rgb(mode: str) -> None:
    img = noise_image(mode=mode)
    loaded = load_image(png_bytes(img) if mode != "CMYK" else img, max_pixels=10_000)
    assert loaded.mode == "RGB" and loaded.size == img.size
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(img.convert("RGB")))


def test_alpha_is_dropped_not_composited() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent red stays red
    loaded = load_image(png_bytes(Image.fromarray(rgba)), max_pixels=100)
    assert (np.asarray(loaded) == [200, 0, 0]).all()


def test_preprocess_shape_range_and_hash() -> None:
    img = noise_image(30, 70)
    pv = preprocess_image(img, 28)
    assert pv.shape == (3, 28, 28) and pv.dtype == np.float32 and pv.flags.c_contiguous
    white = preprocess_image(Image.new("RGB", (5, 9), (255, 255, 255)), 14)
    np.testing.assert_allclose(white[:, 0, 0], (1 - np.array([0.48145466, 0.4578275, 0.40821073]))
                               / np.array([0.26862954, 0.26130258, 0.27577711]), rtol=1e-6)
    assert image_content_hash(pv) == image_content_hash(pv.copy())
    assert image_content_hash(pv) != image_content_hash(white)
    assert len(image_content_hash(pv)) == 64


def test_truncated_png_and_jpeg_fail() -> None:
    data = png_bytes(noise_image(64, 64))
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])
    buf = io.BytesIO()
    noise_image(64, 64).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(jpeg[: len(jpeg) // 2])


def test_bad_image_inputs(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="cannot be read"):
        load_image("x" * 5000)  # file name too long
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8)))
    with pytest.raises(ImageError, match="empty"):
        load_image(np.zeros((0, 10, 3), dtype=np.uint8))
    with pytest.raises(ImageError, match="empty"):
        load_image(Image.new("RGB", (0, 0)))
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((4, 4, 4), dtype=np.uint8))
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ImageError, match="dtype"):
        load_image(np.zeros((4, 4, 3), dtype=np.float32))
    for bad in (42, 3.5, {"image": 1}):
        with pytest.raises(ImageError, match="unsupported image type"):
            load_image(bad)
    with pytest.raises(ImageError, match="max_pixels"):
        load_image(CHAT_PNG, max_pixels=0)


def test_too_many_pixels_checked_before_decoding() -> None:
    # 8000x8000 claims 64M pixels (under PIL's own limit, over ours): rejected from the header alone
    with pytest.raises(ImageError, match="too large.*8000x8000"):
        load_image(png_claiming_size(8000, 8000))
    # 100000x100000 trips PIL's DecompressionBombError while reading the header
    with pytest.raises(ImageError, match="too many pixels"):
        load_image(png_claiming_size(100_000, 100_000))
    with pytest.raises(ImageError, match="too large"):
        load_image(np.zeros((20, 20, 3), dtype=np.uint8), max_pixels=399)
    with pytest.raises(ImageError, match="too large"):
        load_image(Image.new("RGB", (20, 20)), max_pixels=399)
    assert load_image(np.zeros((20, 20, 3), dtype=np.uint8), max_pixels=400).size == (20, 20)


def test_each_image_problem_raises_its_own_image_error(tmp_path: Path) -> None:
    too_large = [(png_claiming_size(8000, 8000), DEFAULT_MAX_PIXELS),  # over our limit, from the header
                 (png_claiming_size(100_000, 100_000), DEFAULT_MAX_PIXELS),  # PIL's decompression-bomb guard
                 (np.zeros((20, 20, 3), dtype=np.uint8), 399), (png_bytes(noise_image()), 100)]
    for image, max_pixels in too_large:
        with pytest.raises(ImageTooLargeError):
            load_image(image, max_pixels)
    (tmp_path / "text.png").write_bytes(b"this is plain text, not a picture")
    not_images = [b"this is plain text, not a picture", tmp_path / "text.png", b"", png_bytes(noise_image())[:200]]
    for image in not_images:
        with pytest.raises(UnreadableImageError):
            load_image(image)
    for missing in (tmp_path / "missing.png", tmp_path):
        with pytest.raises(ImageNotFoundError):
            load_image(missing)
    for unsupported in (42, np.zeros((4, 4), dtype=np.uint8), np.zeros((4, 4, 3), dtype=np.float32)):
        with pytest.raises(UnsupportedImageError):
            load_image(unsupported)
    for error in (ImageTooLargeError, UnreadableImageError, ImageNotFoundError, UnsupportedImageError):
        assert issubclass(error, ImageError)


# ---- processor input errors ------------------------------------------------------------------------------------------
def test_processor_bad_inputs(processor: CogVLM2Processor) -> None:
    for bad_prompt in (None, 5, b"bytes", ["a"]):
        with pytest.raises(InputError, match="'prompt'"):
            processor(bad_prompt)  # type: ignore[arg-type]
    for bad_history in ("q a", [("q",)], [("q", 1)], [["q", "a", "x"]], ["qa"], {"q": "a"}):
        with pytest.raises(InputError, match="'history'"):
            processor("hi", history=bad_history)  # type: ignore[arg-type]
    with pytest.raises(TemplateError, match="'llama3'.*chat.*vqa.*base"):
        processor("hi", template="llama3")
    with pytest.raises(ImageError, match="only one image per conversation"):
        processor("hi", image=[CHAT_PNG, CHAT_PNG])
    with pytest.raises(ImageError, match="unsupported image type"):
        processor("hi", image=7)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        processor("hi", image=CHAT_PNG.read_bytes()[:200])
    small = CogVLM2Processor(processor.config, processor.tokenizer, max_image_pixels=100)
    with pytest.raises(ImageError, match="too large"):
        small("hi", image=CHAT_PNG)
    for error in (InputError, TemplateError, ImageError):
        assert issubclass(error, ValueError)
