from setuptools import find_packages, setup

package_name = "carp_hardware"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    package_data={"carp_hardware": ["config/*.yaml"]},
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        (
            "share/" + package_name + "/config",
            ["carp_hardware/config/ur5e_limits.yaml", "carp_hardware/config/driver.yaml"],
        ),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="CARP maintainers",
    maintainer_email="maintainers@carp-robot.dev",
    description="Camera node, UR5e driver node (+ Robotiq 2F-85), UR5e kinematics and safety limits.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "ur5e_driver_node = carp_hardware.driver_node:main",
            "camera_node = carp_hardware.camera_node:main",
        ],
    },
)
