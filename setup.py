from setuptools import Extension, find_packages, setup

# The CPU kernels: one shared library loaded by MindSpore's ops.Custom(func_type="aot") (never imported by Python;
# the extension machinery only compiles it). optional=True: without a C++ compiler the install still succeeds and
# the kernel registry falls back to the reference composites, with a warning.
CPU_KERNELS = Extension(
    "kernels.cpu._cogvlm2_kernels",
    sources=["kernels/cpu/rope.cc", "kernels/cpu/kv_cache.cc", "kernels/cpu/paged_attention.cc",
             "kernels/cpu/expert_linear.cc", "kernels/cpu/gemm.cc", "kernels/cpu/gemm_amx.cc",
             "kernels/cpu/attention_amx.cc", "kernels/cpu/norm_act.cc"],
    depends=["kernels/cpu/common.h", "kernels/cpu/kv_cache.h", "kernels/cpu/vec_math.h",
             "kernels/cpu/attention_math.h", "kernels/cpu/gemm.h", "kernels/cpu/gemm_amx.h",
             "kernels/cpu/attention_amx.h", "kernels/cpu/rope.h"],
    extra_compile_args=["-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-pthread"],
    extra_link_args=["-pthread"],
    libraries=["dl"],
    language="c++",
    optional=True,
)


setup(
    name="cogvlm2-engine",
    version="0.1.0",
    description="A lean CogVLM2 inference engine on MindSpore: paged KV cache, continuous batching, custom kernels.",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "cogvlm2", "cogvlm2.*"]),
    package_data={"cogvlm2": ["demo_model/*"]},
    ext_modules=[CPU_KERNELS],
    install_requires=[
        "mindspore==2.10.0",
        "numpy<2",
        "pillow",
        "tiktoken",
        "llama-models==0.3.0",
        "safetensors",
        "ml-dtypes",
        "pyyaml",
        "tqdm",
        "pybind11",
        "llguidance",
    ],
    extras_require={
        "serve": ["fastapi", "uvicorn", "prometheus-client"],
        "bench": ["httpx"],  # `cogvlm2 bench serve`'s client
        "test": ["pytest", "pytest-benchmark", "hypothesis", "openai", "httpx", "fastapi", "uvicorn", "prometheus-client"],
    },
    entry_points={"console_scripts": ["cogvlm2=engine.cli:main"]},
)
