"""Package layout (everything else is in pyproject.toml): the `qexp` packages, the top-level
config tree `conf/` mapped into the wheel as `qexp/conf`, and the Ray launcher from
`launchers/hydra_plugins/` into the `hydra_plugins` namespace Hydra searches for plugins."""

from setuptools import find_namespace_packages, find_packages, setup

setup(
    packages=[
        *find_packages(include=["qexp", "qexp.*"]),
        "qexp.conf",
        *find_namespace_packages("launchers", include=["hydra_plugins", "hydra_plugins.*"]),
    ],
    package_dir={"qexp.conf": "conf", "hydra_plugins": "launchers/hydra_plugins"},
)
