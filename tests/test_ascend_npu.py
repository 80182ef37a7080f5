"""On an Ascend NPU only (scripts/ascend_first_run.sh runs them): both Ascend kernel sets against
kernels/reference.py on the device (fp16, bf16 where the SoC has it, block sizes 16 and 128, a mixed decode +
mid-block prefill batch, decodes only, whole prompts), and the engine's goldens on the NPU. Skipped elsewhere;
with COGVLM2_REQUIRE_NPU=1 (the first-run script) a missing NPU or custom-op package fails instead."""
from __future__ import annotations

import os

import numpy as np
import pytest

from kernels.device import select_device

DEVICE = select_device("auto")
REQUIRED = os.environ.get("COGVLM2_REQUIRE_NPU") == "1"
if REQUIRED and DEVICE.target != "ascend":
    pytest.fail(f"COGVLM2_REQUIRE_NPU=1, but this process runs on {DEVICE.describe()}", pytrace=False)
pytestmark = pytest.mark.skipif(
    DEVICE.target != "ascend", reason="needs an Ascend NPU (MindSpore reports none here): run "
                                      "scripts/ascend_first_run.sh on an Ascend host")

if DEVICE.target == "ascend":
    from cogvlm2.runtime import configure_mindspore
    configure_mindspore("ascend")

from kernels import sku  # noqa: E402
from kernels.ascend import AscendKernels  # noqa: E402
from kernels.ascend_build import installed_package  # noqa: E402
from test_ascend_host import TOLERANCE, make_batch, run_ascend, run_reference  # noqa: E402

DTYPES = ["float16"] + (["bfloat16"] if DEVICE.supports_bf16 else [])
CHOICES = ["builtin", pytest.param("custom", marks=pytest.mark.skipif(
    installed_package() is None and not REQUIRED,
    reason="the custom ops are not installed (python -m kernels.ascend_build)"))]
BATCHES = {"mixed": [(37, 1), (45, 25), (5, 1)], "decodes": [(37, 1), (5, 1), (16, 1)], "prompts": [(7, 7), (20, 20)],
           "long_chunk": [(300, 130), (129, 1)]}


def npu_kernels(choice: str, dtype: str) -> AscendKernels:
    return AscendKernels(sku.load_params(), dtype, dict.fromkeys(sku.ASCEND_CHOICE_OPS, choice), DEVICE.soc_family)


@pytest.mark.parametrize("batch_name", list(BATCHES))
@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("choice", CHOICES)
def test_npu_attention_against_the_reference(choice, dtype, block_size, batch_name):
    batch = make_batch(block_size, BATCHES[batch_name])
    out, _ = run_ascend(npu_kernels(choice, dtype), batch, block_size, dtype)
    np.testing.assert_allclose(out, run_reference(batch, block_size, dtype), atol=TOLERANCE[dtype])


@pytest.mark.parametrize("choice", CHOICES)
def test_npu_goldens(choice, golden_cases, golden_arrays):
    from conftest import assert_close_to_goldens
    from engine.llm_engine import LLMEngine
    engine = LLMEngine("demo", device="ascend", kernels=f"ascend-{choice}")
    assert_close_to_goldens(engine, golden_cases, golden_arrays, max_abs=0.5, min_cosine=0.999, margin=0.1)
