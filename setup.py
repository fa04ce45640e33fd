from setuptools import find_packages, setup

setup(
    name="algpt2-tf",
    version="0.1.0",
    description="ALGPT2: an ALBERT-style, parameter-efficient GPT-2 for TensorFlow / Keras 3",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10,<3.14",
    packages=find_packages(include=["algpt2_tf", "algpt2_tf.*"]),
    py_modules=["algpt2_command"],  # the console script (see its docstring)
    package_data={"algpt2_tf": ["configs/*.json", "assets/*", "pretrained_models/*/*",
                               "pretrained_models/*/tokenizer/*"]},
    include_package_data=True,
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<4",
        "tensorflow-text>=2.21,<2.22",
        "keras-hub>=0.32,<0.33",
        "tokenizers>=0.20,<1",
        "tensorboard>=2.20,<3",
        "numpy>=1.26,<3",
        "ai-edge-litert>=2.0,<3",
        "flatbuffers>=24.3",  # rewriting .tflite files (export/tflite.py)
        "fastapi>=0.110,<1",
        "uvicorn>=0.29,<1",
        "orjson>=3.8",  # serving: JSON with NumPy arrays, fast (serving/server.py)
        "pyyaml>=6",  # experiment specs in YAML
        "matplotlib>=3.8",  # experiment plots
        "safetensors>=0.4",  # Hugging Face checkpoints (algpt2_tf/convert)
        "ml_dtypes>=0.4",  # bfloat16 tensors in those checkpoints (a TensorFlow dependency too)
    ],
    extras_require={
        # torch is pinned exactly: 2.13.0's CPU build installs from a local file here, while any
        # other or an unpinned torch pulls a CUDA build of several GB. transformers + torch are
        # the reference that tests/test_convert.py compares our conversions with.
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "pytest-timeout>=2.3", "hypothesis>=6",
                "httpx>=0.27", "torch==2.13.0", "transformers>=5,<6", "openai>=1.40"],
        # Keras 3's other backends (KERAS_BACKEND=torch|jax); see algpt2_tf/runtime/backend.py.
        "torch": ["torch==2.13.0"],
        "jax": ["jax>=0.4.30"],
        # The engines benchmarks/peers.py measures against (skipped when absent).
        "peers": ["ctranslate2==4.8.5", "onnxruntime>=1.20", "onnx>=1.16",
                  "onnx-ir>=0.1"],  # onnx-ir: ONNX Runtime's int4 quantizer
    },
    entry_points={"console_scripts": ["algpt2=algpt2_command:main"]},
)
