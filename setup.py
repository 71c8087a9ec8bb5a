"""Package discovery for the three source roots: `sparsecc/`, and `passes/` and `runtimes/`, which install as
`sparsecc.passes` and `sparsecc.runtimes`. Every package under each root is found, so none can be left out
of the wheel; the metadata lives in pyproject.toml."""

from setuptools import find_packages, setup

ROOTS = {"sparsecc": "sparsecc", "sparsecc.passes": "passes", "sparsecc.runtimes": "runtimes"}

setup(
    package_dir=ROOTS,
    packages=[name for root, folder in ROOTS.items()
              for name in (root, *(f"{root}.{sub}" for sub in find_packages(folder)))],
)
