import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
readme = os.path.join(here, "README.md")
long_description = open(readme, encoding="utf-8").read() if os.path.exists(readme) else ""

setup(
    name="keras_kfac",
    version="0.1.0",
    description=(
        "K-FAC (Kronecker-factored approximate curvature) optimizer for Keras 3 / TensorFlow"
    ),
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=find_packages(
        exclude=["tests", "tests.*", "examples", "examples.*", "benchmarks", "benchmarks.*"]
    ),
    python_requires=">=3.9",
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.0",
        "tensorflow-datasets",
        # TFDS 4.9.x imports it when preparing a dataset but does not declare it.
        "importlib_resources",
        "tensorboard",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "ruff"],
        "bench": ["matplotlib"],
    },
)
