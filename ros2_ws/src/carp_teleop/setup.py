from setuptools import find_packages, setup

package_name = "carp_teleop"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    package_data={},
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="CARP maintainers",
    maintainer_email="maintainers@carp-robot.dev",
    description="SpaceMouse reader, teleoperation node and demonstration recorder node.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "carp-record = carp_teleop.record:main",
            "spacemouse_node = carp_teleop.nodes:spacemouse_main",
            "teleop_node = carp_teleop.nodes:teleop_main",
            "recorder_node = carp_teleop.nodes:recorder_main",
        ],
    },
)
