from setuptools import find_packages, setup

package_name = "carp_policy"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    package_data={package_name: ["configs/*.yaml"]},
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="CARP maintainers",
    maintainer_email="maintainers@carp-robot.dev",
    description=(
        "Learning: CARP tokenizer and transformer, observation encoders, datasets, traini"
        "ng, ONNX export and engine, policy families (CARP, CoA, DP-C), policy node."
    ),
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "carp-train = carp_policy.train:main",
            "carp-dataset = carp_policy.dataset.cli:main",
            "carp-export = carp_policy.export:main",
            "carp-manifest = carp_policy.manifest:main",
            "policy_node = carp_policy.policy_node:main",
        ],
    },
)
