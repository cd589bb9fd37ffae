import os
from glob import glob

from setuptools import find_packages, setup

package_name = "carp_bringup"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    package_data={},
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        (os.path.join("share", package_name, "launch"), glob("launch/*.py")),
        (os.path.join("share", package_name, "config"), glob("config/*.yaml")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="CARP maintainers",
    maintainer_email="maintainers@carp-robot.dev",
    description="Launch files, YAML parameters, the stack runner and the evaluation protocol.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "carp-eval = carp_bringup.evaluate:main",
            "carp-launch = carp_bringup.launcher:main",
        ],
    },
)
