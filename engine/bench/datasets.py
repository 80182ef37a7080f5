"""The benchmark workloads (`--dataset-name`): seeded synthetic requests, with or without images.

random     random words (each one Llama-3 token), so a prompt of L words is L tokens before the model's template
random-mm  the same, and a synthetic picture (coloured discs) on a fraction of the requests; CogVLM2 takes one
           image per prompt
demo       the questions the demo model answers, about its example pictures (cogvlm2/demo_model)

With no --input-len / --output-len the random datasets draw this project's standard mix (the one
benchmarks/throughput.py has always run): 20-80 prompt tokens and 16-128 output tokens per request.
"""
from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from cogvlm2.model_source import DEMO_MODEL_DIR

DATASETS = ("random", "random-mm", "demo")
DEFAULT_NUM_PROMPTS = 64
WORDS = ("shape circle square triangle colour red green blue yellow purple white black grey background image "
         "describe picture how many there is are what which where left right top bottom small large the a of "
         "and in on with").split()
DEFAULT_INPUT_RANGE = (20, 80)
DEFAULT_OUTPUT_RANGE = (16, 128)
DEFAULT_DEMO_OUTPUT_LEN = 32
DEFAULT_IMAGE_SIZE = 224
DEMO_QUESTIONS = ["Describe the image.", "How many shapes are there?", "What colour is the background?",
                  "What shapes are in the image?", "Is there a square?"]
DEMO_TEXT_PROMPTS = ["Tell me a short story about a circle.", "What is a triangle?", "Name three colours.",
                     "Explain what a square is.", "Write one sentence about shapes."]

ImageInput = np.ndarray | bytes  # pixels (H x W x 3, uint8) or an encoded file


@dataclass
class SampleRequest:
    prompt: str
    expected_output_len: int
    prompt_len: int | None = None  # the prompt text's tokens, when the dataset knows them (before the template)
    image: ImageInput | None = None


def add_dataset_args(parser: argparse.ArgumentParser, input_len: int | None = None,
                     output_len: int | None = None) -> None:
    """vLLM's dataset flags. The lengths' defaults: None, the dataset's own (see the module's docstring)."""
    parser.add_argument("--dataset-name", default="random", choices=DATASETS, help="the workload (engine/bench/"
                        "datasets.py): random words, the same with synthetic images, or the demo model's questions")
    parser.add_argument("--input-len", "--random-input-len", dest="input_len", type=int, default=input_len,
                        help="prompt tokens per request (default: 20-80, the project's standard mix)"
                        if input_len is None else "prompt tokens per request")
    parser.add_argument("--output-len", "--random-output-len", dest="output_len", type=int, default=output_len,
                        help="output tokens per request (default: 16-128 for random, 32 for demo)"
                        if output_len is None else "output tokens per request")
    parser.add_argument("--random-range-ratio", type=float, default=0.0,
                        help="lengths drawn uniformly from [len * (1 - r), len * (1 + r)]")
    parser.add_argument("--random-mm-image-ratio", type=float, default=1.0,
                        help="random-mm and demo: the fraction of requests with an image")
    parser.add_argument("--random-mm-image-size", type=int, default=DEFAULT_IMAGE_SIZE,
                        help="random-mm: the synthetic pictures' side in pixels")


def check_dataset_args(args: argparse.Namespace) -> None:
    if not 0 <= args.random_range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {args.random_range_ratio}")
    if not 0 <= args.random_mm_image_ratio <= 1:
        raise ValueError(f"--random-mm-image-ratio must be in [0, 1], got {args.random_mm_image_ratio}")
    for name in ("input_len", "output_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def sample_requests(args: argparse.Namespace, num_prompts: int) -> list[SampleRequest]:
    """`num_prompts` requests of the dataset the flags name, seeded by --seed."""
    check_dataset_args(args)
    if args.dataset_name == "demo":
        return demo_requests(num_prompts, args.random_mm_image_ratio, args.output_len or DEFAULT_DEMO_OUTPUT_LEN,
                             args.seed)
    return random_requests(num_prompts, length_range(args.input_len, args.random_range_ratio, DEFAULT_INPUT_RANGE),
                           length_range(args.output_len, args.random_range_ratio, DEFAULT_OUTPUT_RANGE),
                           args.random_mm_image_ratio if args.dataset_name == "random-mm" else 0.0, args.seed,
                           args.random_mm_image_size)


def length_range(length: int | None, range_ratio: float, default: tuple[int, int]) -> tuple[int, int]:
    """The inclusive bounds lengths are drawn from."""
    if length is None:
        return default
    return max(1, math.floor(length * (1 - range_ratio))), math.ceil(length * (1 + range_ratio))


def random_requests(num_prompts: int, input_range: tuple[int, int], output_range: tuple[int, int],
                    image_ratio: float, seed: int, image_size: int = DEFAULT_IMAGE_SIZE) -> list[SampleRequest]:
    """Random-word prompts and output lengths drawn uniformly from the inclusive ranges; the first
    round(num_prompts * image_ratio) get a picture, then the order is shuffled so images spread through the queue.
    (The draws' order is part of the workload: benchmarks/throughput.py's figures rest on it.)"""
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(num_prompts):
        num_words = int(rng.integers(input_range[0], input_range[1] + 1))
        prompt = " ".join(rng.choice(WORDS, num_words))
        image = synthetic_image(rng, image_size) if i < round(num_prompts * image_ratio) else None
        output_len = int(rng.integers(output_range[0], output_range[1] + 1))
        requests.append(SampleRequest(prompt, output_len, num_words, image))
    order = rng.permutation(num_prompts)
    return [requests[i] for i in order]


def synthetic_image(rng: np.random.Generator, size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """A plain background with one to three coloured discs."""
    img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        x, y = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
        r = int(rng.integers(size // 10, size // 4))
        draw.ellipse([x, y, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return np.asarray(img)


def demo_requests(num_prompts: int, image_ratio: float, output_len: int, seed: int) -> list[SampleRequest]:
    """The demo model's questions: about one of its example pictures (in turn) on round(num_prompts * image_ratio)
    requests spread at random, text-only prompts on the rest."""
    rng = random.Random(seed)
    num_images = round(num_prompts * image_ratio)
    with_image = [True] * num_images + [False] * (num_prompts - num_images)
    rng.shuffle(with_image)
    pictures = [path.read_bytes() for path in sorted(DEMO_MODEL_DIR.glob("demo_*.png"))]
    return [SampleRequest(rng.choice(DEMO_QUESTIONS), output_len, image=pictures[i % len(pictures)]) if has_image
            else SampleRequest(rng.choice(DEMO_TEXT_PROMPTS), output_len)
            for i, has_image in enumerate(with_image)]
