"""Packaging for tff_fad: federated automatic differentiation on TFF."""

import setuptools

setuptools.setup(
    name='tff_fad',
    version='0.1.0',
    description=(
        'Federated automatic differentiation for TensorFlow Federated.'
    ),
    packages=setuptools.find_packages(include=['tff_fad', 'tff_fad.*']),
    python_requires='>=3.9,<3.12',
    # Ranges of the packages tff_fad imports. Note: tensorflow-federated
    # 0.87.0 pins jax/jaxlib 0.4.14, which PyPI no longer serves; the project
    # installs with uv and requirements/overrides.txt (see README.md).
    install_requires=[
        'tensorflow~=2.14.0',
        'tensorflow-federated==0.87.0',
        'tensorflow-privacy==0.9.0',
        'dp-accounting==0.4.3',
        'numpy~=1.25',
        'absl-py',
        'mlxtend==0.23.4',
        'matplotlib',
    ],
    extras_require={
        'test': ['pytest', 'pytest-timeout'],
    },
)
