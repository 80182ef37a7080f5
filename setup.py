from setuptools import find_packages, setup

setup(
    name="cogvlm2-engine",
    version="0.1.0",
    description="A lean CogVLM2 inference engine on MindSpore: paged KV cache, continuous batching, custom kernels.",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "cogvlm2", "cogvlm2.*"]),
    package_data={"cogvlm2": ["demo_model/*"]},
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
    ],
    extras_require={
        "serve": ["fastapi", "uvicorn", "prometheus-client"],
        "test": ["pytest", "pytest-benchmark", "openai", "httpx", "fastapi", "uvicorn", "prometheus-client"],
    },
    entry_points={"console_scripts": ["cogvlm2=engine.cli:main"]},
)
