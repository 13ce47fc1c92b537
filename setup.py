"""Installs the exported `picomaml` package; metadata comes from settings.ini, pins from requirements.txt."""
from configparser import ConfigParser

import setuptools

cfg = ConfigParser(delimiters=["="])
cfg.read("settings.ini", encoding="utf-8")
cfg = cfg["DEFAULT"]

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    author=cfg["author"],
    license=cfg["license"],
    packages=setuptools.find_packages(include=["picomaml", "picomaml.*"]),
    python_requires=">=" + cfg["min_python"],
    include_package_data=True,
    zip_safe=False,
)
