from setuptools import find_packages, setup

setup(
    name="nnunetv2_smms",
    version="0.1.0",
    description="Semi-supervised multi-modal segmentation (SMMS, Meng et al. 2025) as an nnU-Net v2 plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["nnunetv2_smms", "nnunetv2_smms.*"]),
    # the folder that nnUNet_extTrainer points at holds plain modules (no package), ship it as data
    package_data={"nnunetv2_smms": ["ext_trainers/*.py"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "nnunetv2>=2.8.1",
        "torch",
        "numpy",
        "SimpleITK",
        "batchgenerators",
        "batchgeneratorsv2",
        "acvl-utils",
        "dynamic-network-architectures",
        "matplotlib",
        "tqdm",
        "medpy>=0.5.2,<0.6",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist"],
    },
    entry_points={"console_scripts": ["nnunetv2_smms=nnunetv2_smms.cli:main"]},
)
